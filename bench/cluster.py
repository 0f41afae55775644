"""A 3-node cluster on this machine: creates, batches, firing lateness, and failover.

    .venv/bin/python bench/cluster.py [--quick] [--shards 12] [--hosts 127.0.5.1-3]
        [--profile PATH | --stalls PATH] [--no-failover] [-- BENCH_ARGS...]

Starts three ``twistd timemachine`` nodes (node1 on 127.0.0.1, node2 on 127.0.0.2,
node3 on 127.0.0.3 unless ``--hosts`` names three other loopback addresses; free
ports), joins them as upstream's ``join.sh`` does, configures
``--shards`` shards with 3 replicas, waits (at most 30 s) until the shard leaders are
spread evenly over the nodes, then:

1. runs ``bench/bench.py`` with the three nodes as ``--target`` (single creates with
   16 clients, batches of 500, firing lateness at 1,000 fires/s): wrk's connections
   are shared out over the nodes, and each batch goes to a node picked at random;
   a write reaches its shard's leader from whichever node took it, so about two
   thirds of them are forwarded. The ``node:`` lines (CPU, fsyncs) are node1's.
2. failover: jobs due 2 s from now on every shard; 1.5 s from now the node leading the
   most shards is killed with -9; it prints the time from the kill to the first job
   of a shard that node led being fired by its new leader, and whether any job was
   lost, early or repeated.

It prints figures and never fails on them. Every process it starts is stopped by PID.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from timemachine.cluster.ring import shard_of  # noqa: E402

HOSTS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def loopback_hosts(text):
    """Three loopback addresses from ``"a,b,c"`` or ``"127.0.5.1-3"`` (argparse type)."""
    if "," in text:
        hosts = text.split(",")
    else:
        first, _, last = text.rpartition("-")
        prefix, _, start = first.rpartition(".")
        if not (prefix and start.isdigit() and last.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r}: give a,b,c or 127.0.5.1-3")
        hosts = [f"{prefix}.{n}" for n in range(int(start), int(last) + 1)]
    if len(hosts) != 3 or not all(h.startswith("127.") for h in hosts):
        raise argparse.ArgumentTypeError(f"{text!r}: three loopback (127.x) addresses")
    return hosts


def free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def call(url, method="GET", body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except OSError as e:
        return 0, {"error": str(e)}


def until(what, check, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"cluster bench: not within {timeout} s: {what}")


class Node:
    def __init__(self, number, base, host, instrument=None):
        self.node_id = f"node{number}"
        self.host = host
        # (kind, path prefix) for bench/instrumented_node.py, or None.
        self.instrument = instrument
        self.http = f"{self.host}:{free_port(self.host)}"
        self.peer = f"{self.host}:{free_port(self.host)}"
        self.data_dir = os.path.join(base, self.node_id)
        self.log = os.path.join(base, f"{self.node_id}.log")
        self.process = None

    @property
    def instrument_path(self):
        return f"{self.instrument[1]}.{self.node_id}"

    @property
    def url(self):
        return f"http://{self.http}"

    def start(self):
        host, port = self.http.split(":")
        peer_host, peer_port = self.peer.split(":")
        with open(self.log, "ab") as log:
            twist = ["-m", "twisted"] if self.instrument is None else [
                os.path.join(REPO, "bench", "instrumented_node.py"), self.instrument[0],
                self.instrument_path]
            self.process = subprocess.Popen(
                [sys.executable, *twist, "--log-format=text", "timemachine",
                 "--node-id", self.node_id, "--data-dir", self.data_dir,
                 "--http", f"tcp:{port}:interface={host}",
                 "--peer", f"tcp:{peer_port}:interface={peer_host}"],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Deliveries(http.server.BaseHTTPRequestHandler):
    """Records (job id, arrival time) of every delivery."""

    seen: list = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Deliveries.seen.append((self.headers["X-TimeMachine-Job-Id"], time.time()))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


def start_cluster(base, shards, nodes, hosts, instrument=None):
    """Start, join and configure three nodes, appended to ``nodes`` as they start
    (``instrument``: see `Node`)."""
    for number, host in enumerate(hosts, 1):
        node = Node(number, base, host, instrument)
        nodes.append(node)
        node.start()
    for node in nodes:
        until(f"{node.node_id} ready", lambda n=node: call(n.url + "/ready")[0] == 200)
    for node in nodes[1:]:
        code, answer = call(
            nodes[0].url + "/cluster/join", "POST",
            {"node_id": node.node_id, "raft_address": node.peer, "http_address": node.http},
        )
        if code != 200:
            raise SystemExit(f"cluster bench: join of {node.node_id} failed: {answer}")

    def voters():
        code, answer = call(nodes[0].url + "/cluster/servers")
        return code == 200 and [s["Suffrage"] for s in answer["servers"]] == ["Voter"] * 3

    until("three voters", voters)
    code, answer = call(nodes[0].url + "/cluster/configure", "POST",
                        {"shards": shards, "replicas": 3})
    if code != 200:
        raise SystemExit(f"cluster bench: configure failed: {answer}")

    def serving():
        for node in nodes:
            code, answer = call(node.url + "/cluster/shards")
            if code != 200 or any(s["status"] != "serving" for s in answer["shards"]):
                return False
        return True

    until("every replica serving", serving)


def wait_for_spread_leaders(nodes, shards, timeout=30):
    """Wait (at most ``timeout`` s) until each node leads an even share of the shards,
    as the meta leader's spreader makes them: a cluster in its steady state, not the
    minutes after its configure. Says so when they are not spread in time."""
    fair = {shards // len(nodes), -(-shards // len(nodes))}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, answer = call(nodes[0].url + "/cluster/shards")
        leaders = [s["leader"] for s in answer.get("shards", [])]
        if len(leaders) == shards and all(leaders.count(n.node_id) in fair for n in nodes):
            return
        time.sleep(0.5)
    print(f"shard leaders not spread within {timeout} s: {leaders_line(nodes)}")


def leaders_line(nodes):
    """How many shards each node leads now, as node1's map says."""
    _, answer = call(nodes[0].url + "/cluster/shards")
    leaders = [s["leader"] for s in answer.get("shards", [])]
    return ", ".join(f"{n.node_id} {leaders.count(n.node_id)}" for n in nodes)


