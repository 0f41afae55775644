"""Storage lifecycle benchmark: prints figures (never asserts); see bench/README.md.

    python bench/storage.py [--jobs N] [--history-rounds R] [--fire-jobs N] [--skip ...]

1. **history**: builds two data dirs holding ``--jobs`` (1,000,000) far-future jobs
   with a small meta: one written once per job ("no history": ``--jobs`` entries), one
   where every job was then replaced ``--history-rounds - 1`` times (5,000,000 entries).
   Each is built by a real node run in-process (``--build``), every entry proposed
   through its shard log one job per entry, so the WAL, the store apply and compaction
   run exactly as in a node; only HTTP is skipped, to keep the build to minutes.
   Then it starts ``twistd timemachine`` on each data dir twice and prints the time
   from spawn to ``/ready`` (restart time), and the bytes on disk per stored job:
   logs (segment files), stores (SQLite files) and the data dir in all, after the
   build and after the restart (which compacts at open).
2. **acceptance**: a node started as a user would, ``--wal-segment-bytes 1048576
   --retain-fired 5s``, creates and fires ``--fire-jobs`` (300,000) jobs on a webhook
   receiver, sampling the log bytes on disk meanwhile; then it prints the log bytes
   and segments per log at the end, how many fired jobs answer 404, and the job count
   of ``/cluster/shards``.

Only the standard library is used by the orchestrator; ``--build`` runs in the
project's venv (found like bench.py does). Every wait is bounded; every process it
starts is stopped by its PID, and its temp dir removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import (
    REPO,
    Child,
    batch_bodies,
    find_python,
    free_port,
    fs_type,
    post_batches,
    receiver_count,
    request_json,
    start_receiver,
    wait_until,
)

YEAR_MS = 365 * 24 * 3600 * 1000
NODE_ID = "bench"
TARGET_BYTES_PER_JOB = 160
TARGET_RESTART_S = 10.0


def log(message: str) -> None:
    print(f"[storage {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- disk usage ------------------------------------------------------------------------


def disk_usage(data_dir: Path) -> dict:
    """Bytes and segment files of each log, bytes of the stores, and of everything."""
    logs, stores, total = {}, 0, 0
    for root, _dirs, files in os.walk(data_dir):
        for name in files:
            path = Path(root) / name
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                total += size
                if name.endswith(".wal"):
                    entry = logs.setdefault(str(Path(root).relative_to(data_dir)), [0, 0])
                    entry[0] += size
                    entry[1] += 1
                elif ".sqlite" in name:
                    stores += size
    log_bytes = sum(b for b, _ in logs.values())
    return {
        "log_bytes": log_bytes,
        "store_bytes": stores,
        "total_bytes": total,
        "max_segments_per_log": max((n for _, n in logs.values()), default=0),
        "logs": {name: {"bytes": b, "segments": n} for name, (b, n) in sorted(logs.items())},
    }


def per_job(usage: dict, jobs: int) -> dict:
    return {
        key: round(usage[f"{key}_bytes"] / jobs, 1) for key in ("log", "store", "total")
    }


# ---- a node process ----------------------------------------------------------------------


def start_node(python: str, data_dir: Path, log_path: Path, *extra: str):
    """``twistd timemachine`` on ``data_dir``; returns (child, base, seconds to /ready)."""
    http_port, peer_port = free_port(), free_port()
    argv = [
        python, "-m", "twisted", "--log-format=text", "timemachine",
        "--node-id", NODE_ID, "--data-dir", str(data_dir),
        "--http", f"tcp:{http_port}:interface=127.0.0.1",
        "--peer", f"tcp:{peer_port}:interface=127.0.0.1",
        *extra,
    ]
    started = time.monotonic()
    node = Child("node", argv, log_path)
    base = f"http://127.0.0.1:{http_port}"
    ready = wait_until(
        lambda: request_json(base, "GET", "/ready", timeout=2)[0] == 200,
        timeout=600, interval=0.05, alive=node.alive,
    )
    if not ready:
        node.stop()
        raise RuntimeError(f"the node did not become ready; its log ends:\n{node.tail()}")
    return node, base, time.monotonic() - started


def stored_jobs(base: str) -> int:
    status, body = request_json(base, "GET", "/cluster/shards", timeout=60)
    if status != 200:
        raise RuntimeError(f"/cluster/shards answered {status}: {body}")
    return sum(shard["jobs"] for shard in body["shards"])


# ---- 1. history: build in-process, restart with twistd --------------------------------------


def build(data_dir: str, jobs: int, rounds: int, window: int) -> None:
    """(venv only) Propose ``rounds`` x ``jobs`` single-job entries through a real node."""
    import gc

    from twisted.internet import defer, reactor

    from timemachine.domain.commands import PutJobs, PutRoute
    from timemachine.domain.jobs import JobSpec
    from timemachine.domain.routes import Route
    from timemachine.node import Node

    node = Node(reactor, NODE_ID, data_dir, http_endpoint=None)
    result = {}

    @defer.inlineCallbacks
    def run():
        yield node.startService()
        yield node.meta_log.propose(PutRoute(Route("bench", "http",
                                                   webhook_url="http://127.0.0.1:9/")))
        ring = node.coordinator.ring
        logs = {shard: log for shard, (log, _) in node.shard_logs.items()}
        trigger_ms = int(time.time() * 1000) + YEAR_MS
        started = time.monotonic()
        pending = []
        for r in range(rounds):
            for i in range(jobs):
                job_id = f"job-{i}"
                spec = JobSpec("bench", job_id, trigger_ms + i, f'{{"n":{i},"r":{r}}}', "bench")
                pending.append(logs[ring.shard_for(job_id)].propose(PutJobs((spec,))))
                if len(pending) >= window:
                    yield defer.gatherResults(pending)
                    pending = []
            log(f"build: round {r + 1}/{rounds} done, {time.monotonic() - started:.0f} s")
        yield defer.gatherResults(pending)
        result["build_s"] = round(time.monotonic() - started, 1)
        result["entries"] = sum(log.last_index for log in logs.values())
        result["compactions"] = sum(log._compactor.compactions for log in logs.values())
        yield node.stopService()

    def finished(outcome):
        if reactor.running:
            reactor.stop()
        return outcome

    def failed(failure):
        result["error"] = failure.getTraceback()

    gc.disable()  # a build allocates millions of short-lived objects and frees them all
    reactor.callWhenRunning(lambda: run().addErrback(failed).addBoth(finished))
    reactor.run()
    print(json.dumps(result))


def measure_history(python: str, tmp: Path, args) -> dict:
    figures = {}
    for name, rounds in (("no_history", 1), ("history", args.history_rounds)):
        data_dir = tmp / name
        log(f"{name}: building {args.jobs:,} jobs x {rounds} entries each in-process")
        out = subprocess_json(
            [python, str(Path(__file__).resolve()), "--build", str(data_dir),
             "--jobs", str(args.jobs), "--rounds", str(rounds)],
            timeout=args.build_timeout,
        )
        if "error" in out:
            raise RuntimeError(f"build of {name} failed:\n{out['error']}")
        entry = {"rounds": rounds, **out, "after_build": disk_usage(data_dir)}
        restarts = []
        for attempt in range(2):
            node, base, seconds = start_node(python, data_dir, tmp / f"{name}-{attempt}.log")
            try:
                count = stored_jobs(base)
            finally:
                node.stop()
            restarts.append({"ready_s": round(seconds, 2), "jobs": count,
                             "stop": node.stop_how})
            log(f"{name}: restart {attempt + 1}: ready in {seconds:.2f} s, {count:,} jobs")
        entry["restarts"] = restarts
        entry["after_restart"] = disk_usage(data_dir)
        entry["per_job_after_build"] = per_job(entry["after_build"], args.jobs)
        entry["per_job_after_restart"] = per_job(entry["after_restart"], args.jobs)
        figures[name] = entry
        shutil.rmtree(data_dir, ignore_errors=True)
    return figures


def subprocess_json(argv: list[str], timeout: float) -> dict:
    import subprocess

    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    sys.stderr.write(done.stderr[-4000:])
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": f"exit {done.returncode}: {done.stdout[-2000:]}{done.stderr[-2000:]}"}
    return json.loads(lines[-1])


# ---- 2. acceptance: 300,000 jobs created and fired, 1 MiB segments, 5 s retention -------------


def measure_acceptance(python: str, tmp: Path, args) -> dict:
    receiver, receiver_port, _dump = start_receiver(python, tmp)
    receiver_base = f"http://127.0.0.1:{receiver_port}"
    data_dir = tmp / "acceptance"
    node = None
    try:
        node, base, _ = start_node(
            python, data_dir, tmp / "acceptance.log",
            "--wal-segment-bytes", "1048576", "--retain-fired", "5s",
        )
        status, body = request_json(base, "POST", "/route", {
            "id": "hook", "type": "http", "webhook_url": f"{receiver_base}/hook",
        })
        if status != 200:
            raise RuntimeError(f"route: {status} {body}")
        n = args.fire_jobs
        lead_s = args.fire_lead_s
        start_ms = int((time.time() + lead_s) * 1000)
        spread_ms = int(args.fire_spread_s * 1000)
        make_body, n_batches = batch_bodies(
            "acc", "hook", n, 500, lambda i: start_ms + i * spread_ms // n
        )
        log(f"acceptance: creating {n:,} jobs due over {args.fire_spread_s:.0f} s "
            f"from {lead_s:.0f} s on")
        samples = []
        created = post_batches(base, make_body, n_batches, 4, time_limit=lead_s)
        log(f"acceptance: {created['jobs_ok']:,} created in {created['seconds']} s")
        deadline = start_ms / 1000 + args.fire_spread_s + args.fire_grace_s
        delivered = 0
        while time.time() < deadline:
            time.sleep(2.0)
            usage = disk_usage(data_dir)
            with contextlib.suppress(OSError):
                delivered = receiver_count(receiver_base)
            samples.append({"t_s": round(time.time() - start_ms / 1000, 1),
                            "delivered": delivered, "log_bytes": usage["log_bytes"],
                            "max_segments_per_log": usage["max_segments_per_log"]})
            if delivered >= created["jobs_ok"]:
                break
        log(f"acceptance: {delivered:,} delivered; waiting for retention")
        left = None
        purge_deadline = time.monotonic() + 60
        while time.monotonic() < purge_deadline:
            left = stored_jobs(base)
            if left == 0:
                break
            time.sleep(1.0)
        sample_ids = [f"acc-{i}" for i in range(0, n, max(1, n // 200))]
        not_found = sum(
            request_json(base, "GET", f"/job/bench/{job_id}")[0] == 404 for job_id in sample_ids
        )
        metrics_status, metrics = request_json(base, "GET", "/metrics")
        purged = None
        if metrics_status == 200 and isinstance(metrics, str):
            for line in metrics.splitlines():
                if line.startswith("timemachine_jobs_purged_total "):
                    purged = float(line.split()[1])
        final = disk_usage(data_dir)
        return {
            "jobs": n, "created": created["jobs_ok"], "create_s": created["seconds"],
            "delivered": delivered, "jobs_left": left,
            "sampled_404": f"{not_found}/{len(sample_ids)}", "purged_metric": purged,
            "log_bytes_max_during_run": max((s["log_bytes"] for s in samples), default=0),
            "segments_per_log_max_during_run": max(
                (s["max_segments_per_log"] for s in samples), default=0),
            "final": final, "samples": samples,
        }
    finally:
        if node is not None:
            node.stop()
        receiver.stop()


# ---- report --------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    print(f"timeMachine storage benchmark  (data dir on {report['fs']})")
    history = report.get("history")
    if history:
        print("\n1. Restart time and bytes on disk, jobs with a small meta")
        for name, entry in history.items():
            ready = [r["ready_s"] for r in entry["restarts"]]
            print(f"  {name:>10}: {entry['jobs']:,} jobs, {entry['entries']:,} log entries, "
                  f"built in {entry['build_s']} s ({entry['compactions']} compactions)")
            print(f"              restart to /ready: {', '.join(f'{s:.2f} s' for s in ready)}"
                  f"  (target < {TARGET_RESTART_S:.0f} s and equal); jobs after: "
                  f"{entry['restarts'][-1]['jobs']:,}")
            for when in ("after_build", "after_restart"):
                usage, pj = entry[when], entry[f"per_job_{when}"]
                print(f"              {when.replace('_', ' '):>13}: {pj['total']} B/job in all "
                      f"(logs {pj['log']}, stores {pj['store']}; target <= "
                      f"{TARGET_BYTES_PER_JOB}); logs {usage['log_bytes']:,} B, at most "
                      f"{usage['max_segments_per_log']} segments per log")
    acceptance = report.get("acceptance")
    if acceptance:
        a = acceptance
        print("\n2. Acceptance: --wal-segment-bytes 1048576 --retain-fired 5s")
        print(f"  created {a['created']:,} of {a['jobs']:,} in {a['create_s']} s, "
              f"delivered {a['delivered']:,}")
        print(f"  log bytes on disk: at most {a['log_bytes_max_during_run']:,} during the run, "
              f"at most {a['segments_per_log_max_during_run']} segments per log")
        print(f"  at the end: {a['final']['log_bytes']:,} B of logs, at most "
              f"{a['final']['max_segments_per_log']} segments per log; stores "
              f"{a['final']['store_bytes']:,} B")
        for name, entry in a["final"]["logs"].items():
            print(f"    {name}: {entry['bytes']:,} B in {entry['segments']} segment(s)")
        print(f"  /cluster/shards counts {a['jobs_left']} jobs; sampled fired jobs answering "
              f"404: {a['sampled_404']}; timemachine_jobs_purged_total {a['purged_metric']}")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", help="interpreter for the node (default: as bench.py)")
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--history-rounds", type=int, default=5,
                        help="entries per job in the history node (default 5: 5M entries)")
    parser.add_argument("--build-timeout", type=float, default=1800)
    parser.add_argument("--fire-jobs", type=int, default=300_000)
    parser.add_argument("--fire-spread-s", type=float, default=100.0)
    parser.add_argument("--fire-lead-s", type=float, default=30.0)
    parser.add_argument("--fire-grace-s", type=float, default=120.0)
    parser.add_argument("--skip", action="append", default=[],
                        choices=["history", "acceptance"])
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "storage.json"))
    # internal: the in-process build, run by the orchestrator in the venv
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--window", type=int, default=4000, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.build:
        build(args.build, args.jobs, args.rounds, args.window)
        return 0
    python = find_python(args.python)
    tmp = Path(tempfile.mkdtemp(prefix="tm-storage-bench-"))
    report = {"fs": fs_type(tmp), "args": vars(args)}
    try:
        if "history" not in args.skip:
            report["history"] = measure_history(python, tmp, args)
            for entry in report["history"].values():
                entry["jobs"] = args.jobs
        if "acceptance" not in args.skip:
            report["acceptance"] = measure_acceptance(python, tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
