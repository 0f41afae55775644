"""Firing lateness while a node restarts with 200,000 jobs due inside its window.

    python bench/restart_firing.py [--jobs 200000] [--head-rate 1000] [--head-s 15]

A node (``twistd timemachine``, temp data dir) and bench/receiver.py are started and
``--jobs`` jobs created through the REST API in batches of 500, all due within the
executor's 60 s window counted from a planned restart: a *head* at ``--head-rate``
fires/s (1,000: what this machine delivers on time) from the restart on, for
``--head-s`` s, and the rest, the *tail*, spread over ``--tail-from-s`` ..
``--tail-until-s`` s after it (far more per second than the node delivers: reported
apart). The node is stopped with SIGTERM and started again on the same data dir at
the planned time; it takes in the whole window before ``/ready`` answers. The
receiver's records give every delivery's lateness (arrival - trigger_ms), printed for
the jobs due while the node restarted (spawn to ``/ready``), in the first 5 s after
``/ready``, the head, the tail and all, with early, duplicate and missing deliveries
and the restart time. See bench/README.md. Prints figures, asserts nothing; every
process started is stopped by its PID and the temp dir removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from storage import start_node, stored_jobs

from bench import (
    REPO,
    batch_bodies,
    delivery_figures,
    find_python,
    fs_type,
    lateness_by_second,
    lateness_figures,
    node_log_problems,
    node_metrics,
    post_batches,
    receiver_count,
    request_json,
    start_receiver,
)

WINDOW_S = 60.0  # the executor's due window (timemachine.firing.executor)
AFTER_READY_S = 5.0
ROUTE = "restart"
TARGET_P99_MS = 10.0


def log(message: str) -> None:
    print(f"[restart {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def layout(args, spawn_ms: int):
    """``trigger_of(n)`` for job n: the head at ``head_rate``/s from the restart on,
    then the tail spread evenly over its span; returns it with the head's job count."""
    head = min(args.jobs, int(args.head_rate * args.head_s))
    tail = args.jobs - head
    tail_from = spawn_ms + int(args.tail_from_s * 1000)
    tail_span = int((args.tail_until_s - args.tail_from_s) * 1000)

    def trigger_of(n: int) -> int:
        if n < head:
            return spawn_ms + n * 1000 // max(args.head_rate, 1)
        return tail_from + (n - head) * tail_span // max(tail, 1)

    return trigger_of, head


def group(name: str, ids: list[str], first_lateness: dict[str, float]) -> dict:
    """Lateness of the jobs ``ids`` that were delivered, with how many were due."""
    values = sorted(first_lateness[i] for i in ids if i in first_lateness)
    return {"name": name, "due": len(ids), "delivered": len(values),
            **lateness_figures(values)}


def first_delivery_by_shard(records: list, scheduled: dict[str, int], spawn_s: float):
    """Seconds from the spawn to each shard's first delivery ({shard: s}), or None
    when this interpreter cannot import the placement rule (not the project's venv).

    A shard fires only once its window is read: a late first delivery points at the
    read of that shard's window, not at the timer.
    """
    try:
        from timemachine.cluster.ring import DEFAULT_SHARDS, shard_of
    except ImportError:
        return None
    first: dict[int, float] = {}
    for job_id, _trigger, arrival_s, _attempt in records:
        if job_id in scheduled:
            shard = shard_of(job_id, DEFAULT_SHARDS)
            first[shard] = min(first.get(shard, arrival_s), arrival_s)
    return {shard: round(first[shard] - spawn_s, 2) for shard in sorted(first)}


def wait_for_deliveries(base: str, expected: int, not_before_s: float,
                        deadline_s: float) -> float | None:
    """Wait until the node has recorded ``expected`` outcomes (its /metrics), at most
    until ``deadline_s`` (wall clock); returns when that happened, or None.

    Nothing is asked before ``not_before_s`` (the head is being measured then), and
    the receiver is not polled: its dump of every record would stall deliveries.
    """
    time.sleep(max(0.0, not_before_s - time.time()))
    while time.time() < deadline_s:
        metrics = node_metrics(base)
        done = metrics.get("timemachine_jobs_fired_total", 0) + metrics.get(
            "timemachine_jobs_failed_total", 0)
        if done >= expected:
            return time.time()
        time.sleep(1.0)
    return None


