"""timeMachine benchmark: prints figures (never asserts); see bench/README.md.

    python bench/bench.py [--quick] [--target http://127.0.0.1:PORT [--target-pid PID]]
    python bench/bench.py --target http://127.0.0.1:8001,http://127.0.0.2:8002 ...

End to end it:

1. starts a node (``python -m twisted timemachine``, temp data dir, free ports) unless
   ``--target`` names running ones (several: the nodes of one cluster), starts a
   webhook receiver (bench/receiver.py) and creates a route pointing at it;
2. runs wrk with bench/create.lua (single creates, keep-alive) against the node (with
   several targets, one wrk per target at once, the connections shared out) and
   against bench/noop_server.py, and prints both rates, their ratio, and the CPU
   each spent per request (summed over ``--cluster-pids`` for a cluster);
3. posts batches of 500 jobs from a few keep-alive connections (jobs/s), each batch
   to a target picked at random;
4. schedules jobs to fire over a few seconds and measures, at the receiver, how late
   each delivery arrives; counts early, duplicate and missing deliveries;
5. reads the node's VmRSS before, after the creates, and after loading far-future jobs;
6. prints the machine facts, writes the report to bench/out/report.json, and stops
   every process it started (by PID), removing its temp dir.

Only the standard library is used here, so the script runs under any Python 3.10+;
the processes it starts (node, receiver, no-op server) need the project's venv,
found as described under ``--python``. Every loop is bounded by a count and a
deadline, and all traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.util
import json
import os
import platform
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
DEFAULT_OUT = BENCH_DIR / "out" / "report.json"
COLLECTION = "bench"
YEAR_MS = 365 * 24 * 3600 * 1000

# Targets from the brief; the report says how each figure compares, nothing fails.
TARGET_CREATE_RPS = 2000
TARGET_CREATE_RATIO = 0.70
TARGET_BATCH_JOBS_S = 20_000
TARGET_LATENESS_P99_MS = 10.0
TARGET_RSS_MB_PER_1M = 300.0


# ---- small helpers ---------------------------------------------------------------------


def log(message: str) -> None:
    """Progress on stderr, so that stdout carries only the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 free right now (another process may still take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(sorted_values: list[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile of an ascending list (None if empty)."""
    if not sorted_values:
        return None
    rank = max(1, int(-(-p * len(sorted_values) // 100)))  # ceil without floats drifting
    return sorted_values[min(rank, len(sorted_values)) - 1]


def rounded(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def fmt_num(value, digits: int = 0, unit: str = "") -> str:
    """A number with thousands separators, or "n/a"."""
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def verdict(met: bool | None) -> str:
    return {True: "[meets target]", False: "[MISSES target]", None: "[no figure]"}[met]


def request_json(
    base: str, method: str, path: str, body=None, timeout: float = 30.0
) -> tuple[int, object]:
    """One HTTP request on a fresh connection; returns (status, parsed JSON or text)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, data, headers)
        response = conn.getresponse()
        raw = response.read()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode("utf-8", "replace")
    finally:
        conn.close()


def wait_until(predicate, timeout: float, interval: float = 0.1, alive=None) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` s pass (or ``alive()`` is false)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            return False
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return True
        time.sleep(interval)
    return False


def read_rss(pid: int | None) -> dict | None:
    """VmRSS and VmHWM (peak) of ``pid`` in MB, from /proc/PID/status."""
    if pid is None:
        return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values = {}
    for key in ("VmRSS", "VmHWM"):
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        values[key] = round(int(match.group(1)) / 1024, 1) if match else None
    return {"rss_mb": values["VmRSS"], "peak_rss_mb": values["VmHWM"]}


def stored_jobs(base: str) -> int | None:
    """Jobs the node stores, summed over ``GET /cluster/shards`` (None if unavailable)."""
    try:
        status, body = request_json(base, "GET", "/cluster/shards", timeout=60)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200 or not isinstance(body, dict):
        return None
    return sum(int(shard.get("jobs") or 0) for shard in body.get("shards", []))


def cpu_seconds(pid: int | None, main_thread_only: bool = False) -> float | None:
    """User + system CPU seconds ``pid`` has used, from /proc/PID/stat.

    All threads by default; with ``main_thread_only`` the reactor thread's alone
    (its thread id is the PID), which tells a saturated reactor from busy worker
    threads (WAL fsync, SQLite).
    """
    if pid is None:
        return None
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """The CPU a set of processes spends from now on, summed over them."""

    def __init__(self, pids: list[int]):
        self.pids = pids
        self.start = self._total()

    def _total(self) -> float | None:
        seconds = [cpu_seconds(pid) for pid in self.pids]
        return None if not seconds or None in seconds else sum(seconds)

    def ms_per(self, requests: int | None) -> float | None:
        """Milliseconds of CPU per request since the meter was made (None: unknown)."""
        now = self._total()
        if self.start is None or now is None or not requests:
            return None
        return round((now - self.start) * 1000 / requests, 3)


def node_metrics(base: str) -> dict[str, float]:
    """The node's ``/metrics`` as {name or name{le}: value}, summed over other labels."""
    try:
        status, text = request_json(base, "GET", "/metrics", timeout=30)
    except (OSError, http.client.HTTPException):
        return {}
    if status != 200 or not isinstance(text, str):
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = re.match(r"^(timemachine_\w+)(\{[^}]*\})?\s+(\S+)$", line)
        if not match:
            continue
        name, labels, value = match.groups()
        le = re.search(r'le="([^"]+)"', labels or "")
        key = f"{name}{{{le.group(1)}}}" if le else name
        values[key] = values.get(key, 0.0) + float(value)
    return values


class Probe:
    """Node CPU time and metrics over one phase: what the node spent on the work."""

    def __init__(self, base: str, pid: int | None):
        self.base, self.pid = base, pid
        self.wall = time.monotonic()
        self.cpu = cpu_seconds(pid)
        self.main_cpu = cpu_seconds(pid, main_thread_only=True)
        self.metrics = node_metrics(base)

    def done(self, jobs: int | None = None) -> dict:
        """Node CPU use, WAL fsyncs and (when jobs fired) node-side lateness since start."""
        wall = time.monotonic() - self.wall
        cpu = cpu_seconds(self.pid)
        main_cpu = cpu_seconds(self.pid, main_thread_only=True)
        after = node_metrics(self.base)

        def delta(name: str) -> float:
            return after.get(name, 0.0) - self.metrics.get(name, 0.0)

        out: dict = {"wall_s": round(wall, 2)}
        if cpu is not None and self.cpu is not None and wall > 0:
            # Percent of one CPU: ~100 means the reactor thread is saturated.
            out["node_cpu_percent"] = round((cpu - self.cpu) * 100 / wall)
            if main_cpu is not None and self.main_cpu is not None:
                out["reactor_thread_cpu_percent"] = round((main_cpu - self.main_cpu) * 100 / wall)
        fsyncs = delta("timemachine_wal_fsync_seconds_count")
        if fsyncs:
            out["wal_fsyncs"] = int(fsyncs)
            out["wal_fsync_mean_ms"] = round(
                delta("timemachine_wal_fsync_seconds_sum") * 1000 / fsyncs, 2)
            if jobs:
                out["jobs_per_wal_fsync"] = round(jobs / fsyncs, 1)
        fired = delta("timemachine_firing_lateness_seconds_count")
        if fired:
            out["node_lateness_mean_ms"] = round(
                delta("timemachine_firing_lateness_seconds_sum") * 1000 / fired, 1)
            # The upper bound of the bucket holding the 99th percentile.
            buckets = sorted(
                (float(key.split("{")[1][:-1]), delta(key)) for key in after
                if key.startswith("timemachine_firing_lateness_seconds_bucket{")
            )
            for bound, count in buckets:
                if count >= 0.99 * fired:
                    out["node_lateness_p99_bucket_ms"] = bound * 1000
                    break
        return out


def find_python(explicit: str | None) -> str:
    """The interpreter for the node and helpers: one that can import twisted and klein."""
    if explicit:
        return explicit
    if importlib.util.find_spec("twisted") and importlib.util.find_spec("klein"):
        return sys.executable
    for candidate in (
        os.environ.get("TM_BENCH_PYTHON"),
        str(REPO / ".venv" / "bin" / "python"),
        "/work/venv/bin/python",
    ):
        if candidate and Path(candidate).exists():
            return candidate
    return sys.executable


def fs_type(path: Path) -> str:
    """The filesystem type holding ``path`` (fsync cost depends on it: tmpfs is free)."""
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    resolved = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and resolved.startswith(fields[1]) and len(fields[1]) > len(best):
            best, kind = fields[1], fields[2]
    return kind


def machine_facts(python: str, data_root: Path) -> dict:
    """nproc, Python versions, CPU model, kernel, wrk version, data dir filesystem."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    node_python = subprocess.run(
        [python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True, text=True, timeout=30,
    ).stdout.strip()
    wrk = shutil.which("wrk")
    wrk_version = None
    if wrk:
        out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10)
        wrk_version = (out.stdout + out.stderr).strip().splitlines()[0:1]
        wrk_version = wrk_version[0] if wrk_version else None
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu": cpu,
        "python_node": node_python,
        "python_bench": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version,
        "data_dir_fs": fs_type(data_root),
    }


# ---- processes we start ------------------------------------------------------------------


class Child:
    """A process started by the benchmark; stopped by its PID only."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path = REPO):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - lives as long as the process
        # stdout to a file, never a pipe: an undrained pipe would block the child.
        self.proc = subprocess.Popen(
            argv, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.pid = self.proc.pid
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None
        self.stop_how: str | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; records how long it took."""
        if self.stop_how is not None:
            return
        if self.proc.poll() is None:
            started = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
                self.stop_how = "SIGTERM"
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.stop_how = f"SIGKILL after {grace:.0f} s"
            self.stop_seconds = time.monotonic() - started
        else:
            self.stop_how = f"had exited (code {self.proc.returncode})"
        self._log.close()

    def tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


def start_node(python: str, tmp: Path, shards: int | None) -> tuple[Child, str]:
    """A node on a fresh data dir and free ports; returns it once ``/ready`` is 200."""
    http_port, peer_port = free_port(), free_port()
    argv = [
        python, "-m", "twisted", "--log-format=text", "timemachine",
        "--node-id", "bench",
        "--data-dir", str(tmp / "node-data"),
        "--http", f"tcp:{http_port}:interface=127.0.0.1",
        "--peer", f"tcp:{peer_port}:interface=127.0.0.1",
    ]
    if shards:
        argv += ["--shards", str(shards)]
    node = Child("node", argv, tmp / "node.log")
    base = f"http://127.0.0.1:{http_port}"
    started = time.monotonic()
    ready = wait_until(
        lambda: request_json(base, "GET", "/ready", timeout=2)[0] == 200,
        timeout=90, interval=0.2, alive=node.alive,
    )
    if not ready:
        raise RuntimeError(f"the node did not become ready; its log ends:\n{node.tail()}")
    node.start_seconds = time.monotonic() - started
    return node, base


def start_receiver(python: str, tmp: Path) -> tuple[Child, int, Path]:
    """bench/receiver.py on a free port; returns it with its port and dump file."""
    port = free_port()
    dump = tmp / "deliveries.json"
    ready_file = tmp / "receiver.ready"
    receiver = Child(
        "receiver",
        [python, str(BENCH_DIR / "receiver.py"), "--port", str(port), "--dump", str(dump),
         "--ready-file", str(ready_file)],
        tmp / "receiver.log",
    )
    if not wait_until(ready_file.exists, timeout=30, alive=receiver.alive):
        raise RuntimeError(f"the receiver did not start:\n{receiver.tail()}")
    return receiver, port, dump


def start_noop(python: str, tmp: Path) -> tuple[Child, str]:
    port = free_port()
    noop = Child(
        "noop", [python, str(BENCH_DIR / "noop_server.py"), "--port", str(port)],
        tmp / "noop.log",
    )
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        # Any HTTP answer means it listens (GET is not a route of the no-op).
        return request_json(base, "GET", "/", timeout=2)[0] > 0

    if not wait_until(answers, timeout=30, alive=noop.alive):
        raise RuntimeError(f"the no-op server did not start:\n{noop.tail()}")
    return noop, base


# ---- 2. single creates with wrk --------------------------------------------------------------


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(bases: list[str], route: str, prefix: str, args) -> dict:
    """wrk with create.lua against each of ``bases``/job/bench at once, the
    connections (and threads) shared out between them; returns the figures, summed
    over the targets (latencies: the worst target's)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "wrk is not installed (apt-get install -y wrk)"}
    children_cpu = _children_cpu()
    results: list[dict] = [{}] * len(bases)

    def one(i: int) -> None:
        conns = args.wrk_conns // len(bases) + (i < args.wrk_conns % len(bases))
        threads = max(1, min(conns, args.wrk_threads // len(bases)))
        # Each target's ids of their own: the wrk threads of two runs number alike.
        results[i] = _one_wrk(bases[i], route, f"{prefix}-{i}", threads, conns, args)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(bases))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    # wrk runs on the same 2 CPUs as the server: what it used is part of the picture.
    wrk_cpu = _children_cpu() - children_cpu
    combined = results[0] if len(results) == 1 else _summed(results)
    if "error" not in combined:
        combined["wrk_cpu_percent"] = round(wrk_cpu * 100 / args.wrk_duration)
    return combined


def _summed(results: list[dict]) -> dict:
    """The figures of wrk runs made at once against several targets, as one."""
    combined: dict = {"per_target": results}
    failed = [r for r in results if r.get("requests_per_s") is None]
    if failed:
        combined["error"] = "; ".join(r.get("error", "no figure") for r in failed)
        return combined
    combined["command"] = " & ".join(r["command"] for r in results)
    for key in ("requests_per_s", "non_2xx", "requests", "ok_per_s"):
        combined[key] = round(sum(r.get(key) or 0 for r in results), 1)
    combined["socket_errors"] = {
        kind: sum(r["socket_errors"][kind] for r in results)
        for kind in ("connect", "read", "write", "timeout")
    }
    for key in ("latency_p50_ms", "latency_p99_ms", "latency_max_ms"):
        combined[key] = max((r.get(key) or 0) for r in results)
    return combined


def _one_wrk(base: str, route: str, prefix: str, threads: int, conns: int, args) -> dict:
    wrk = shutil.which("wrk")
    argv = [
        wrk, f"-t{threads}", f"-c{conns}", f"-d{args.wrk_duration}s",
        "-s", str(BENCH_DIR / "create.lua"), f"{base}/job/{COLLECTION}", "--", route, prefix,
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=args.wrk_duration + 60)
    text = out.stdout + out.stderr
    result: dict = {"command": " ".join(["wrk", *argv[1:]])}
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    result["requests_per_s"] = float(match.group(1)) if match else None
    match = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    result["non_2xx"] = int(match.group(1)) if match else 0
    match = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    result["socket_errors"] = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups()), strict=True))
        if match else {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    )
    match = re.search(r"^WRK_JSON (\{.*\})$", text, re.M)
    if match:
        figures = json.loads(match.group(1))
        result["requests"] = figures["requests"]
        result["latency_p50_ms"] = figures["latency_p50_us"] / 1000
        result["latency_p99_ms"] = figures["latency_p99_us"] / 1000
        result["latency_max_ms"] = figures["latency_max_us"] / 1000
        seconds = figures["duration_us"] / 1e6
        result["ok_per_s"] = round((figures["requests"] - result["non_2xx"]) / seconds, 1)
    if result["requests_per_s"] is None:
        result["error"] = f"could not parse wrk output (exit {out.returncode}): {text[-500:]}"
    return result


# ---- 3. batches ---------------------------------------------------------------------------------


def job_line(job_id: str, trigger_ms: int, route: str, n: int) -> str:
    """One job as JSON text (formatted by hand: the client must stay cheap)."""
    return (
        f'{{"id":"{job_id}","trigger_ms":{trigger_ms},"meta":{{"n":{n}}},'
        f'"route":"{route}"}}'
    )


def post_batches(bases: list[str], make_body, n_batches: int, conns: int, time_limit: float,
                 want_ids: bool = False) -> dict:
    """POST ``n_batches`` bodies (``make_body(i)`` -> (bytes, job count)) from ``conns``
    threads, each batch to one of ``bases`` picked at random; the figures and, with
    ``want_ids``, the ids the node acknowledged.

    Each thread keeps one keep-alive ``http.client`` connection per target and has at
    most one batch outstanding, as a real client would. Plain threads rather than treq: bodies
    are formatted by hand and answers parsed by the C json module, so the client uses
    a few percent of one CPU (reported as ``client_cpu_percent``) and the node, not the
    client, sets the pace. Stops starting batches after ``time_limit`` seconds and
    says so (``time_limit_hit``).
    """
    targets = [urlsplit(base) for base in bases]
    lock = threading.Lock()
    state = {"next": 0, "limit_hit": False}
    ok_ids: list[str] = []
    totals = {"jobs_sent": 0, "jobs_ok": 0, "batches": 0}
    errors: dict[str, int] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + time_limit

    def count_error(code: str, n: int) -> None:
        with lock:
            errors[code] = errors.get(code, 0) + n

    def worker(seed: int) -> None:
        pick = random.Random(seed)
        connections: dict[int, http.client.HTTPConnection] = {}
        try:
            while True:
                with lock:
                    index = state["next"]
                    if index >= n_batches:
                        return
                    if time.monotonic() > deadline:
                        state["limit_hit"] = True
                        return
                    state["next"] += 1
                body, n_jobs = make_body(index)
                target = pick.randrange(len(targets))
                if target not in connections:
                    parts = targets[target]
                    connections[target] = http.client.HTTPConnection(
                        parts.hostname, parts.port, timeout=120
                    )
                conn = connections[target]
                sent = time.perf_counter()
                try:
                    conn.request("POST", f"/job/{COLLECTION}", body,
                                 {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    raw = response.read()
                except (OSError, http.client.HTTPException) as e:
                    count_error(f"transport: {type(e).__name__}", n_jobs)
                    conn.close()
                    del connections[target]
                    continue
                elapsed = time.perf_counter() - sent
                local_ok, local_ids, local_errors = 0, [], {}
                if response.status == 200:
                    for item in json.loads(raw).get("results", []):
                        if item.get("status") == "ok":
                            local_ok += 1
                            if want_ids:
                                local_ids.append(item.get("id"))
                        else:
                            code = item.get("code", "?")
                            local_errors[code] = local_errors.get(code, 0) + 1
                else:
                    try:
                        code = json.loads(raw).get("code", "?")
                    except (ValueError, AttributeError):
                        code = "?"
                    local_errors[f"HTTP {response.status} {code}"] = n_jobs
                with lock:
                    totals["jobs_sent"] += n_jobs
                    totals["jobs_ok"] += local_ok
                    totals["batches"] += 1
                    latencies.append(elapsed)
                    ok_ids.extend(local_ids)
                    for code, n in local_errors.items():
                        errors[code] = errors.get(code, 0) + n
        finally:
            for conn in connections.values():
                conn.close()

    started = time.perf_counter()
    client_cpu = time.process_time()
    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A hung node must not hang the benchmark: 120 s socket timeout + margin.
        thread.join(max(1.0, deadline - time.monotonic()) + 130)
    elapsed = time.perf_counter() - started
    client_cpu = time.process_time() - client_cpu
    latencies_ms = sorted(seconds * 1000 for seconds in latencies)
    return {
        **totals,
        "seconds": round(elapsed, 3),
        "jobs_per_s": round(totals["jobs_ok"] / elapsed, 1) if elapsed > 0 else None,
        "errors": errors,
        "batch_latency_p50_ms": rounded(percentile(latencies_ms, 50)),
        "batch_latency_p99_ms": rounded(percentile(latencies_ms, 99)),
        "time_limit_hit": state["limit_hit"],
        # This client shares the CPUs with the node; its cost is reported, not hidden.
        "client_cpu_percent": round(client_cpu * 100 / elapsed) if elapsed > 0 else None,
        "ok_ids": ok_ids if want_ids else None,
    }


def batch_bodies(prefix: str, route: str, n_jobs: int, batch_size: int, trigger_of):
    """``make_body(i)`` for `post_batches`: batch i holds jobs i*size .. up to n_jobs."""

    def make_body(index: int) -> tuple[bytes, int]:
        first = index * batch_size
        last = min(first + batch_size, n_jobs)
        items = ",".join(
            job_line(f"{prefix}-{n}", trigger_of(n), route, n) for n in range(first, last)
        )
        return f"[{items}]".encode(), last - first

    return make_body, -(-n_jobs // batch_size)


def load_jobs(bases: list[str], prefix: str, route: str, n_jobs: int, trigger_of, args,
              time_limit: float, want_ids: bool = False) -> dict:
    make_body, n_batches = batch_bodies(prefix, route, n_jobs, args.batch_size, trigger_of)
    return post_batches(bases, make_body, n_batches, args.batch_conns, time_limit, want_ids)


# ---- 4. firing lateness ------------------------------------------------------------------------


def receiver_count(receiver_base: str) -> int:
    status, body = request_json(receiver_base, "GET", "/stats", timeout=10)
    return body["count"] if status == 200 else -1


def lateness_figures(lateness: list[float]) -> dict:
    """p50, p90, p99, p99.9, max and min (ms) of ascending lateness values, and how
    many of them are early (negative)."""
    return {
        "lateness_p50_ms": rounded(percentile(lateness, 50), 2),
        "lateness_p90_ms": rounded(percentile(lateness, 90), 2),
        "lateness_p99_ms": rounded(percentile(lateness, 99), 2),
        "lateness_p999_ms": rounded(percentile(lateness, 99.9), 2),
        "lateness_max_ms": rounded(lateness[-1] if lateness else None, 2),
        "lateness_min_ms": rounded(lateness[0] if lateness else None, 2),
        "early": sum(1 for value in lateness if value < 0),
    }


def delivery_figures(records: list, scheduled: dict[str, int]) -> tuple[dict, dict[str, float]]:
    """What the receiver's ``records`` say of the jobs ``scheduled`` ({id: trigger_ms}).

    Returns the figures (delivered, lateness, early, duplicates, missing, retried,
    trigger header mismatches, deliveries of other jobs) and each delivered job's
    lateness: arrival of its first delivery - its trigger, in ms.
    """
    first_lateness: dict[str, float] = {}
    deliveries: dict[str, int] = {}
    header_mismatch = retried = foreign = 0
    for job_id, trigger_header, arrival_s, attempt in records:
        if job_id not in scheduled:
            foreign += 1
            continue
        deliveries[job_id] = deliveries.get(job_id, 0) + 1
        trigger_ms = scheduled[job_id]
        if trigger_header is None or int(trigger_header) != trigger_ms:
            header_mismatch += 1
        if attempt not in (None, "1"):
            retried += 1
        if job_id not in first_lateness:
            first_lateness[job_id] = arrival_s * 1000 - trigger_ms
    figures = {
        "delivered": len(first_lateness),
        "deliveries_total": sum(deliveries.values()),
        **lateness_figures(sorted(first_lateness.values())),
        "duplicates": sum(count - 1 for count in deliveries.values()),
        "missing": len(set(scheduled) - set(first_lateness)),
        "retried_deliveries": retried,
        "trigger_header_mismatch": header_mismatch,
        "deliveries_of_other_jobs": foreign,
    }
    return figures, first_lateness


def lateness_by_second(first_lateness: dict[str, float], scheduled: dict[str, int],
                       origin_ms: int) -> list[dict]:
    """Lateness per second of trigger time counted from ``origin_ms``.

    Flat lateness points at the timer; lateness that grows second after second means
    the node cannot deliver that many per second and a queue builds up.
    """
    by_second: dict[int, list[float]] = {}
    for job_id, value in first_lateness.items():
        by_second.setdefault((scheduled[job_id] - origin_ms) // 1000, []).append(value)
    rows = []
    for second in sorted(by_second):
        values = sorted(by_second[second])
        rows.append({
            "second": second, "delivered": len(values),
            "p50_ms": rounded(percentile(values, 50), 1),
            "p99_ms": rounded(percentile(values, 99), 1),
            "max_ms": rounded(values[-1], 1),
        })
    return rows


def measure_firing(bases: list[str], route: str, run_id: str, receiver_base: str, dump: Path,
                   batch_rate: float | None, node_pid: int | None, args) -> dict:
    """Schedule ``args.fire_jobs`` jobs over ``args.fire_spread_s`` s; measure lateness.

    The triggers start ``args.fire_lead_s`` (3 s) after the creates are expected to be
    acknowledged; the create time is estimated from the batch rate just measured, with
    a 2x margin, and the lead actually obtained is reported.
    """
    n = args.fire_jobs
    spread_ms = int(args.fire_spread_s * 1000)
    rate = batch_rate if batch_rate and batch_rate > 0 else 1000.0
    # Capped so that a very slow node cannot stretch the run; the lead is reported.
    expected_create_s = min(n / rate, 20.0)
    start_ms = int((time.time() + args.fire_lead_s + 2 * expected_create_s + 0.2) * 1000)
    triggers = {i: start_ms + i * spread_ms // n for i in range(n)}
    prefix = f"fire-{run_id}"
    creation = load_jobs(
        bases, prefix, route, n, triggers.__getitem__, args,
        # Creates still running when the first job is due would distort the figure.
        time_limit=max(1.0, start_ms / 1000 - time.time() - 1.0), want_ids=True,
    )
    last_ack = time.time()
    scheduled = {job_id: triggers[int(job_id.rsplit("-", 1)[1])] for job_id in creation["ok_ids"]}
    lead_s = start_ms / 1000 - last_ack
    last_trigger_s = max(scheduled.values(), default=start_ms) / 1000
    # From the first trigger on, the node's work is firing only.
    time.sleep(max(0.0, start_ms / 1000 - time.time() - 0.05))
    probe = Probe(bases[0], node_pid)

    # Wait for every delivery, then a little longer so duplicates can show up.
    grace_deadline = last_trigger_s + args.fire_grace_s
    while time.time() < grace_deadline:
        time.sleep(0.5)
        with contextlib.suppress(OSError, http.client.HTTPException, KeyError):
            if time.time() > last_trigger_s + 1.0 and receiver_count(receiver_base) >= len(
                scheduled
            ):
                time.sleep(1.0)
                break
    node_side = probe.done(len(scheduled))
    receiver_count(receiver_base)  # makes the receiver write its dump file
    dumped = json.loads(dump.read_text())
    records = dumped["records"]

    delivered, first_lateness = delivery_figures(records, scheduled)
    per_second = lateness_by_second(first_lateness, scheduled, start_ms)
    arrivals = [r[2] for r in records if r[0] in scheduled]
    result = {
        "jobs_scheduled": len(scheduled),
        "jobs_requested": n,
        "create_errors": creation["errors"],
        "create_seconds": creation["seconds"],
        "lead_after_last_ack_s": round(lead_s, 2),
        "spread_s": args.fire_spread_s,
        **delivered,
        "delivery_window_s": round(max(arrivals) - min(arrivals), 2) if arrivals else None,
        "receiver_connections": dumped.get("connections"),
        "lateness_by_trigger_second": per_second,
        "node": node_side,
    }
    if lead_s < 1.0:
        result["note"] = "creates took longer than planned: the lead is under 1 s"
    return result


# ---- the report ------------------------------------------------------------------------------


def node_log_problems(path: Path) -> dict:
    """Counts of tracebacks and warn/error/critical lines in the node's log, with samples."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"lines": 0}
    flagged = [
        line for line in lines
        if "Traceback" in line or re.search(r"#(warn|error|critical)\]", line)
        or "Unhandled" in line
    ]
    samples: list[str] = []
    for line in flagged:
        short = line[:300]
        if short not in samples:
            samples.append(short)
        if len(samples) >= 8:
            break
    return {
        "lines": len(lines),
        "access_log_lines": sum(1 for line in lines if '] "127.0.0.1" - - [' in line),
        "tracebacks": sum(1 for line in lines if "Traceback" in line),
        "warn_error_critical": sum(1 for line in lines if re.search(
            r"#(warn|error|critical)\]", line)),
        "samples": samples,
    }


def node_line(figures: dict | None) -> str | None:
    """What the node spent during a phase, as one line (None without figures)."""
    if not figures:
        return None
    parts = []
    if "node_cpu_percent" in figures:
        text = f"CPU {figures['node_cpu_percent']}% of one core"
        if "reactor_thread_cpu_percent" in figures:
            text += f" (reactor thread {figures['reactor_thread_cpu_percent']}%)"
        parts.append(text)
    if "wal_fsyncs" in figures:
        text = (f"{figures['wal_fsyncs']:,} WAL fsyncs (mean "
                f"{figures['wal_fsync_mean_ms']} ms")
        if "jobs_per_wal_fsync" in figures:
            text += f", {figures['jobs_per_wal_fsync']} jobs per fsync"
        parts.append(text + ")")
    if "node_lateness_mean_ms" in figures:
        parts.append(f"node-side lateness mean {figures['node_lateness_mean_ms']} ms, "
                     f"p99 <= {figures.get('node_lateness_p99_bucket_ms')} ms")
    return "   node: " + "; ".join(parts) if parts else None


def print_report(report: dict) -> None:
    """The human-readable report on stdout."""
    p = print
    facts = report["machine"]
    p("")
    p(f"timeMachine benchmark ({report['mode']} run, {report['started_at']})")
    p(f"machine: nproc={facts['nproc']} ({facts['cpu']}), python {facts['python_node']} "
      f"(node), kernel {facts['kernel']}, data dir on {facts['data_dir_fs']}, "
      f"{facts['wrk'] or 'no wrk'}")
    node = report.get("node", {})
    if node.get("start_seconds") is not None:
        p(f"node: pid {node['pid']}, ready {node['start_seconds']:.1f} s after start, "
          f"{node['base']}")
    else:
        p(f"node: --target {node.get('base')}, pid {node.get('pid') or 'not given'}")

    p("")
    creates = report.get("single_creates", {})
    targets = len(report["args"]["targets"]) or 1
    split = f", shared out over {targets} targets, one wrk each" if targets > 1 else ""
    p(f"1. single creates (wrk -t{report['args']['wrk_threads']} "
      f"-c{report['args']['wrk_conns']} -d{report['args']['wrk_duration']}s, keep-alive{split})")
    if "skipped" in creates:
        p(f"   skipped: {creates['skipped']}")
    else:
        for name in ("node", "noop"):
            r = creates.get(name, {})
            if "error" in r:
                p(f"   {name:<6}: {r['error']}")
                continue
            socket_errors = sum((r.get("socket_errors") or {}).values())
            ok_rate = f" ({fmt_num(r.get('ok_per_s'))} 2xx/s)" if r.get("non_2xx") else ""
            p(f"   {name:<6}: {fmt_num(r.get('requests_per_s'))} req/s{ok_rate}  "
              f"non-2xx {r.get('non_2xx')}  socket errors {socket_errors}  "
              f"wrk CPU {r.get('wrk_cpu_percent')}%  "
              f"latency p50 {fmt_num(r.get('latency_p50_ms'), 1)} ms, "
              f"p99 {fmt_num(r.get('latency_p99_ms'), 1)} ms, "
              f"max {fmt_num(r.get('latency_max_ms'), 1)} ms")
            if node_line(r.get("node")):
                p("   " + node_line(r.get("node")))
        ratio = creates.get("ratio")
        met = None if ratio is None else (
            ratio >= TARGET_CREATE_RATIO
            and (creates["node"].get("requests_per_s") or 0) >= TARGET_CREATE_RPS
        )
        p(f"   ratio : node = {fmt_num(ratio and ratio * 100)}% of no-op   "
          f"(target >= {TARGET_CREATE_RATIO:.0%} and >= {TARGET_CREATE_RPS:,}/s) {verdict(met)}")
        node_cpu = creates.get("node", {}).get("cpu_ms_per_request")
        noop_cpu = creates.get("noop", {}).get("cpu_ms_per_request")
        if node_cpu and noop_cpu:
            processes = creates["node"]["cpu_processes"]
            # Rates follow the machine's speed; the multiple of the no-op's CPU far
            # less: compare it across runs made on different days.
            p(f"   cpu   : {node_cpu:.2f} ms of CPU per create over {processes} node "
              f"process{'es' if processes > 1 else ''}; the no-op spends {noop_cpu:.2f} ms "
              f"per request ({node_cpu / noop_cpu:.1f} times as much)")

    b = report.get("batches")
    p("")
    if b:
        spread = f", each batch to one of {targets} targets at random" if targets > 1 else ""
        p(f"2. batches of {report['args']['batch_size']} "
          f"({report['args']['batch_conns']} keep-alive connections{spread})")
        p(f"   {fmt_num(b['jobs_ok'])} of {fmt_num(b['jobs_requested'])} jobs acknowledged in "
          f"{b['seconds']:.1f} s = {fmt_num(b['jobs_per_s'])} jobs/s   "
          f"batch latency p50 {fmt_num(b['batch_latency_p50_ms'], 1)} ms, "
          f"p99 {fmt_num(b['batch_latency_p99_ms'], 1)} ms, client CPU "
          f"{b['client_cpu_percent']}%")
        p(f"   errors: {b['errors'] or 'none'}"
          f"{'   (time limit hit)' if b['time_limit_hit'] else ''}   "
          f"(target >= {TARGET_BATCH_JOBS_S:,}/s) "
          f"{verdict(b['jobs_per_s'] is not None and b['jobs_per_s'] >= TARGET_BATCH_JOBS_S)}")
        if node_line(b.get("node")):
            p(node_line(b.get("node")))

    f = report.get("firing")
    p("")
    if f:
        p(f"3. firing lateness ({fmt_num(f['jobs_scheduled'])} jobs over {f['spread_s']} s "
          f"to a local webhook receiver; first trigger {f['lead_after_last_ack_s']} s "
          f"after the last create was acknowledged)")
        p(f"   delivered {fmt_num(f['delivered'])}/{fmt_num(f['jobs_scheduled'])} in "
          f"{f['delivery_window_s']} s; lateness (arrival - trigger_ms) "
          f"p50 {f['lateness_p50_ms']} ms, p90 {f['lateness_p90_ms']} ms, "
          f"p99 {f['lateness_p99_ms']} ms, p99.9 {f['lateness_p999_ms']} ms, "
          f"max {f['lateness_max_ms']} ms")
        p(f"   early {f['early']}  duplicates {f['duplicates']}  missing {f['missing']}  "
          f"retried {f['retried_deliveries']}  trigger header mismatches "
          f"{f['trigger_header_mismatch']}  create errors {f['create_errors'] or 'none'}  "
          f"connections to the receiver {f.get('receiver_connections')}")
        met = (
            f["lateness_p99_ms"] is not None
            and f["lateness_p99_ms"] <= TARGET_LATENESS_P99_MS
            and f["early"] == 0 and f["duplicates"] == 0 and f["missing"] == 0
        )
        p(f"   (target p99 <= {TARGET_LATENESS_P99_MS:g} ms, none early, duplicated or "
          f"missing) {verdict(met)}")
        if node_line(f.get("node")):
            p(node_line(f.get("node")))
        for row in f.get("lateness_by_trigger_second", []):
            p(f"     second {row['second']}: {row['delivered']:>5} delivered, "
              f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, max {row['max_ms']} ms")
        if f.get("note"):
            p(f"   note: {f['note']}")

    m = report.get("memory")
    p("")
    if m:
        p("4. node memory (VmRSS; peak = VmHWM)")
        for point in m["points"]:
            p(f"   {point['label']:<34} {fmt_num(point['rss_mb'], 1):>8} MB  "
              f"(peak {fmt_num(point['peak_rss_mb'], 1)} MB, "
              f"{fmt_num(point['stored_jobs'])} jobs stored)")
        ff = m.get("far_future")
        if ff:
            p(f"   far-future load: {fmt_num(ff['jobs_ok'])} of {fmt_num(ff['jobs_requested'])} "
              f"jobs in {ff['seconds']:.1f} s = {fmt_num(ff['jobs_per_s'])} jobs/s, "
              f"errors {ff['errors'] or 'none'}"
              f"{'  (time limit hit)' if ff['time_limit_hit'] else ''}")
            if node_line(ff.get("node")):
                p("   " + node_line(ff.get("node")).strip())
            growth = m.get("rss_growth_far_future_mb")
            per_1m = m.get("rss_mb_per_1m_far_future")
            final = m["points"][-1]["rss_mb"]
            met = None
            if ff["jobs_ok"] >= 1_000_000 and final is not None:
                met = final < TARGET_RSS_MB_PER_1M
            p(f"   growth while loading far-future jobs: {fmt_num(growth, 1)} MB "
              f"(~{fmt_num(per_1m, 0)} MB per 1M jobs)   "
              f"(target total < {TARGET_RSS_MB_PER_1M:g} MB with 1M far-future jobs) "
              f"{verdict(met) if met is not None else '[needs the full 1M run]'}")
    elif report.get("memory_skipped"):
        p(f"4. node memory: skipped ({report['memory_skipped']})")

    problems = report.get("node_log")
    p("")
    if problems:
        p(f"node log: {fmt_num(problems.get('lines'))} lines "
          f"({fmt_num(problems.get('access_log_lines'))} access-log lines), "
          f"{problems.get('tracebacks', 0)} tracebacks, "
          f"{problems.get('warn_error_critical', 0)} warn/error/critical lines")
        for sample in problems.get("samples", []):
            p(f"   | {sample}")
    stops = report.get("stopped", {})
    if stops:
        p("stopped: " + ", ".join(
            f"{name} ({how})" for name, how in stops.items()))
    p(f"total time: {report['total_seconds']:.0f} s; JSON report: {report['json_path']}")
    p(f"machine facts: nproc={facts['nproc']}, python {facts['python_node']}")


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="timeMachine benchmark: prints figures, writes bench/out/report.json."
    )
    parser.add_argument("--quick", action="store_true",
                        help="smaller counts and shorter runs (about 2 minutes)")
    parser.add_argument("--target", action="append", help="benchmark a running node at "
                        "http://127.0.0.1:PORT instead of starting one (its data is left "
                        "behind); repeated or comma-separated: the nodes of one cluster, "
                        "each request to one of them at random")
    parser.add_argument("--target-pid", type=int, help="PID of the first --target, to read "
                        "its RSS and CPU")
    parser.add_argument("--cluster-pids", type=lambda text: [int(p) for p in text.split(",")],
                        help="PIDs of every node of the --target cluster, comma-separated: "
                        "CPU per create is summed over them (default: --target-pid)")
    parser.add_argument("--python", help="interpreter for the node and helper processes "
                        "(default: this one if it has twisted+klein, else $TM_BENCH_PYTHON, "
                        "./.venv or /work/venv)")
    parser.add_argument("--shards", type=int, help="--shards for the node started here")
    parser.add_argument("--wrk-duration", type=int, default=10)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--wrk-conns", type=int, default=16)
    parser.add_argument("--batch-jobs", type=int, help="jobs for the batch figure "
                        "(default 100,000; 20,000 with --quick)")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--batch-conns", type=int, default=4)
    parser.add_argument("--fire-jobs", type=int, default=5000)
    parser.add_argument("--fire-spread-s", type=float, default=5.0)
    parser.add_argument("--fire-lead-s", type=float, default=3.0)
    parser.add_argument("--fire-grace-s", type=float, default=10.0,
                        help="wait this long after the last trigger for missing deliveries")
    parser.add_argument("--route-max-in-flight", type=int,
                        help="max_in_flight of the receiver's route (default: the node's)")
    parser.add_argument("--far-future", type=int, help="far-future jobs for the RSS figure "
                        "(default 1,000,000; 100,000 with --quick; 0 to skip)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON report path")
    args = parser.parse_args(argv)
    if args.batch_jobs is None:
        args.batch_jobs = 20_000 if args.quick else 100_000
    if args.far_future is None:
        args.far_future = 100_000 if args.quick else 1_000_000
    if args.quick and args.wrk_duration == 10:
        args.wrk_duration = 5
    # Time limits keep a slow node from stretching the run past its budget.
    args.batch_time_limit = 30.0 if args.quick else 120.0
    args.far_future_time_limit = 45.0 if args.quick else 300.0
    args.targets = [
        target.strip().rstrip("/")
        for option in args.target or () for target in option.split(",") if target.strip()
    ]
    for target in args.targets:
        host = urlsplit(target).hostname or ""
        if not (host.startswith("127.") or host in ("localhost", "::1")):
            parser.error("--target must be a loopback address: the benchmark stays local")
    return args


def run(args, tmp: Path, children: list[Child], report: dict) -> None:
    """The benchmark proper; fills ``report`` as it goes (partial if it fails)."""
    python = find_python(args.python)
    report["machine"] = machine_facts(python, tmp)
    run_id = f"{time.strftime('%H%M%S')}{secrets.token_hex(2)}"

    if args.targets:
        bases, node_pid = args.targets, args.target_pid
        report["node"] = {"base": ", ".join(bases), "pid": node_pid}
    else:
        log("starting the node")
        node, base = start_node(python, tmp, args.shards)
        bases = [base]
        children.append(node)
        node_pid = node.pid
        report["node"] = {"base": base, "pid": node.pid,
                          "start_seconds": round(node.start_seconds, 2)}
    log("starting the webhook receiver")
    receiver, receiver_port, dump = start_receiver(python, tmp)
    children.append(receiver)
    receiver_base = f"http://127.0.0.1:{receiver_port}"
    route = f"bench-{run_id}"
    route_body = {"id": route, "type": "http", "webhook_url": f"{receiver_base}/hook"}
    if args.route_max_in_flight:
        route_body["max_in_flight"] = args.route_max_in_flight
    # The node (the first target) that the node: lines and memory figures describe.
    base = bases[0]
    status, body = request_json(base, "POST", "/route", route_body)
    if status != 200:
        raise RuntimeError(f"could not create route {route}: {status} {body}")

    memory_points = []

    def memory_point(label: str) -> None:
        if node_pid is None:
            return
        point = {"label": label, **(read_rss(node_pid) or {"rss_mb": None, "peak_rss_mb": None})}
        point["stored_jobs"] = stored_jobs(base)
        memory_points.append(point)
        report["memory"] = {"points": memory_points}

    memory_point("idle (route created)")

    # 2. single creates
    creates: dict = {}
    report["single_creates"] = creates
    if shutil.which("wrk") is None:
        creates["skipped"] = "wrk is not installed (apt-get install -y wrk)"
        log(creates["skipped"])
    else:
        log(f"wrk against the node for {args.wrk_duration} s")
        probe = Probe(base, node_pid)
        cluster_cpu = CpuMeter(args.cluster_pids or ([node_pid] if node_pid else []))
        creates["node"] = run_wrk(bases, route, f"w-{run_id}", args)
        creates["node"]["node"] = probe.done(creates["node"].get("requests"))
        creates["node"]["cpu_ms_per_request"] = cluster_cpu.ms_per(creates["node"].get("requests"))
        creates["node"]["cpu_processes"] = len(cluster_cpu.pids)
        log(f"wrk against the no-op server for {args.wrk_duration} s")
        noop, noop_base = start_noop(python, tmp)
        children.append(noop)
        try:
            noop_cpu = CpuMeter([noop.pid])
            creates["noop"] = run_wrk([noop_base], route, f"w-{run_id}", args)
            creates["noop"]["cpu_ms_per_request"] = noop_cpu.ms_per(creates["noop"].get("requests"))
        finally:
            noop.stop()
        node_rps = creates["node"].get("requests_per_s")
        noop_rps = creates["noop"].get("requests_per_s")
        creates["ratio"] = round(node_rps / noop_rps, 3) if node_rps and noop_rps else None

    # 3. batches
    log(f"{args.batch_jobs:,} jobs in batches of {args.batch_size}")
    far_trigger = int(time.time() * 1000) + YEAR_MS
    probe = Probe(base, node_pid)
    batches = load_jobs(bases, f"b-{run_id}", route, args.batch_jobs,
                        lambda n: far_trigger + n, args, args.batch_time_limit)
    batches["node"] = probe.done(batches["jobs_ok"])
    batches.pop("ok_ids")
    batches["jobs_requested"] = args.batch_jobs
    report["batches"] = batches
    memory_point("after single + batch creates")

    # 4. firing lateness; a short pause lets the node finish background work first
    time.sleep(2.0)
    log(f"firing {args.fire_jobs:,} jobs over {args.fire_spread_s:g} s")
    report["firing"] = measure_firing(bases, route, run_id, receiver_base, dump,
                                      batches["jobs_per_s"], node_pid, args)
    memory_point("after firing")

    # 5. far-future jobs for memory
    if node_pid is None:
        report["memory_skipped"] = "no PID for --target (give --target-pid)"
    elif args.far_future > 0:
        log(f"loading {args.far_future:,} far-future jobs")
        year_ahead = int(time.time() * 1000) + YEAR_MS
        probe = Probe(base, node_pid)
        far = load_jobs(bases, f"ff-{run_id}", route, args.far_future,
                        # Spread over a day a year ahead, like real timers would be.
                        lambda n: year_ahead + (n * 86_400_000) // max(args.far_future, 1),
                        args, args.far_future_time_limit)
        far.pop("ok_ids")
        far["node"] = probe.done(far["jobs_ok"])
        far["jobs_requested"] = args.far_future
        before = memory_points[-1]["rss_mb"]
        memory_point(f"after {far['jobs_ok']:,} far-future jobs")
        after = memory_points[-1]["rss_mb"]
        report["memory"]["far_future"] = far
        if before is not None and after is not None:
            growth = after - before
            report["memory"]["rss_growth_far_future_mb"] = round(growth, 1)
            if far["jobs_ok"]:
                report["memory"]["rss_mb_per_1m_far_future"] = round(
                    growth * 1_000_000 / far["jobs_ok"], 1)


def companion(out_path: Path, name: str) -> Path:
    """Where a file kept with the report goes: bench/out/<name>, or <stem>.<name>."""
    if out_path == DEFAULT_OUT:
        return out_path.parent / name
    return out_path.parent / f"{out_path.stem}.{name}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    out_path = Path(args.out).resolve()
    report: dict = {
        "mode": "quick" if args.quick else "full",
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "args": dict(vars(args)),
        "json_path": str(out_path),
    }
    tmp = Path(tempfile.mkdtemp(prefix="tm-bench-"))
    children: list[Child] = []
    failed = None

    # SIGTERM to the benchmark must still stop the processes it started.
    def on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        run(args, tmp, children, report)
    except KeyboardInterrupt:
        failed = "interrupted"
    except Exception as e:
        failed = f"{type(e).__name__}: {e}"
    finally:
        stopped = {}
        for child in reversed(children):
            child.stop()
            how = child.stop_how
            if child.stop_seconds is not None:
                how += f" in {child.stop_seconds:.1f} s"
            stopped[child.name] = how
        report["stopped"] = stopped
        # Kept for the record next to the report: the temp dir goes away.
        out_path.parent.mkdir(parents=True, exist_ok=True)
        node = next((c for c in children if c.name == "node"), None)
        if node is not None:
            report["node_log"] = node_log_problems(node.log_path)
            shutil.copyfile(node.log_path, companion(out_path, "node.log"))
        dump = tmp / "deliveries.json"
        if dump.exists():
            shutil.copyfile(dump, companion(out_path, "deliveries.json"))
        shutil.rmtree(tmp, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)

    report["total_seconds"] = round(time.monotonic() - started, 1)
    if failed:
        report["failed"] = failed
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    if "machine" in report:
        try:
            print_report(report)
        except (KeyError, TypeError, ValueError) as e:
            # A partial report (a step failed) must not hide what was measured.
            print(f"could not print the whole report ({e!r}); see {out_path}", file=sys.stderr)
    if failed:
        print(f"\nbenchmark stopped early: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
