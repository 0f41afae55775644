"""``timemachine dev-cluster N``: a cluster of N nodes on this machine, for development.

Node i (1-based) runs as ``twistd -n timemachine`` on its own loopback address,
127.0.0.i, with upstream's numbering: HTTP port ``http_base + i`` (8001, 8002, ...),
peer port ``peer_base + i`` (8101, 8102, ...). Each node starts on its own and
bootstraps alone, as upstream's ``spawn.sh`` starts them; once every one answers
``/ready``, node1 is asked to admit the others (``POST /cluster/join``, as upstream's
``join.sh``, with their HTTP addresses too), then to spread the shards over all of them
(``POST /cluster/configure``). Then it prints where each node listens and logs, and
runs until SIGINT (Ctrl-C) or SIGTERM, when it stops every node: SIGTERM, then SIGKILL
for one that is still running after ``--stop-timeout`` seconds.

A node that exits or is not ready within ``--start-timeout`` seconds while the cluster
is being formed fails the command: it prints the end of that node's log, stops the
others and exits with status 1. Every wait has a deadline. Run again with the same
``--data-dir``, the nodes resume with their data (joining and configuring again change
nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys

from treq.client import HTTPClient
from twisted.internet import defer, error, protocol, task
from twisted.web.client import Agent, HTTPConnectionPool

from timemachine.cluster.placement import meta_voters

#: Seconds between two looks at a node that is not there yet.
POLL_SECONDS = 0.1
#: Seconds one HTTP call to a node may take.
CALL_SECONDS = 10.0
#: Seconds to wait for a SIGKILLed node to be gone.
KILL_SECONDS = 5.0
#: Lines of a failed node's log that are printed.
LOG_TAIL_LINES = 30


class StartFailed(Exception):
    """A node exited, or did not get where it should, while the cluster was formed.

    ``started`` is false when the node was never started (its log says nothing of it).
    """

    def __init__(self, node: DevNode, reason: str, started: bool = True):
        super().__init__(f"{node.node_id}: {reason}")
        self.node = node
        self.started = started


class DevNode(protocol.ProcessProtocol):
    """One node of the cluster: its addresses, its ``twistd`` process, its log file.

    ``ended`` fires with the exit status (or ``-signal``) when the process is gone.
    """

    def __init__(self, reactor, number: int, http_port: int, peer_port: int, data_dir: str):
        self._reactor = reactor
        self.node_id = f"node{number}"
        self.host = f"127.0.0.{number}"
        self.http_address = f"{self.host}:{http_port}"
        self.peer_address = f"{self.host}:{peer_port}"
        self.data_dir = os.path.join(data_dir, self.node_id)
        self.log_path = os.path.join(data_dir, f"{self.node_id}.log")
        self.pid: int | None = None
        self.exit_status: int | None = None
        self.ended = defer.Deferred()

    @property
    def url(self) -> str:
        return f"http://{self.http_address}"

    @property
    def running(self) -> bool:
        return self.pid is not None and self.exit_status is None

    def start(self, twistd: list[str], shards: int) -> None:
        """Spawn the node; its stdout and stderr go to its log file (appended)."""
        http_port = self.http_address.rpartition(":")[2]
        peer_port = self.peer_address.rpartition(":")[2]
        argv = [
            *twistd, "-n", "--pidfile=", "timemachine",
            "--node-id", self.node_id, "--data-dir", self.data_dir,
            "--http", f"tcp:{http_port}:interface={self.host}",
            "--peer", f"tcp:{peer_port}:interface={self.host}",
            "--shards", str(shards),
        ]
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        try:
            process = self._reactor.spawnProcess(
                self, argv[0], argv, env=os.environ, childFDs={0: null, 1: log, 2: log}
            )
        finally:
            os.close(log)
            os.close(null)
        self.pid = process.pid

    def processEnded(self, reason) -> None:
        value = reason.value
        self.exit_status = (
            value.exitCode if value.exitCode is not None else -(value.signal or 0)
        )
        self.ended.callback(self.exit_status)

    def send_signal(self, number: int) -> None:
        """Send ``number`` to this node's process (its PID only), if it still runs."""
        if self.running:
            # It may have ended already, its processEnded on its way.
            with contextlib.suppress(error.ProcessExitedAlready):
                self.transport.signalProcess(number)

    def describe_end(self) -> str:
        """How the process ended, for people: an exit status or a signal's name."""
        if self.exit_status is None:
            return "still running"
        if self.exit_status < 0:
            return f"ended by {signal.Signals(-self.exit_status).name}"
        return f"exit status {self.exit_status}"

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the node's log (of its last 64 KiB: a log that
        grew large is not read whole)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - 65536))
                text = f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"(cannot read {self.log_path}: {e})\n"
        return "".join(text.splitlines(keepends=True)[-lines:])