def run(args, tmp: Path, report: dict) -> None:
    python = find_python(args.python)
    data_dir = tmp / "node-data"
    children = []
    try:
        receiver, receiver_port, dump = start_receiver(python, tmp)
        children.append(receiver)
        node, base, first_start_s = start_node(python, data_dir, tmp / "node-1.log")
        children.append(node)
        status, body = request_json(base, "POST", "/route", {
            "id": ROUTE, "type": "http",
            "webhook_url": f"http://127.0.0.1:{receiver_port}/hook",
        })
        if status != 200:
            raise RuntimeError(f"could not create the route: {status} {body}")

        planned_spawn_s = time.time() + args.create_budget_s
        spawn_ms = int(planned_spawn_s * 1000)
        trigger_of, head = layout(args, spawn_ms)
        make_body, n_batches = batch_bodies("rs", ROUTE, args.jobs, 500, trigger_of)
        log(f"creating {args.jobs:,} jobs ({head:,} in the head) in batches of 500")
        created = post_batches(base, make_body, n_batches, args.batch_conns,
                               time_limit=args.create_budget_s - args.stop_budget_s,
                               want_ids=True)
        scheduled = {i: trigger_of(int(i.rsplit("-", 1)[1])) for i in created.pop("ok_ids")}
        on_disk = stored_jobs(base)
        log(f"{created['jobs_ok']:,} created in {created['seconds']} s; stopping the node")
        node.stop()
        report["create"] = {**created, "stored_before_stop": on_disk,
                            "first_start_s": round(first_start_s, 2),
                            "stop": node.stop_how, "stop_s": round(node.stop_seconds or 0, 2)}

        time.sleep(max(0.0, planned_spawn_s - time.time()))
        log("restarting the node on the same data dir")
        spawn_s = time.time()
        node, base, _ = start_node(python, data_dir, tmp / "node-2.log")
        ready_s = time.time()
        children.append(node)
        ready_ms = int(ready_s * 1000)
        log(f"/ready after {ready_s - spawn_s:.2f} s; waiting for the deliveries")

        last_trigger_s = max(scheduled.values(), default=spawn_ms) / 1000
        finished = wait_for_deliveries(
            base, len(scheduled), not_before_s=spawn_ms / 1000 + args.head_s + 1,
            deadline_s=last_trigger_s + args.grace_s,
        )
        # Late duplicates still show up.
        time.sleep(1.0)
        receiver_count(f"http://127.0.0.1:{receiver_port}")  # writes the dump file
        dumped = json.loads(dump.read_text())
        records = dumped["records"]
        metrics = node_metrics(base)
    finally:
        for child in reversed(children):
            child.stop()
        report["stopped"] = {c.name: c.stop_how for c in children}
    restart_log = tmp / "node-2.log"
    report["node_log"] = node_log_problems(restart_log)
    # Kept for a closer look next to the report: the temp dir goes away.
    with contextlib.suppress(OSError):
        shutil.copyfile(restart_log, Path(args.out).with_suffix(".node.log"))
        shutil.copyfile(dump, Path(args.out).with_suffix(".deliveries.json"))

    figures, first_lateness = delivery_figures(records, scheduled)
    arrivals = sorted(r[2] for r in records if r[0] in scheduled)
    ids = sorted(scheduled, key=scheduled.__getitem__)
    in_head = {i: int(i.rsplit("-", 1)[1]) < head for i in ids}
    head_ids = [i for i in ids if in_head[i]]
    report["restart"] = {
        "spawn_late_by_s": round(spawn_s - planned_spawn_s, 3),
        "ready_s": round(ready_s - spawn_s, 2),
        "first_delivery_after_spawn_s": (
            round(arrivals[0] - spawn_s, 2) if arrivals else None),
        "all_recorded_after_spawn_s": (
            round(finished - spawn_s, 1) if finished is not None else None),
        "node_jobs_fired": metrics.get("timemachine_jobs_fired_total"),
        "node_lateness_count": metrics.get("timemachine_firing_lateness_seconds_count"),
    }
    report["jobs"] = len(scheduled)
    report["head_jobs"] = len(head_ids)
    report["all"] = figures
    report["groups"] = [
        group("due while restarting (spawn to /ready)",
              [i for i in ids if scheduled[i] < ready_ms], first_lateness),
        group(f"due in the first {AFTER_READY_S:g} s after /ready",
              [i for i in ids if ready_ms <= scheduled[i] < ready_ms + AFTER_READY_S * 1000],
              first_lateness),
        # Split, because the first second after /ready also drains what fell due
        # while the node was starting.
        group("  of which in the first 1 s",
              [i for i in ids if ready_ms <= scheduled[i] < ready_ms + 1000], first_lateness),
        group(f"  of which 1-{AFTER_READY_S:g} s after",
              [i for i in ids
               if ready_ms + 1000 <= scheduled[i] < ready_ms + AFTER_READY_S * 1000],
              first_lateness),
        group(f"head ({args.head_rate:,}/s for {args.head_s:g} s from the spawn)", head_ids,
              first_lateness),
        group(f"tail (due {args.tail_from_s:g}-{args.tail_until_s:g} s after the spawn)",
              [i for i in ids if not in_head[i]], first_lateness),
    ]
    report["by_second_after_spawn"] = lateness_by_second(first_lateness, scheduled, spawn_ms)
    report["first_delivery_by_shard_s"] = first_delivery_by_shard(records, scheduled, spawn_s)
    report["receiver_connections"] = dumped.get("connections")


