"""Soak the Raft core in the seeded simulation, and measure its simulated throughput.

Prints:

* the soak: how many seeds of `timemachine.raft.sim.chaos_run` ran (crashes, also at
  every step of persisting a Ready - `timemachine.raft.sim.CRASH_POINTS` - partitions,
  drops, duplicates, reordering, snapshots, membership changes, clocks drifting apart,
  byte-bounded batches, then heal and prove a new proposal commits everywhere), how
  many ticks they took, how many invariant violations they found (the lease checks
  included; must be 0; the failing seeds and the first report are printed) and how
  long it took;
* throughput: entries committed per second of wall clock through a simulated 3-node
  cluster on a reliable network, proposals arriving every tick (the cost of the core
  and the simulation in Python, not of any disk or network).

Usage (from the repository root)::

    .venv/bin/python bench/raft_sim.py                # 10,000 seeds
    .venv/bin/python bench/raft_sim.py --seeds 500 --jobs 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from timemachine.raft.sim import SimCluster, chaos_run


def _one(seed: int) -> tuple[int, int, int, str | None]:
    """Run one soak seed: (seed, ticks, committed, failure report or None)."""
    try:
        r = chaos_run(seed, ticks=120)
    except AssertionError as e:
        return seed, 0, 0, str(e)
    return seed, r.ticks, r.committed, None


def soak(seeds: range, jobs: int) -> None:
    start = time.perf_counter()
    failures: list[tuple[int, str]] = []
    ticks = committed = 0
    if jobs > 1:
        with multiprocessing.Pool(jobs) as pool:
            results = pool.imap_unordered(_one, seeds, chunksize=16)
            for seed, t, n, err in results:
                ticks, committed = ticks + t, committed + n
                if err is not None:
                    failures.append((seed, err))
    else:
        for seed in seeds:
            _, t, n, err = _one(seed)
            ticks, committed = ticks + t, committed + n
            if err is not None:
                failures.append((seed, err))
    elapsed = time.perf_counter() - start
    print(
        f"soak: {len(seeds)} seeds ({seeds.start}..{seeds.stop - 1}), {ticks} ticks, "
        f"{committed} entries committed, {elapsed:.1f} s wall ({jobs} job(s))"
    )
    print(f"violations: {len(failures)}")
    if failures:
        failures.sort()
        print("failing seeds:", " ".join(str(s) for s, _ in failures[:50]))
        print(failures[0][1][:4000])


def throughput(ticks: int, per_tick: int) -> None:
    c = SimCluster(n=3, seed=1, auto_check=False)
    c.run_until(lambda: c.leader() is not None, 200)
    start_index = c.commit_index(c.leader())
    k = 0
    start = time.perf_counter()
    for _ in range(ticks):
        for _ in range(per_tick):
            c.propose(b"bench-%d" % k)
            k += 1
        c.tick()
    c.run_until(
        lambda: all(c.applied_index(i) >= c.commit_index(c.leader()) for i in range(3)), 100
    )
    elapsed = time.perf_counter() - start
    c.check()
    lead = c.leader()
    committed = c.commit_index(lead) - start_index
    print(
        f"throughput: 3-node cluster, reliable network, {per_tick} proposals per tick: "
        f"{committed} entries committed in {elapsed:.2f} s wall = "
        f"{committed / elapsed:,.0f} entries/s (invariants checked once at the end)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=10_000, help="soak seeds to run")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="worker processes for the soak")
    p.add_argument("--ticks", type=int, default=2000, help="ticks of the throughput run")
    p.add_argument("--per-tick", type=int, default=10, help="proposals per tick")
    args = p.parse_args()
    throughput(args.ticks, args.per_tick)
    soak(range(args.first_seed, args.first_seed + args.seeds), args.jobs)


if __name__ == "__main__":
    main()
