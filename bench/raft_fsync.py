"""Fsync cost per reactor turn of a node's Raft groups: a log per group vs one
node-wide `RaftEngine` (issue 7, item 2). Prints figures, asserts nothing.

    .venv/bin/python bench/raft_fsync.py [--groups 13] [--turns 2000] [--dir DIR]

Every turn, each of ``--groups`` groups persists one small Ready (one entry of 100
bytes and a hard state), and the turn ends when all are durable - what a node with
that many busy groups does per reactor turn. Three ways:

* ``per-group WAL``: a `WriteAheadLog` per group, all on one writer thread as
  ``node.py`` builds them: one fsync per group per turn.
* ``per-group WAL + hardstate.json``: the same, then the hard state file replaced
  atomically (write, fsync, rename, fsync the directory), as the former
  ``MemberDisk`` did after each batch: three fsyncs per group per turn.
* ``RaftEngine``: every group's record in the one batch of the turn: one fsync.

For each: per-turn mean, median and p99 in ms (from the first persist of the turn to
the last one durable), and fsyncs per turn (counted by the logs' ``on_fsync`` hooks,
plus two per hard-state file replaced). The files go in a temporary directory under
``--dir`` (default: the system's), removed at the end; use a directory on the disk a
node would use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from twisted.internet import defer, task

from timemachine.raft.engine import RaftEngine
from timemachine.raft.types import ConfState, Entry, HardState, Ready
from timemachine.storage.durable import write_atomically
from timemachine.storage.iothread import IOThread
from timemachine.storage.wal import WriteAheadLog

WARMUP_TURNS = 20
DATA = b"d" * 100


class _Counter:
    def __init__(self):
        self.fsyncs = 0

    def __call__(self, _seconds: float) -> None:
        self.fsyncs += 1


@defer.inlineCallbacks
def _turns(reactor, turns: int, persist_all, counter: _Counter):
    """Run ``turns`` measured turns; fire with (per-turn seconds, fsyncs per turn)."""
    for k in range(WARMUP_TURNS):
        yield persist_all(k + 1)
    counter.fsyncs = 0
    times = []
    for k in range(WARMUP_TURNS, WARMUP_TURNS + turns):
        started = time.perf_counter()
        yield persist_all(k + 1)
        times.append(time.perf_counter() - started)
    return times, counter.fsyncs / turns


@defer.inlineCallbacks
def per_group_wals(reactor, directory: str, groups: int, turns: int, hard_state_file: bool):
    counter = _Counter()
    wal_io = IOThread(reactor, "bench-wal")
    io = IOThread(reactor, "bench-io")
    wal_io.start()
    io.start()
    wals = [
        WriteAheadLog(os.path.join(directory, str(g), "wal"), reactor, on_fsync=counter,
                      io=wal_io)
        for g in range(groups)
    ]
    for wal in wals:
        yield wal.open()

    def persist(g: int, index: int):
        d = wals[g].append(index, 1, DATA)
        if hard_state_file:
            path = os.path.join(directory, str(g), "hardstate.json")
            state = json.dumps({"term": 1, "vote": 1, "commit": index - 1}).encode()

            def save(_):
                counter.fsyncs += 2  # the file's and its directory's
                return io.call(write_atomically, path, state)

            d.addCallback(save)
        return d

    def persist_all(index: int):
        return defer.gatherResults([persist(g, index) for g in range(groups)])

    try:
        return (yield _turns(reactor, turns, persist_all, counter))
    finally:
        for wal in wals:
            yield wal.close()
        wal_io.stop()
        io.stop()


@defer.inlineCallbacks
def one_engine(reactor, directory: str, groups: int, turns: int):
    counter = _Counter()
    io = IOThread(reactor, "bench-io")
    io.start()
    engine = RaftEngine(directory, reactor, io, on_fsync=counter)
    yield engine.open()
    for g in range(groups):
        engine.storage(g, ConfState(frozenset({1})))

    def persist_all(index: int):
        ready = Ready(hard_state=HardState(1, 1, index - 1), entries=(Entry(index, 1, DATA),))
        return defer.gatherResults([engine.persist(g, ready) for g in range(groups)])

    try:
        return (yield _turns(reactor, turns, persist_all, counter))
    finally:
        yield engine.close()
        io.stop()


def _report(name: str, times: list[float], fsyncs: float) -> None:
    ms = sorted(t * 1000 for t in times)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    print(
        f"{name:34s} mean {statistics.fmean(ms):6.2f} ms  median {statistics.median(ms):6.2f} ms"
        f"  p99 {p99:6.2f} ms  fsyncs/turn {fsyncs:5.1f}"
    )


@defer.inlineCallbacks
def main(reactor, options):
    base = tempfile.mkdtemp(prefix="raft-fsync-", dir=options.dir)
    try:
        print(f"{options.groups} groups, one small Ready each per turn, {options.turns} turns, "
              f"files in {base}")
        runs = [
            ("per-group WAL", lambda d: per_group_wals(
                reactor, d, options.groups, options.turns, hard_state_file=False)),
            ("per-group WAL + hardstate.json", lambda d: per_group_wals(
                reactor, d, options.groups, options.turns, hard_state_file=True)),
            ("RaftEngine (one node-wide WAL)", lambda d: one_engine(
                reactor, d, options.groups, options.turns)),
        ]
        for n, (name, run) in enumerate(runs):
            directory = os.path.join(base, str(n))
            os.makedirs(directory)
            times, fsyncs = yield run(directory)
            _report(name, times, fsyncs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, default=13)
    parser.add_argument("--turns", type=int, default=2000)
    parser.add_argument("--dir", default=None, help="where the temporary directory goes")
    task.react(main, [parser.parse_args()])
