"""How long the reactor is held while a starting node takes in its due window.

Usage::

    .venv/bin/python bench/window_load.py [--jobs 200000] [--slice 500]

Builds a node (in this process, real WAL and SQLite in a temp dir) holding ``--jobs``
jobs due inside the firing window, stops it, and starts it again: the executor reads
the window and takes it in. A 1 ms heartbeat on the reactor records the gap between
its beats while the jobs are taken in; a gap is at least one reactor turn, so the
longest gap bounds the longest turn the load caused (goal: under 5 ms; a gap holds
the 1 ms beat interval too). It then does the same with each shard's window taken in
at once (the executor before slicing), for comparison. The gaps include the cyclic
garbage collector's full passes, which the ~200,000 new job objects trigger;
``--no-gc`` turns the collector off to show the load alone. Prints the figures;
asserts nothing.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
import time

from twisted.internet import defer, task
from twisted.internet.task import react

from timemachine.domain.commands import PutRoute
from timemachine.domain.jobs import JobSpec
from timemachine.domain.routes import Route
from timemachine.node import Node

BATCH = 10_000
# Due well after the start (no delivery during the measurement), inside the window.
DUE_IN_MS = 40_000
WINDOW_MS = 60_000


def node(reactor, data_dir: str, load_slice: int) -> Node:
    return Node(
        reactor,
        "bench",
        data_dir,
        shards=8,
        executor_options={"window_ms": WINDOW_MS, "load_slice": load_slice},
    )


@defer.inlineCallbacks
def build(reactor, data_dir: str, jobs: int):
    built = node(reactor, data_dir, 500)
    yield built.startService()
    yield built.meta_log.propose(
        PutRoute(Route("bench", "http", webhook_url="http://127.0.0.1:9/"))
    )
    due = int(reactor.seconds() * 1000) + DUE_IN_MS
    specs = [JobSpec("w", f"job-{i}", due + i % 10_000, "{}", "bench") for i in range(jobs)]
    for start in range(0, jobs, BATCH):
        yield built.coordinator.put_jobs(specs[start : start + BATCH])
    yield built.stopService()


@defer.inlineCallbacks
def measure(reactor, data_dir: str, jobs: int, load_slice: int) -> dict:
    """Restart over ``data_dir``; the heartbeat's gaps while the window is taken in."""
    gaps: list[float] = []
    last = [time.perf_counter()]
    started = node(reactor, data_dir, load_slice)

    def beat():
        now = time.perf_counter()
        executor = started.executor
        # A gap that ends with jobs held spans (part of) the taking in.
        if executor is not None and executor.pending() > 0:
            gaps.append(now - last[0])
        last[0] = now

    heartbeat = task.LoopingCall(beat)
    heartbeat.start(0.001)
    t0 = time.perf_counter()
    yield started.startService()
    while started.executor.pending() < jobs:
        yield task.deferLater(reactor, 0.001, lambda: None)
    loaded_s = time.perf_counter() - t0
    heartbeat.stop()
    yield started.stopService()
    gaps.sort()
    return {
        "beats": len(gaps),
        "max_gap_ms": gaps[-1] * 1000 if gaps else None,
        "p99_gap_ms": gaps[int(len(gaps) * 0.99)] * 1000 if gaps else None,
        "start_to_loaded_s": loaded_s,
    }


@defer.inlineCallbacks
def main(reactor, argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--slice", type=int, default=500)
    parser.add_argument("--no-gc", action="store_true", help="disable the cyclic GC")
    args = parser.parse_args(argv)
    if args.no_gc:
        gc.disable()
    data_dir = tempfile.mkdtemp(prefix="tm-window-")
    try:
        yield build(reactor, data_dir, args.jobs)
        for label, load_slice in [
            (f"in slices of {args.slice}", args.slice),
            ("all at once", args.jobs),
        ]:
            figures = yield measure(reactor, data_dir, args.jobs, load_slice)
            print(
                f"{args.jobs} due jobs taken in {label}: longest heartbeat gap "
                f"{figures['max_gap_ms']:.1f} ms (goal < 5 ms), p99 {figures['p99_gap_ms']:.1f} ms "
                f"over {figures['beats']} beats; start to loaded "
                f"{figures['start_to_loaded_s']:.2f} s"
            )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    react(main)
