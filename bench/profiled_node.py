"""Run ``python -m twisted ...`` with its reactor thread under cProfile.

    python bench/profiled_node.py STATS_PATH --log-format=text timemachine --node-id ...

The stats are written to STATS_PATH when the reactor shuts down (``python -m cProfile``
cannot do it: ``twist`` ends a process stopped by a signal with that signal, so
cProfile never writes). Read them with ``python -m pstats STATS_PATH``.
"""

from __future__ import annotations

import cProfile
import sys

from twisted.application.twist._twist import Twist


def main(argv: list[str]) -> None:
    path, twist_argv = argv[1], [argv[0], *argv[2:]]
    profile = cProfile.Profile()
    options = Twist.options(twist_argv)
    reactor = options["reactor"]

    def dump() -> None:
        profile.disable()
        profile.dump_stats(path)

    reactor.addSystemEventTrigger("after", "shutdown", dump)
    service = Twist.service(plugin=options.plugins[options.subCommand], options=options.subOptions)
    Twist.startService(reactor, service)
    profile.enable()
    Twist.run(options)


if __name__ == "__main__":
    main(sys.argv)