def twistd_command() -> list[str]:
    """``twistd`` of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def add_arguments(parser) -> None:
    """The options of ``timemachine dev-cluster`` (an argparse parser)."""
    parser.add_argument("nodes", type=int, metavar="N", help="how many nodes (1-254)")
    parser.add_argument(
        "--http-base", type=int, default=8000, help="node i's HTTP port is this + i [8000]"
    )
    parser.add_argument(
        "--peer-base", type=int, default=8100, help="node i's peer port is this + i [8100]"
    )
    parser.add_argument(
        "--data-dir", default="./timemachine-data/dev-cluster",
        help="node i's data in DATA_DIR/nodeI, its log in DATA_DIR/nodeI.log "
        "[./timemachine-data/dev-cluster]",
    )
    parser.add_argument("--shards", type=int, default=12, help="shard count [12]")
    parser.add_argument(
        "--replicas", type=int, default=None, help="replicas of each shard [min(3, N)]"
    )
    parser.add_argument(
        "--start-timeout", type=float, default=60.0,
        help="seconds each step of forming the cluster may take [60]",
    )
    parser.add_argument(
        "--stop-timeout", type=float, default=20.0,
        help="seconds a node has to stop after SIGTERM before it is killed [20]",
    )


def check_arguments(parser, args) -> None:
    """Reject what cannot make a cluster (``parser.error``: exit status 2)."""
    if not 1 <= args.nodes <= 254:
        parser.error("N must be between 1 and 254 (node i listens on 127.0.0.i)")
    for name in ("http_base", "peer_base"):
        base = getattr(args, name)
        if base < 0 or base + args.nodes > 65535:
            parser.error(f"--{name.replace('_', '-')} + N must be a port (at most 65535)")
    if {args.http_base + i for i in range(1, args.nodes + 1)} & {
        args.peer_base + i for i in range(1, args.nodes + 1)
    }:
        parser.error("--http-base and --peer-base give two nodes' ports the same number")
    if args.replicas is None:
        args.replicas = min(3, args.nodes)
    if not 1 <= args.replicas <= args.nodes:
        parser.error(f"--replicas must be between 1 and N ({args.nodes})")
    if not 1 <= args.shards <= 4096:
        parser.error("--shards must be between 1 and 4096")
    for name in ("start_timeout", "stop_timeout"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be a positive number of seconds")


class DevCluster:
    """Starts, forms, shows and stops the cluster (see the module)."""

    def __init__(self, reactor, args, out=sys.stdout, err=sys.stderr):
        self._reactor = reactor
        self._args = args
        self._out = out
        self._err = err
        data_dir = os.path.abspath(args.data_dir)
        self.nodes = [
            DevNode(reactor, i, args.http_base + i, args.peer_base + i, data_dir)
            for i in range(1, args.nodes + 1)
        ]
        self._data_dir = data_dir
        self._stopping: defer.Deferred | None = None
        self._http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    def say(self, text: str, to=None) -> None:
        print(text, file=to or self._out, flush=True)

    @defer.inlineCallbacks
    def run(self):
        """Form the cluster and keep it until the reactor stops (SIGINT, SIGTERM)."""
        self._reactor.addSystemEventTrigger("before", "shutdown", self.stop)
        os.makedirs(self._data_dir, exist_ok=True)
        try:
            yield self._form()
        except StartFailed as e:
            if self._stopping is not None:
                return  # stopped while forming (Ctrl-C): not a failure
            self.say(f"timemachine dev-cluster: {e}", self._err)
            if e.started:
                self.say(f"--- the end of {e.node.log_path} ---", self._err)
                self._err.write(e.node.log_tail())
                self.say("---", self._err)
            yield self.stop()
            raise SystemExit(1) from None
        self._show()
        for node in self.nodes:
            node.ended.addCallback(self._ended_while_running, node)
        # Until the reactor stops (`stop` ends the nodes then), or every node is gone.
        yield defer.DeferredList([_observe(node.ended) for node in self.nodes])
        if self._stopping is None:
            self.say("timemachine dev-cluster: every node exited", self._err)
            raise SystemExit(1)

    @defer.inlineCallbacks
    def _form(self):
        args = self._args
        self.say(
            f"starting {len(self.nodes)} nodes ({args.shards} shards, {args.replicas} "
            f"replicas), data in {self._data_dir}"
        )
        for node in self.nodes:
            for kind, address in (("HTTP", node.http_address), ("peer", node.peer_address)):
                if not _bindable(address):
                    raise StartFailed(
                        node, f"its {kind} address {address} is in use", started=False
                    )
        twistd = twistd_command()
        for node in self.nodes:
            node.start(twistd, args.shards)
            self.say(f"  {node.node_id}: pid {node.pid}, log {node.log_path}")
        for node in self.nodes:  # they start together; the waits are one after another
            yield self._until(node, "ready", self._ready, node)
        first = self.nodes[0]
        for node in self.nodes[1:]:
            body = {
                "node_id": node.node_id,
                "raft_address": node.peer_address,
                "http_address": node.http_address,
            }
            yield self._until(node, "admitted by node1", self._posted, first, "/cluster/join",
                              body, node)
        yield self._until(first, f"{len(self.nodes)} members, voting", self._members, first)
        body = {"shards": args.shards, "replicas": args.replicas}
        yield self._until(first, "configured", self._posted, first, "/cluster/configure", body,
                          first)
        for node in self.nodes:
            yield self._until(node, "serving its replicas", self._placed, node)

    @defer.inlineCallbacks
    def _until(self, node: DevNode, what: str, check, *check_args):
        """Call ``check(*check_args)`` until it holds; fail when ``node`` (or any
        node) exits first, or after ``--start-timeout`` seconds."""
        deadline = self._reactor.seconds() + self._args.start_timeout
        last = "no answer yet"
        while True:
            for other in self.nodes:
                if not other.running:
                    raise StartFailed(other, f"exited ({other.describe_end()})")
            try:
                done, last = yield check(*check_args)
            except StartFailed:
                raise
            except Exception as e:
                done, last = False, f"{type(e).__name__}: {e}"
            if done:
                return
            if self._reactor.seconds() > deadline:
                raise StartFailed(
                    node, f"not {what} within {self._args.start_timeout:g} s (last: {last})"
                )
            yield task.deferLater(self._reactor, POLL_SECONDS, lambda: None)

    @defer.inlineCallbacks
    def _call(self, method: str, node: DevNode, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        response = yield self._http.request(
            method, node.url + path, data=data, timeout=CALL_SECONDS,
            headers={"Content-Type": "application/json"},
        )
        content = yield response.content()
        try:
            answer = json.loads(content)
        except ValueError:
            answer = content.decode("utf-8", "replace")
        return response.code, answer

    @defer.inlineCallbacks
    def _ready(self, node: DevNode):
        code, answer = yield self._call("GET", node, "/ready")
        return code == 200, f"{code} {answer}"

    @defer.inlineCallbacks
    def _posted(self, to: DevNode, path: str, body, about: DevNode):
        code, answer = yield self._call("POST", to, path, body)
        if 400 <= code < 500:
            # A refusal (a node of another cluster, holding data): retrying changes nothing.
            raise StartFailed(about, f"POST {path} {json.dumps(body)} refused: {code} {answer}")
        return code == 200, f"{code} {answer}"

    @defer.inlineCallbacks
    def _members(self, node: DevNode):
        """Every node is a member, and as many vote in the meta group as it promotes
        (a learner votes once it has caught up)."""
        code, answer = yield self._call("GET", node, "/cluster/servers")
        servers = answer["servers"] if code == 200 else []
        ids = sorted(n.node_id for n in self.nodes)
        voters = sum(s["Suffrage"] == "Voter" for s in servers)
        formed = sorted(s["ID"] for s in servers) == ids and voters == len(meta_voters(ids, ()))
        return formed, f"{code} {answer}"

    @defer.inlineCallbacks
    def _placed(self, node: DevNode):
        """The node follows the configured map and serves every replica it holds."""
        code, answer = yield self._call("GET", node, "/cluster/shards")
        if code != 200:
            return False, f"{code} {answer}"
        shards = answer["shards"]
        placed = len(shards) == self._args.shards and all(
            len(s["replicas"]) == self._args.replicas
            and s["status"] == ("serving" if node.node_id in s["replicas"] else "elsewhere")
            for s in shards
        )
        if not placed:
            return False, "shards not placed yet"
        code, answer = yield self._call("GET", node, "/ready")
        return code == 200, f"/ready {code} {answer}"

    def _show(self) -> None:
        args = self._args
        self.say(
            f"cluster ready: {len(self.nodes)} nodes, {args.shards} shards, "
            f"{args.replicas} replicas"
        )
        for node in self.nodes:
            self.say(
                f"  {node.node_id}  http://{node.http_address}  peer {node.peer_address}  "
                f"pid {node.pid}  log {node.log_path}"
            )
        self.say("Ctrl-C stops every node")

    def _ended_while_running(self, status, node: DevNode):
        if self._stopping is None:
            self.say(f"{node.node_id} (pid {node.pid}) exited ({node.describe_end()}); "
                     f"its log: {node.log_path}", self._err)
        return status

    def stop(self) -> defer.Deferred:
        """Stop every node (once; later calls get the same Deferred)."""
        if self._stopping is None:
            self._stopping = self._stop()
        return self._stopping

    @defer.inlineCallbacks
    def _stop(self):
        running = [node for node in self.nodes if node.running]
        if not running:
            return
        self.say(f"stopping {', '.join(node.node_id for node in running)}")
        for node in running:
            node.send_signal(signal.SIGTERM)
        yield self._wait_ended(running, self._args.stop_timeout)
        stuck = [node for node in running if node.running]
        for node in stuck:
            self.say(f"{node.node_id} still runs after {self._args.stop_timeout:g} s: SIGKILL",
                     self._err)
            node.send_signal(signal.SIGKILL)
        yield self._wait_ended(stuck, KILL_SECONDS)
        for node in running:
            self.say(f"  {node.node_id} (pid {node.pid}): {node.describe_end()}")

    def _wait_ended(self, nodes, seconds: float) -> defer.Deferred:
        """Fires when every one of ``nodes`` ended, or after ``seconds``."""
        if not nodes:
            return defer.succeed(None)
        ended = defer.DeferredList([_observe(node.ended) for node in nodes], consumeErrors=True)
        return ended.addTimeout(seconds, self._reactor).addErrback(_timed_out)


def _bindable(address: str) -> bool:
    """Whether a listening socket could be bound to ``address`` (host:port) now.

    ``SO_REUSEADDR`` as Twisted sets it: a port left in TIME_WAIT counts as free.
    """
    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, int(port)))
        except OSError:
            return False
    return True


def _timed_out(failure) -> None:
    failure.trap(defer.TimeoutError)


def _observe(deferred: defer.Deferred) -> defer.Deferred:
    """A Deferred that fires when ``deferred`` does, leaving its result alone."""
    observer = defer.Deferred()

    def passed(result):
        observer.callback(None)
        return result

    deferred.addBoth(passed)
    return observer


def run(reactor, args):
    """The ``dev-cluster`` command (under `task.react`)."""
    # A shell starts a background job with SIGINT ignored, and the reactor handles
    # SIGINT only where it has its default handler: give it that, so that a SIGINT
    # stops the cluster however this command was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return DevCluster(reactor, args).run()
