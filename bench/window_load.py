"""How long the reactor is held while a starting node takes in its due window.

Usage::

    .venv/bin/python bench/window_load.py [--jobs 200000] [--slice 500]

Builds a node (in this process, real WAL and SQLite in a temp dir) holding ``--jobs``
jobs due inside the firing window, stops it, and starts it again: the executor reads
the window and takes it in. Then the running node drops every shard and gains it
again, which loads the window the same way (as does a reload after an unrecorded
outcome). A 1 ms heartbeat on the reactor records the gap between
its beats while the jobs are taken in; a gap is at least one reactor turn, so the
longest gap bounds the longest turn the load caused (goal: under 5 ms; a gap holds
the 1 ms beat interval too). It then does the same with each shard's window taken in
at once (the executor before slicing), for comparison. The heartbeat goes on for
``SETTLE_S`` after the last job is held, so the turn that ends a load (and the
node's start-up work after it) is measured too. The gaps include the cyclic garbage
collector's full passes, whose count and longest pass (while jobs are held) are
printed as well;
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
SETTLE_S = 0.2


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


class _Recorder:
    """The heartbeat's gaps and the collector's full passes while ``started`` holds jobs
    (a gap that ends with jobs held spans, part of, the taking in)."""

    def __init__(self, started: Node):
        self._started = started
        self._last = time.perf_counter()
        self._pass_started = 0.0
        self.reset()
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.start(0.001)
        gc.callbacks.append(self._collected)

    def reset(self):
        self.gaps: list[float] = []
        self.full_passes: list[float] = []
        self.t0 = time.perf_counter()

    def _holding(self) -> bool:
        executor = self._started.executor
        return executor is not None and executor.pending() > 0

    def _beat(self):
        now = time.perf_counter()
        if self._holding():
            self.gaps.append(now - self._last)
        self._last = now

    def _collected(self, phase, info):
        if info["generation"] == 2 and self._holding():
            if phase == "start":
                self._pass_started = time.perf_counter()
            else:
                self.full_passes.append(time.perf_counter() - self._pass_started)

    @defer.inlineCallbacks
    def until_loaded(self, reactor, jobs: int):
        """Fire with the figures once ``jobs`` are held and ``SETTLE_S`` has passed."""
        while self._started.executor.pending() < jobs:
            yield task.deferLater(reactor, 0.001, lambda: None)
        loaded_s = time.perf_counter() - self.t0
        yield task.deferLater(reactor, SETTLE_S, lambda: None)
        gaps = sorted(self.gaps)
        return {
            "beats": len(gaps),
            "max_gap_ms": gaps[-1] * 1000 if gaps else None,
            "p99_gap_ms": gaps[int(len(gaps) * 0.99)] * 1000 if gaps else None,
            "loaded_s": loaded_s,
            "full_passes": len(self.full_passes),
            "longest_pass_ms": max(self.full_passes, default=0) * 1000,
        }

    def stop(self):
        gc.callbacks.remove(self._collected)
        self._heartbeat.stop()


@defer.inlineCallbacks
def measure(reactor, data_dir: str, jobs: int, load_slice: int) -> dict:
    """Restart over ``data_dir``, then drop every shard and gain it again (as a running
    node gaining shards does): the figures of each taking in of the window."""
    started = node(reactor, data_dir, load_slice)
    recorder = _Recorder(started)
    yield started.startService()
    figures = {"at start-up": (yield recorder.until_loaded(reactor, jobs))}
    executor = started.executor
    for shard in started.shard_logs:
        executor.remove_shard(shard)
    recorder.reset()
    yield defer.gatherResults(
        [executor.add_shard(s, store, log) for s, (log, store) in started.shard_logs.items()]
    )
    figures["on gaining its shards"] = yield recorder.until_loaded(reactor, jobs)
    recorder.stop()
    yield started.stopService()
    return figures


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
            phases = yield measure(reactor, data_dir, args.jobs, load_slice)
            for phase, figures in phases.items():
                print(
                    f"{args.jobs} due jobs taken in {label} {phase}: longest heartbeat gap "
                    f"{figures['max_gap_ms']:.1f} ms (goal < 5 ms), "
                    f"p99 {figures['p99_gap_ms']:.1f} ms over {figures['beats']} beats; "
                    f"loaded in {figures['loaded_s']:.2f} s; {figures['full_passes']} full GC "
                    f"passes, longest {figures['longest_pass_ms']:.1f} ms"
                )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    react(main)
