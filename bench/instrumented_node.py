"""Run ``python -m twisted ...`` with its reactor thread instrumented (`cluster.py`).

    python bench/instrumented_node.py profile STATS_PATH --log-format=text timemachine ...
    python bench/instrumented_node.py stalls STALLS_PATH --log-format=text timemachine ...

``profile``: the reactor thread runs under cProfile; the stats are written to
STATS_PATH when the reactor shuts down (``python -m cProfile`` cannot do it: ``twist``
ends a process stopped by a signal with that signal, so cProfile never writes). Read
them with ``python -m pstats STATS_PATH``.

``stalls``: a watchdog thread looks every `WATCH_SECONDS` at a beat the reactor
renews every `BEAT_SECONDS`; while the beat is more than `STALL_SECONDS` old, the
reactor is stalled (busy in one turn, or waiting for the GIL or a CPU) and the
watchdog samples its stack. At shutdown STALLS_PATH gets JSON: every stall (wall
clock start, length, the innermost frames seen most) and the stacks seen most over
all stalls. The watchdog's wake-ups take the GIL briefly, 250 times a second.
"""

from __future__ import annotations

import collections
import cProfile
import json
import os
import sys
import threading
import time
import traceback

from twisted.application.twist._twist import Twist
from twisted.internet import task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
BEAT_SECONDS = 0.005
WATCH_SECONDS = 0.004
STALL_SECONDS = 0.025
STACK_FRAMES = 10


def _profile(reactor, path: str) -> None:
    profile = cProfile.Profile()

    def dump() -> None:
        profile.disable()
        profile.dump_stats(path)

    reactor.addSystemEventTrigger("after", "shutdown", dump)
    reactor.callWhenRunning(profile.enable)


def _stack(frame) -> str:
    """The innermost `STACK_FRAMES` frames of ``frame``, innermost first, their files
    relative to the repository or to site-packages."""
    frames = traceback.extract_stack(frame)[-STACK_FRAMES:]
    return " <- ".join(
        f"{f.filename.removeprefix(REPO).rsplit('site-packages/', 1)[-1]}:{f.lineno}:{f.name}"
        for f in reversed(frames)
    )


def _watch_stalls(reactor, path: str) -> None:
    reactor_thread = threading.get_ident()
    beat = [time.monotonic()]
    stopped = threading.Event()
    stalls: list[dict] = []
    seen: collections.Counter = collections.Counter()

    def renew() -> None:
        beat[0] = time.monotonic()

    def watch() -> None:
        stall = None
        while not stopped.wait(WATCH_SECONDS):
            late = time.monotonic() - beat[0]
            if late > STALL_SECONDS:
                if stall is None:
                    stall = {"at": time.time() - late, "samples": collections.Counter()}
                frame = sys._current_frames().get(reactor_thread)
                if frame is not None:
                    stack = _stack(frame)
                    stall["samples"][stack] += 1
                    seen[stack] += 1
            elif stall is not None:
                ended = time.time() - (time.monotonic() - beat[0])
                stalls.append({
                    "at": round(stall["at"], 3),
                    "ms": round((ended - stall["at"]) * 1000, 1),
                    "stacks": stall["samples"].most_common(3),
                })
                stall = None

    def dump() -> None:
        stopped.set()
        with open(path, "w") as out:
            json.dump({"stall_ms": STALL_SECONDS * 1000, "stalls": stalls,
                       "stacks": seen.most_common(30)}, out, indent=1)

    reactor.addSystemEventTrigger("after", "shutdown", dump)
    reactor.callWhenRunning(task.LoopingCall(renew).start, BEAT_SECONDS)
    threading.Thread(target=watch, name="stall-watchdog", daemon=True).start()


INSTRUMENTS = {"profile": _profile, "stalls": _watch_stalls}


def main(argv: list[str]) -> None:
    instrument, path, twist_argv = argv[1], argv[2], [argv[0], *argv[3:]]
    options = Twist.options(twist_argv)
    reactor = options["reactor"]
    INSTRUMENTS[instrument](reactor, path)
    service = Twist.service(plugin=options.plugins[options.subCommand], options=options.subOptions)
    Twist.startService(reactor, service)
    Twist.run(options)


if __name__ == "__main__":
    main(sys.argv)