def print_report(report: dict, args) -> None:
    p = print
    c, r, a = report["create"], report["restart"], report["all"]
    p(f"timeMachine firing across a restart with {report['jobs']:,} jobs due in the window "
      f"(data dir on {report['fs']})")
    p(f"  layout: head {report['head_jobs']:,} jobs at {args.head_rate:,}/s from the "
      f"spawn on; tail {report['jobs'] - report['head_jobs']:,} jobs due "
      f"{args.tail_from_s:g}-{args.tail_until_s:g} s after the spawn (window {WINDOW_S:g} s)")
    p(f"  created {c['jobs_ok']:,} in {c['seconds']} s ({c['jobs_per_s']:,.0f} jobs/s, "
      f"errors {c['errors'] or 'none'}); {c['stored_before_stop']:,} stored; stopped by "
      f"{c['stop']} in {c['stop_s']} s")
    p(f"  restart: /ready {r['ready_s']} s after spawn (spawned {r['spawn_late_by_s']} s "
      f"after the plan); first delivery {r['first_delivery_after_spawn_s']} s after spawn; "
      f"all outcomes recorded {r['all_recorded_after_spawn_s']} s after spawn")
    p(f"  all: delivered {a['delivered']:,}/{report['jobs']:,}, early {a['early']}, "
      f"duplicates {a['duplicates']}, missing {a['missing']}, retried "
      f"{a['retried_deliveries']}, trigger header mismatches {a['trigger_header_mismatch']}")
    p("  lateness (arrival - trigger_ms), ms:")
    for g in [*report["groups"], {"name": "all", "due": report["jobs"], **a}]:
        p(f"    {g['name']:<48} due {g['due']:>7,}: p50 {g['lateness_p50_ms']}, p90 "
          f"{g['lateness_p90_ms']}, p99 {g['lateness_p99_ms']}, p99.9 "
          f"{g['lateness_p999_ms']}, max {g['lateness_max_ms']}, early {g['early']}")
    p(f"  (target for jobs due after /ready: p99 <= {TARGET_P99_MS:g} ms, none early, "
      f"duplicated or missing)")
    p("  by second of trigger after the spawn (head):")
    for row in report["by_second_after_spawn"]:
        if row["second"] < args.head_s:
            p(f"    {row['second']:>3}: {row['delivered']:>6,} delivered, p50 {row['p50_ms']}, "
              f"p99 {row['p99_ms']}, max {row['max_ms']} ms")
    by_shard = report["first_delivery_by_shard_s"]
    if by_shard:
        p("  first delivery of each shard, s after the spawn: "
          + ", ".join(f"{shard}: {s}" for shard, s in by_shard.items()))
    n = report["node_log"]
    p(f"  restarted node's log: {n.get('tracebacks', 0)} tracebacks, "
      f"{n.get('warn_error_critical', 0)} warn/error/critical lines; stopped: "
      + ", ".join(f"{k} ({v})" for k, v in report["stopped"].items()))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", help="interpreter for the node (default: as bench.py)")
    parser.add_argument("--jobs", type=int, default=200_000)
    parser.add_argument("--head-rate", type=int, default=1000,
                        help="jobs due per second from the restart on (default 1,000)")
    parser.add_argument("--head-s", type=float, default=15.0)
    parser.add_argument("--tail-from-s", type=float, default=20.0)
    parser.add_argument("--tail-until-s", type=float, default=55.0)
    parser.add_argument("--create-budget-s", type=float, default=30.0,
                        help="from the first create to the planned restart")
    parser.add_argument("--stop-budget-s", type=float, default=8.0,
                        help="of the create budget, kept for the stop")
    parser.add_argument("--batch-conns", type=int, default=4)
    parser.add_argument("--grace-s", type=float, default=300.0,
                        help="wait at most this long after the last trigger")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "restart_firing.json"))
    args = parser.parse_args(argv)
    if max(args.head_s, args.tail_until_s) >= WINDOW_S:
        parser.error(f"every job must be due within the {WINDOW_S:g} s window of the restart")
    if args.tail_until_s < args.tail_from_s:
        parser.error("--tail-until-s must not be before --tail-from-s")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="tm-restart-bench-"))
    report = {"fs": fs_type(tmp), "args": vars(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    try:
        run(args, tmp, report)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