def node_figures(node):
    """CPU seconds the node used so far, and its fires with their node-side lateness
    (due -> start of delivery) from its /metrics."""
    with open(f"/proc/{node.process.pid}/stat") as f:
        stat = f.read().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    try:
        with urllib.request.urlopen(node.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        text = ""
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("timemachine_firing_lateness_seconds_"):
            values[name] = float(value)
    fired = values.get("timemachine_firing_lateness_seconds_count", 0.0)
    late = values.get("timemachine_firing_lateness_seconds_sum", 0.0)
    return cpu, fired, late


def failover(nodes, shards, receiver_url, count):
    code, answer = call(nodes[1].url + "/route", "POST",
                        {"id": "failover", "type": "http", "webhook_url": receiver_url})
    if code != 200:
        raise SystemExit(f"cluster bench: route failed: {answer}")
    _, answer = call(nodes[0].url + "/cluster/shards")
    leaders = {s["shard"]: s["leader"] for s in answer["shards"]}
    victim_id = max(sorted(set(leaders.values())), key=list(leaders.values()).count)
    victim = next(n for n in nodes if n.node_id == victim_id)
    alive = [n for n in nodes if n is not victim]
    victim_shards = {s for s, leader in leaders.items() if leader == victim_id}
    due_ms = int(time.time() * 1000) + 2000
    jobs = [f"f{i}" for i in range(count)]
    batch = [{"id": j, "trigger_ms": due_ms, "route": "failover"} for j in jobs]
    code, answer = call(alive[0].url + "/job/fo", "POST", batch)
    if code != 200 or any(r["status"] != "ok" for r in answer["results"]):
        raise SystemExit(f"cluster bench: failover jobs not all stored: {answer}")
    time.sleep(max(0.0, due_ms / 1000 - 0.5 - time.time()))
    killed_at = time.time()
    victim.process.kill()
    victim.process.wait()
    deadline = time.time() + 30
    while time.time() < deadline and len({j for j, _ in Deliveries.seen}) < count:
        time.sleep(0.05)
    times = {}
    repeats = 0
    for job_id, at in Deliveries.seen:
        if job_id in times:
            repeats += 1
        times.setdefault(job_id, at)
    on_victim = [times[j] for j in jobs if shard_of(j, shards) in victim_shards and j in times]
    others = [times[j] for j in jobs if shard_of(j, shards) not in victim_shards and j in times]
    print(f"failover: killed {victim_id} (leader of {len(victim_shards)} of {shards} shards) "
          f"{due_ms / 1000 - killed_at:.2f} s before {count} jobs were due")
    if on_victim:
        print(f"  kill -> first job of its shards fired by a new leader: "
              f"{min(on_victim) - killed_at:.2f} s; last: {max(on_victim) - killed_at:.2f} s")
    if others:
        print(f"  jobs of the other shards: last fired {max(others) - due_ms / 1000:.3f} s "
              "after due")
    lost = count - len(times)
    early = sum(1 for at in times.values() if at * 1000 < due_ms)
    print(f"  lost {lost}, early {early}, repeated {repeats}")


def print_stalls(node, since):
    """One line on the reactor stalls a node's watchdog saw from ``since`` (a
    ``time.time()``; its start-up's imports and collector settling are left out),
    and the longest one's innermost frames."""
    try:
        with open(node.instrument_path) as f:
            record = json.load(f)
        stalls = [s for s in record["stalls"] if s["at"] >= since]
        threshold = f"{record['stall_ms']:g} ms"
    except (OSError, ValueError, KeyError) as e:
        print(f"  {node.node_id}: no stall record ({e})")
        return
    if not stalls:
        print(f"  {node.node_id}: no reactor stall of {threshold} or more")
        return
    longest = max(stalls, key=lambda s: s["ms"])
    at = time.strftime("%H:%M:%S", time.localtime(longest["at"]))
    where = longest["stacks"][0][0].split(" <- ")[:3] if longest["stacks"] else ["?"]
    print(f"  {node.node_id}: {len(stalls)} reactor stalls of {threshold} or more, "
          f"{sum(s['ms'] for s in stalls) / 1000:.2f} s in all; longest {longest['ms']:.0f} ms "
          f"at {at}, in {' <- '.join(where)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--failover-jobs", type=int, default=600)
    parser.add_argument("--hosts", type=loopback_hosts, default=HOSTS,
                        help="the nodes' three loopback addresses: a,b,c or 127.0.5.1-3 "
                        "(default 127.0.0.1-3)")
    parser.add_argument("--profile", metavar="PATH",
                        help="run each node under cProfile (its reactor thread), saving "
                        "the stats to PATH.nodeN when it stops")
    parser.add_argument("--stalls", metavar="PATH",
                        help="watch each node's reactor for stalls of 25 ms or more, "
                        "saving them to PATH.nodeN when it stops and summing them up")
    parser.add_argument("--no-failover", action="store_true",
                        help="stop after bench.py (no kill -9)")
    parser.add_argument("bench_args", nargs="*", metavar="-- BENCH_ARG",
                        help="options passed on to bench.py (e.g. -- --fire-jobs 2000)")
    args = parser.parse_args()
    if args.profile and args.stalls:
        parser.error("--profile and --stalls instrument the same thread: pick one")
    instrument = None
    if args.profile:
        instrument = ("profile", args.profile)
    elif args.stalls:
        instrument = ("stalls", args.stalls)
    base = tempfile.mkdtemp(prefix="tm-cluster-bench-")
    # A deep listen queue: the failover jobs are due at one instant, and with the
    # default of 5 the burst of connections waits for SYN retransmits (seconds).
    http.server.ThreadingHTTPServer.request_queue_size = 1024
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Deliveries)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    nodes = []
    measured_from = None
    try:
        start_cluster(base, args.shards, nodes, args.hosts, instrument)
        print(f"cluster: 3 nodes, {args.shards} shards, 3 replicas; requests to all three")
        bench = [sys.executable, os.path.join(REPO, "bench", "bench.py"),
                 "--target", ",".join(node.url for node in nodes),
                 "--target-pid", str(nodes[0].process.pid),
                 "--cluster-pids", ",".join(str(node.process.pid) for node in nodes),
                 "--far-future", "0"]
        if args.quick:
            bench.append("--quick")
        bench.extend(args.bench_args)
        wait_for_spread_leaders(nodes, args.shards)
        print(f"shards led: {leaders_line(nodes)}")
        before = [node_figures(node) for node in nodes]
        measured_from = time.time()
        subprocess.run(bench, cwd=REPO, check=False)
        print(f"shards led after bench.py: {leaders_line(nodes)}")
        for node, (cpu0, fired0, late0) in zip(nodes, before, strict=True):
            cpu, fired, late = node_figures(node)
            mean = f", node-side lateness mean {(late - late0) * 1000 / (fired - fired0):.1f} ms" \
                if fired > fired0 else ""
            print(f"  {node.node_id}: CPU {cpu - cpu0:.1f} s during bench.py; "
                  f"fired {fired - fired0:,.0f}{mean}")
        if args.no_failover:
            return
        failover(nodes, args.shards, f"http://127.0.0.1:{receiver.server_port}/hook",
                 args.failover_jobs)
    finally:
        for node in nodes:
            node.stop()
        receiver.shutdown()
        if args.stalls and measured_from is not None:
            print("reactor stalls from the start of bench.py:")
            for node in nodes:
                print_stalls(node, measured_from)
        out = os.path.join(REPO, "bench", "out")
        os.makedirs(out, exist_ok=True)
        for node in nodes:
            shutil.copy(node.log, os.path.join(out, f"cluster.{node.node_id}.log"))
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
