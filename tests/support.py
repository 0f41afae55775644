"""Real collaborators for tests and benchmarks, and the fixtures the tests share.

Collaborators: a Redis server, an HTTP receiver, ``twistd`` node processes, nft
partitions. Fixtures: `ClusterTestCase` (a cluster of ``twistd`` nodes, each on a
loopback address of its own), `LocalGroup` (a one-member shard group over a real Raft
log and store), `start_local_node` and `NodeTestCase` (a whole node in the test's
process, listening on 127.0.0.1).

DESIGN.md asks for real parts rather than mocks: `RedisServer` runs the ``redis-server``
binary on a free port of 127.0.0.1 (never the system Redis on 6379), `HTTPReceiver`
is a twisted.web server that records what it receives and answers from a script.

Typical use in a trial test::

    def setUp(self):
        self.redis = RedisServer()
        self.redis.start()
        self.addCleanup(self.redis.stop)
        self.receiver = HTTPReceiver(reactor)
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing listens on right now.

    Another process may take it before the caller binds it; callers that start a
    server on it retry with a new port when that happens (see `RedisServer.start`).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def numbered_port_base(nodes: int, offsets=(0, 100), first: int | None = None) -> int:
    """A port base B such that, for node i of 1..``nodes``, every port B + offset + i
    (one per ``offsets``) is free on 127.0.0.i: upstream's numbering (HTTP 800i, peer
    810i) on other bases. ``first`` is tried first (e.g. 8000, upstream's own).

    Raises ``unittest.SkipTest`` when fifty tries find none.
    """

    def bindable(host: str, port: int) -> bool:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
        return True

    def candidate() -> int:
        # Just below a port the kernel handed out: a range that is usually free.
        return max(1024, free_port() - max(offsets) - nodes - 1)

    tries = [first] if first is not None else []
    for base in [*tries, *(candidate() for _ in range(50))]:
        if base + max(offsets) + nodes <= 65535 and all(
            bindable(f"127.0.0.{i}", base + offset + i)
            for i in range(1, nodes + 1)
            for offset in offsets
        ):
            return base
    raise unittest.SkipTest(f"no free port base for {nodes} nodes on 127.0.0.1-{nodes}")


# ---- Redis ---------------------------------------------------------------------------


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) read by `RespClient`."""


class RespClient:
    """A minimal blocking Redis client, to check from a test what landed in a server.

    Blocking the reactor for a local round trip is harmless in a test; call it only
    after the deliveries under test have fired.
    """

    def __init__(self, port: int, timeout: float = 5.0):
        self._sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def call(self, *args: str | bytes | int):
        """Send one command; return its reply (bytes, int, str, None or a list)."""
        self.send(*args)
        return self.read_reply()

    def send(self, *args: str | bytes | int) -> None:
        """Send one command without reading its reply."""
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(parts))

    def read_reply(self):
        """Read one reply (e.g. a message pushed to a SUBSCRIBE connection).

        Raises `RedisReplyError` for an error reply.
        """
        line = self._file.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            return None if size < 0 else self._file.read(size + 2)[:-2]
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.read_reply() for _ in range(size)]
        raise ValueError(f"not a RESP reply: {line!r}")

    def close(self) -> None:
        """Close the connection."""
        self._file.close()
        self._sock.close()


class RedisServer:
    """A throwaway ``redis-server`` on a free port of 127.0.0.1, without persistence.

    ``extra_args`` are appended to the command line, e.g. ``["--requirepass", "pw"]``.
    `start` blocks until the server answers; `stop` ends it, signalling only its PID.
    """

    def __init__(self, extra_args: list[str] | tuple[str, ...] = ()):
        self._extra_args = list(extra_args)
        self._process: subprocess.Popen | None = None
        self._dir: str | None = None
        self._paused = False
        self.port: int | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        self._dir = tempfile.mkdtemp(prefix="tm-redis-")
        for _ in range(3):  # the free port may be taken before redis binds it
            self.port = free_port()
            with open(os.path.join(self._dir, "redis.log"), "ab") as log:
                self._process = subprocess.Popen(
                    [
                        REDIS_SERVER,
                        "--port",
                        str(self.port),
                        "--bind",
                        "127.0.0.1",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        self._dir,
                        *self._extra_args,
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            if self._wait_until_answering(timeout):
                return
            self._end_process()
        raise RuntimeError(f"redis-server did not start; see {self._dir}/redis.log")

    def _wait_until_answering(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                client = RespClient(self.port, timeout=1.0)
            except OSError:
                time.sleep(0.01)
                continue
            try:
                client.call("PING")
                return True
            except RedisReplyError:  # e.g. NOAUTH: it answers, so it is up
                return True
            except OSError:
                time.sleep(0.01)
            finally:
                client.close()
        return False

    def client(self) -> RespClient:
        """A new blocking client connected to this server (close it when done)."""
        return RespClient(self.port)

    def call(self, *args: str | bytes | int):
        """Run one command on a fresh connection and return the reply."""
        client = self.client()
        try:
            return client.call(*args)
        finally:
            client.close()

    def pause(self) -> None:
        """SIGSTOP the server: it still accepts connections (the kernel does) but
        answers nothing, like a stuck server."""
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT a paused server."""
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its directory."""
        if self._process is not None:
            self._end_process()
            self._process = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _end_process(self) -> None:
        # Popen signals its own PID only, never a process group or a name.
        if self._process.poll() is None:
            if self._paused:
                self.resume()
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


# ---- HTTP ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What `HTTPReceiver` answers to one request.

    ``hold=True`` leaves the request unanswered until `HTTPReceiver.release`; a held
    request never released is a receiver that never answers.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    hold: bool = False


HOLD = Reply(hold=True)


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as `HTTPReceiver` saw it.

    ``headers`` maps lower-cased names to the first value; ``at`` is
    ``reactor.seconds()`` on arrival; ``peer_port`` is the client's port, which tells
    connections apart, and ``peer_host`` its address. ``uri`` is the request
    line's target as sent (the path with its query).
    """

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    peer_port: int
    peer_host: str = ""
    uri: str = ""


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, receiver: HTTPReceiver):
        super().__init__()
        self._receiver = receiver

    def render(self, request):
        return self._receiver._received(request)


class _ConnectionTracker(WrappingFactory):
    """Counts the connections accepted and tells when all of them are closed."""

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.accepted = 0
        self._all_closed: list[defer.Deferred] = []

    def registerProtocol(self, p):
        self.accepted += 1
        super().registerProtocol(p)

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._all_closed = self._all_closed, []
            for waiter in waiters:
                waiter.callback(None)

    def close_all(self) -> defer.Deferred:
        """Abort every open connection; fire once they are all gone."""
        if not self.protocols:
            return defer.succeed(None)
        closed = defer.Deferred()
        self._all_closed.append(closed)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return closed


class _QuietSite(Site):
    def log(self, request):
        pass  # the recorder keeps what tests need; access logs only add noise


class HTTPReceiver:
    """A webhook receiver on 127.0.0.1 (or another interface) that records requests
    and answers from a script.

    By default every request gets ``200`` with an empty body; `script` queues the
    answers for one path, e.g. ``receiver.script("/hook", [500, 200])`` answers 500,
    then 200, then the default again.
    """

    def __init__(self, reactor, interface: str = "127.0.0.1"):
        self._reactor = reactor
        self._interface = interface
        self._scripts: dict[str, list[Reply]] = {}
        self._waiters: list[tuple[int, defer.Deferred]] = []
        self._tracker = _ConnectionTracker(_QuietSite(_Recorder(self)))
        self._port = None
        self.requests: list[ReceivedRequest] = []
        self.held: list = []  # twisted.web requests waiting for `release`

    def start(self) -> None:
        """Listen on a free port of its interface (127.0.0.1 unless told)."""
        self._port = self._reactor.listenTCP(0, self._tracker, interface=self._interface)

    @property
    def port(self) -> int:
        """The port listened on."""
        return self._port.getHost().port

    @property
    def connections(self) -> int:
        """How many TCP connections were accepted so far."""
        return self._tracker.accepted

    def url(self, path: str = "/") -> str:
        """The URL of ``path`` on this receiver."""
        host = f"[{self._interface}]" if ":" in self._interface else self._interface
        return f"http://{host}:{self.port}{path}"

    def script(self, path: str, replies: list[int | Reply]) -> None:
        """Queue the answers to the next requests for ``path`` (an int is a status)."""
        queue = self._scripts.setdefault(path, [])
        queue.extend(Reply(r) if isinstance(r, int) else r for r in replies)

    def wait_for(self, count: int, timeout: float = 60.0) -> defer.Deferred:
        """Fire with `requests` once at least ``count`` requests have arrived; fail
        after ``timeout`` seconds (a test waiting for a lost delivery fails, saying
        so, rather than hang until trial's own timeout)."""
        if len(self.requests) >= count:
            return defer.succeed(self.requests)
        waiter = defer.Deferred()
        entry = (count, waiter)
        self._waiters.append(entry)

        def too_late():
            self._waiters.remove(entry)
            waiter.errback(AssertionError(
                f"{len(self.requests)} of {count} requests arrived within {timeout} s"
            ))

        call = self._reactor.callLater(timeout, too_late)

        def arrived(result):
            if call.active():
                call.cancel()
            return result

        return waiter.addBoth(arrived)

    def release(self, reply: Reply | int = 200) -> None:
        """Answer the oldest held request with ``reply``."""
        request = self.held.pop(0)
        self._answer(request, Reply(reply) if isinstance(reply, int) else reply)

    def stop(self) -> defer.Deferred:
        """Stop listening and abort open connections (held requests included)."""
        self.held = []
        stopped = defer.maybeDeferred(self._port.stopListening)
        return defer.gatherResults([stopped, self._tracker.close_all()])

    def _received(self, request):
        path = request.path.decode()
        self.requests.append(
            ReceivedRequest(
                method=request.method.decode(),
                path=path,
                headers={
                    name.decode().lower(): values[0].decode()
                    for name, values in request.requestHeaders.getAllRawHeaders()
                },
                body=request.content.read(),
                at=self._reactor.seconds(),
                peer_port=request.getClientAddress().port,
                peer_host=request.getClientAddress().host,
                uri=request.uri.decode(),
            )
        )
        queue = self._scripts.get(path)
        reply = queue.pop(0) if queue else Reply()
        if reply.hold:
            self.held.append(request)
            # The client may give up first: such a request can no longer be answered.
            request.notifyFinish().addErrback(lambda _: self._forget_held(request))
        else:
            self._answer(request, reply)

        # Last, so that a waiter sees the request answered or held.
        ready = [w for w in self._waiters if len(self.requests) >= w[0]]
        self._waiters = [w for w in self._waiters if w not in ready]
        for _, waiter in ready:
            waiter.callback(self.requests)
        return NOT_DONE_YET

    def _forget_held(self, request) -> None:
        if request in self.held:
            self.held.remove(request)

    @staticmethod
    def _answer(request, reply: Reply) -> None:
        request.setResponseCode(reply.status)
        for name, value in reply.headers.items():
            request.setHeader(name, value)
        request.write(reply.body)
        request.finish()


def fill_disk_under(path: str) -> None:
    """Make every later write to the open file ``path`` fail with ENOSPC.

    Being root, permissions cannot make a write fail, and there is no small
    filesystem to fill: the file's descriptor in this process is swapped for
    /dev/full with dup2, so the kernel fails real writes as a full disk does.
    Raises ``unittest.SkipTest`` where /dev/full or /proc/self/fd is missing.
    """
    from twisted.trial.unittest import SkipTest

    if not (os.path.exists("/dev/full") and os.path.isdir("/proc/self/fd")):
        raise SkipTest("needs Linux /dev/full and /proc/self/fd")
    target = os.path.realpath(path)
    descriptors = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == target:
                descriptors.append(int(fd))
        except OSError:  # the descriptor closed while listing
            continue
    if len(descriptors) != 1:
        raise AssertionError(f"expected one open descriptor of {path}, found {descriptors}")
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, descriptors[0])
    os.close(full)


def small_disk_at(testcase, directory: str, megabytes: int) -> None:
    """Mount a filesystem of ``megabytes`` (tmpfs) at ``directory`` (made if missing),
    unmounted at the test's cleanup: a disk a process in another test can really fill.
    Skips the test where mounting is not allowed (not root, or no CAP_SYS_ADMIN)."""
    from twisted.trial.unittest import SkipTest

    os.makedirs(directory, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", directory],
        capture_output=True, text=True, check=False,
    )
    if mounted.returncode != 0:
        raise SkipTest(f"cannot mount a small disk here: {mounted.stderr.strip()}")
    testcase.addCleanup(subprocess.run, ["umount", "--lazy", directory], check=False)


def fill_disk(directory: str) -> str:
    """Write a file in ``directory`` until its filesystem is full; the file's path."""
    path = os.path.join(directory, "filler")
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return path


def flip_byte(path: str, offset: int, mask: int = 0x01) -> None:
    """Flip the bits ``mask`` of the byte at ``offset`` of ``path``: bit rot on disk."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def tree_bytes(directory: str) -> dict[str, bytes]:
    """Every file under ``directory`` with its content, to show that nothing changed.

    SQLite's ``-wal`` and ``-shm`` companions are left out: opening a database may
    create them without changing what it holds.
    """
    contents = {}
    for root, _, names in os.walk(directory):
        for name in names:
            if name.endswith(("-wal", "-shm")):
                continue
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                contents[os.path.relpath(path, directory)] = f.read()
    return contents


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- network partitions ----------------------------------------------------------

NFT = shutil.which("nft") or "/usr/sbin/nft"


class Partition:
    """Real network partitions between loopback addresses, made with nft rules.

    Each node of a cluster test listens and dials from its own address (Linux routes
    all of 127/8 to lo), in a block no other test module uses (127.0.7.x for
    tests/integration/test_cluster.py, ...), so a cut never falls on a test another
    trial worker runs meanwhile. `cut` drops every packet between
    two groups of addresses, both ways; `heal` drops the rules; `remove` (register it
    as a cleanup) deletes this partition's own nft table, so no rule outlives the test
    and rules of other tests or of the machine are never touched. Needs root.
    """

    def __init__(self):
        self.table = f"tm_partition_{os.getpid()}_{id(self):x}"
        self._made = False

    def _nft(self, *commands: str) -> None:
        script = "\n".join(commands) + "\n"
        result = subprocess.run([NFT, "-f", "-"], input=script.encode(), capture_output=True)
        if result.returncode != 0:
            raise RuntimeError(f"nft failed ({result.returncode}): {result.stderr.decode()}")

    def _ensure_table(self) -> None:
        if not self._made:
            self._nft(
                f"add table ip {self.table}",
                f"add chain ip {self.table} output "
                "{ type filter hook output priority 0; policy accept; }",
            )
            self._made = True

    def cut(self, side_a, side_b, one_way: bool = False) -> None:
        """Drop all traffic between each address of ``side_a`` and each of ``side_b``
        (with ``one_way``, only what ``side_a`` sends to ``side_b``)."""
        self._ensure_table()
        rules = []
        for a in ([side_a] if isinstance(side_a, str) else side_a):
            for b in ([side_b] if isinstance(side_b, str) else side_b):
                for src, dst in ((a, b),) if one_way else ((a, b), (b, a)):
                    rules.append(
                        f"add rule ip {self.table} output ip saddr {src} ip daddr {dst} drop"
                    )
        self._nft(*rules)

    def heal(self) -> None:
        """Let all traffic through again."""
        if self._made:
            self._nft(f"flush chain ip {self.table} output")

    def rules(self) -> str:
        """The nft listing of this partition's table ("" when it has none)."""
        if not self._made:
            return ""
        result = subprocess.run(
            [NFT, "list", "table", "ip", self.table], capture_output=True, text=True
        )
        return result.stdout if result.returncode == 0 else ""

    def remove(self) -> None:
        """Delete this partition's table and every rule in it."""
        if self._made:
            self._nft(f"delete table ip {self.table}")
            self._made = False


def nft_tables() -> str:
    """Every nft table on the machine, as ``nft list tables`` prints them."""
    return subprocess.run([NFT, "list", "tables"], capture_output=True, text=True).stdout


def twistd_command() -> list[str]:
    """``twistd`` of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def timemachine_command() -> list[str]:
    """The ``timemachine`` console script of this interpreter's environment."""
    script = os.path.join(os.path.dirname(sys.executable), "timemachine")
    if os.path.exists(script):
        return [script]
    return [sys.executable, "-c", "from timemachine.cli import main; main()"]


class NodeProcess:
    """One ``twistd -n timemachine`` process on free ports of ``host`` (a loopback
    address of its own in cluster tests, so that nft rules can cut it off).

    The ports are chosen once: a restart comes back on the same addresses, as a real
    node does. ``extra`` are more options (``--join``, ...).
    """

    def __init__(self, data_dir: str, log_file: str, host: str = "127.0.0.1",
                 node_id: str = "node1", extra=()):
        self.data_dir = data_dir
        self.log_file = log_file
        self.host = host
        self.node_id = node_id
        self.extra = list(extra)
        self.http_port = free_port(host)
        self.peer_port = free_port(host)
        self.process = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.http_port}"

    @property
    def http_address(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def peer_address(self) -> str:
        return f"{self.host}:{self.peer_port}"

    def start(self):
        env = dict(os.environ)
        # The plugin in twisted/plugins/ of this checkout, installed or not.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [
                *twistd_command(), "-n", "--pidfile=", "--logfile", self.log_file,
                "timemachine", "--node-id", self.node_id, "--data-dir", self.data_dir,
                "--shards", "4",
                "--http", f"tcp:{self.http_port}:interface={self.host}",
                "--peer", f"tcp:{self.peer_port}:interface={self.host}",
                *self.extra,
            ],
            env=env,
            stdin=subprocess.DEVNULL,
        )

    def kill(self, sig=signal.SIGKILL):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=30)

    def log_tail(self) -> str:
        try:
            with open(self.log_file) as f:
                return f.read()[-3000:]
        except OSError:
            return ""


@defer.inlineCallbacks
def start_node_process(testcase, reactor, http, data_dir: str, until: str = "/ready",
                       node: NodeProcess | None = None, **options):
    """A `NodeProcess` on ``data_dir`` once ``until`` answers 200 (over treq ``http``).

    ``node`` restarts a process made before; ``options`` make a new one (`NodeProcess`
    keywords). The process is killed at the test's cleanup; the test fails if it exits
    first or does not answer within 30 s.
    """
    from twisted.internet import task

    if node is None:
        node = NodeProcess(data_dir, os.path.abspath(testcase.mktemp()) + ".log", **options)
    node.start()
    testcase.addCleanup(node.kill)
    for _ in range(600):
        if node.process.poll() is not None:
            testcase.fail(f"node exited with {node.process.returncode}:\n{node.log_tail()}")
        try:
            response = yield http.get(node.url + until)
            yield response.content()
            if response.code == 200:
                return node
        except Exception:
            pass
        yield task.deferLater(reactor, 0.05, lambda: None)
    testcase.fail(f"node did not answer {until}:\n{node.log_tail()}")


@defer.inlineCallbacks
def call_json(http, method: str, url: str, body=None, timeout: float | None = None):
    """``(status, decoded JSON answer)`` of a request with an optional JSON ``body``;
    with ``timeout``, a request unanswered after that many seconds fails."""
    data = None if body is None else json.dumps(body).encode()
    response = yield http.request(method, url, data=data, timeout=timeout)
    content = yield response.content()
    return response.code, json.loads(content)


class PollingTestCase(unittest.TestCase):
    """A test that waits on real processes by asking them again and again."""

    @defer.inlineCallbacks
    def until(self, what, check, timeout=30.0):
        """Poll ``check()`` (a Deferred of a bool) every 0.1 s until it holds; fail
        naming ``what`` after ``timeout`` seconds. A check that raises counts as
        not yet (a node starting, stopping or cut off answers so)."""
        from twisted.internet import reactor, task

        deadline = reactor.seconds() + timeout
        while True:
            try:
                if (yield check()):
                    return
            except Exception:
                pass
            if reactor.seconds() > deadline:
                self.fail(f"not within {timeout} s: {what}")
            yield task.deferLater(reactor, 0.1, lambda: None)


class ClusterTestCase(PollingTestCase):
    """A cluster of `NodeProcess` nodes, node ``n`` on ``hosts[n - 1]`` (a subclass
    names the loopback addresses its nodes take), with a treq client and helpers to
    join and configure it, call its nodes, wait, and check what a receiver got."""

    timeout = 180
    hosts: list[str] = []

    def setUp(self):
        from twisted.internet import reactor

        self.base = os.path.abspath(self.mktemp())
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))
        self.nodes = {}

    @defer.inlineCallbacks
    def start(self, number, until="/ready", extra=()):
        from twisted.internet import reactor

        node_id = f"node{number}"
        node = yield start_node_process(
            self, reactor, self.http, os.path.join(self.base, node_id), until,
            host=self.hosts[number - 1], node_id=node_id, extra=extra,
        )
        self.nodes[node_id] = node
        return node

    def call(self, node_id, method, path, body=None):
        return call_json(self.http, method, self.nodes[node_id].url + path, body)

    def log_of(self, node_id) -> str:
        """What ``node_id`` has logged so far, over all its runs."""
        with open(self.nodes[node_id].log_file) as f:
            return f.read()

    def assert_delivered(self, receiver, due_of, max_repeats=None):
        """Every job of ``due_of`` (id -> trigger ms) delivered, none early; repeats only
        as a failover allows: a delivery whose outcome a leader change cut off, with
        the same ``Idempotency-Key``, and few of them (a leader that fires without a
        lease repeats every job it holds): at most ``max_repeats``, by default a tenth
        of the jobs."""
        keys = {}
        repeats = []
        for r in receiver.requests:
            job_id = r.headers["x-timemachine-job-id"]
            self.assertIn(job_id, due_of)
            self.assertGreaterEqual(r.at * 1000, due_of[job_id], f"{job_id} fired early")
            key = r.headers["idempotency-key"]
            if job_id in keys:
                self.assertEqual(key, keys[job_id], f"{job_id} repeated with another key")
                repeats.append(f"{job_id} (due {due_of[job_id]}, again at {r.at * 1000:.0f})")
            keys[job_id] = key
        self.assertEqual(sorted(keys), sorted(due_of))
        if max_repeats is None:
            max_repeats = len(due_of) // 10
        self.assertLessEqual(len(repeats), max_repeats, f"repeated deliveries: {repeats}")

    @defer.inlineCallbacks
    def create_once(self, node_id, collection, job):
        """POST ``job`` through ``node_id``; fire with whether it is stored. A 503 may
        hide a commit (the answer was lost, not the write), so a retry first looks
        for the job: posting it again would replace it, and one already fired would
        fire again as a new version. Only a 404 says it is absent."""
        path = f"/job/{collection}"
        code, _ = yield self.call(node_id, "GET", f"{path}/{job['id']}")
        if code != 404:
            return code == 200
        code, _ = yield self.call(node_id, "POST", path, job)
        return code == 200

    @defer.inlineCallbacks
    def create_batch(self, node_id, jobs):
        """POST ``jobs`` as one batch through ``node_id``; every item must be stored."""
        code, answer = yield self.call(node_id, "POST", "/job/c", jobs)
        self.assertEqual(code, 200, answer)
        failed = [r for r in answer["results"] if r["status"] != "ok"]
        self.assertEqual(failed, [], node_id)

    def create_far(self, node_id, ids):
        """Jobs ``ids`` of collection ``c``, due in an hour on route ``hook``, posted
        as one batch through ``node_id``; every one must be stored."""
        from twisted.internet import reactor

        far = int(reactor.seconds() * 1000) + 3_600_000
        return self.create_batch(
            node_id, [{"id": job_id, "trigger_ms": far, "route": "hook"} for job_id in ids]
        )

    def pause(self, node_id):
        """SIGSTOP ``node_id``'s process (SIGCONT at the test's cleanup, if it still
        runs); returns the process, for its SIGCONT."""
        process = self.nodes[node_id].process
        process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: process.poll() is None and process.send_signal(signal.SIGCONT))
        return process

    @defer.inlineCallbacks
    def servers(self, node_id):
        code, answer = yield self.call(node_id, "GET", "/cluster/servers")
        return answer if code == 200 else None

    @defer.inlineCallbacks
    def join(self, number, via="node1", extra=()):
        """Start node ``number`` (``extra`` options) and have ``via`` admit it, as
        join.sh does."""
        node = yield self.start(number, extra=extra)
        code, answer = yield self.call(
            via, "POST", "/cluster/join",
            {"node_id": node.node_id, "raft_address": node.peer_address,
             "http_address": node.http_address},
        )
        self.assertEqual(code, 200, answer)
        return node

    @defer.inlineCallbacks
    def joined(self, count, extra=()):
        """``count`` nodes (``extra`` options each), node1 having admitted the others;
        fires once every node sees them all, with the voters the meta group promotes
        (all of them up to 3; 3 of 4)."""
        from timemachine.cluster.placement import meta_voters

        yield self.start(1, extra=extra)
        for number in range(2, count + 1):
            yield self.join(number, extra=extra)
        voters = len(meta_voters([f"node{n}" for n in range(1, count + 1)], ()))
        expected = ["Nonvoter"] * (count - voters) + ["Voter"] * voters

        @defer.inlineCallbacks
        def all_in():
            # As every node sees it: one still waiting for the meta state is not in yet.
            for node_id in self.nodes:
                answer = yield self.servers(node_id)
                if sorted(s["Suffrage"] for s in answer["servers"]) != expected:
                    return False
            return True

        yield self.until(f"{count} members, {voters} of them voters", all_in)

    @defer.inlineCallbacks
    def configure(self, via, shards, replicas):
        """Configure (as configure.sh, through ``via``); fire once every node sees
        every shard's group made of the replicas the map names, all serving."""
        code, answer = yield self.call(
            via, "POST", "/cluster/configure", {"shards": shards, "replicas": replicas}
        )
        self.assertEqual((code, answer.get("replicas")), (200, replicas), answer)
        yield self.until(
            "every shard's group as the map places it", self.groups_as_placed,
            timeout=60.0,
        )

    @defer.inlineCallbacks
    def nodes_configured(self, count=3, shards=6, replicas=3, extra=()):
        """`joined` ``count`` nodes (``extra`` options each), then `configure`d
        through the last one."""
        yield self.joined(count, extra=extra)
        yield self.configure(f"node{count}", shards, replicas)

    @defer.inlineCallbacks
    def groups_as_placed(self):
        """Whether, on every running node, each shard serves and each replica it holds
        has the map's replicas as voters (and no learner)."""
        for node_id, node in self.nodes.items():
            if node.process.poll() is not None:
                continue
            code, answer = yield self.call(node_id, "GET", "/cluster/shards")
            if code != 200:
                return False
            for entry in answer["shards"]:
                if (entry["status"] == "elsewhere") == (node_id in entry["replicas"]):
                    return False  # a replica placed here missing, or one not dropped
                if entry["status"] == "elsewhere":
                    continue
                if entry["status"] != "serving" or entry["learners"]:
                    return False
                if sorted(entry["voters"]) != sorted(entry["replicas"]):
                    return False
        return True

    @defer.inlineCallbacks
    def route_to_receiver(self, via, route_id="hook"):
        """A started `HTTPReceiver` and a route ``route_id`` to it, written through
        ``via``."""
        from twisted.internet import reactor

        receiver = HTTPReceiver(reactor)
        receiver.start()
        self.addCleanup(receiver.stop)
        code, answer = yield self.call(
            via, "POST", "/route",
            {"id": route_id, "type": "http", "webhook_url": receiver.url(f"/{route_id}")},
        )
        self.assertEqual(code, 200, answer)
        return receiver

    @defer.inlineCallbacks
    def route_nowhere(self, via, route_id="hook"):
        """A route ``route_id`` (written through ``via``) to a port of 127.0.0.1 where
        nothing listens: for jobs due long after the test."""
        code, answer = yield self.call(
            via, "POST", "/route",
            {"id": route_id, "type": "http", "webhook_url": "http://127.0.0.1:9/never"},
        )
        self.assertEqual(code, 200, answer)

    @defer.inlineCallbacks
    def shard_entries(self, via):
        """``via``'s ``/cluster/shards`` entries, by shard."""
        code, answer = yield self.call(via, "GET", "/cluster/shards")
        self.assertEqual(code, 200, answer)
        return answer["shards"]

    @defer.inlineCallbacks
    def shard_leaders(self, via):
        """Each shard's leader, as ``via`` sees it."""
        entries = yield self.shard_entries(via)
        return [entry["leader"] for entry in entries]

    @defer.inlineCallbacks
    def busiest_leader(self, via):
        """The node leading the most shards, as ``via`` sees it."""
        leaders = yield self.shard_leaders(via)
        return max(sorted(set(leaders)), key=leaders.count)


# ---- fixtures built from the product's own parts -------------------------------------


class LocalGroup:
    """A one-member Raft group over a real `RaftEngine` and store: the shard log a
    one-node cluster gives each shard (not yet opened; `open` waits until it leads).

    ``store`` is by default a real `VnodeStore` in ``directory/jobs.sqlite``;
    ``raft_log_options`` go to the engine (``keep_entries``, ``segment_bytes``) and
    ``group_options`` to the `RaftGroup`. Everything else is the group's.
    """

    def __init__(self, directory: str, reactor, name: str = "shard 0", store=None,
                 raft_log_options: dict | None = None, **group_options):
        import random

        from timemachine.cluster.raftgroup import EngineDisk, RaftGroup, RaftHost
        from timemachine.raft.engine import RaftEngine
        from timemachine.raft.types import ConfState
        from timemachine.storage.iothread import IOThread
        from timemachine.storage.store import VnodeStore

        os.makedirs(directory, exist_ok=True)
        if store is None:
            store = VnodeStore(os.path.join(directory, "jobs.sqlite"), reactor)
        self._io = IOThread(reactor, f"test {name}")
        self.engine = RaftEngine(
            os.path.join(directory, "raft"), reactor, self._io, **(raft_log_options or {})
        )
        self.host = RaftHost(reactor, "node1", lambda *message: None, random.Random(1))
        self.group = RaftGroup(
            self.host, 1, name, EngineDisk(self.engine, 1), store, self._io,
            bootstrap=ConfState(frozenset({"node1"})), **group_options,
        )

    def __getattr__(self, name):
        return getattr(self.group, name)

    @defer.inlineCallbacks
    def open(self):
        self._io.start()
        yield self.engine.open()
        yield self.group.open()
        self.host.start()
        yield self.group.wait_leading()

    @defer.inlineCallbacks
    def close(self):
        yield self.group.close()
        self.host.stop()
        yield self.engine.close()
        self._io.stop()


@defer.inlineCallbacks
def start_local_node(reactor, data_dir: str, node_id: str = "node1", **options):
    """A started `Node` on ``data_dir``, its REST port on a free port of 127.0.0.1.

    ``options`` are more keyword arguments of `Node`. The caller stops it.
    """
    from timemachine.node import Node

    node = Node(reactor, node_id, data_dir, http_endpoint="tcp:0:interface=127.0.0.1",
                **options)
    yield node.startService()
    return node


def node_url(node) -> str:
    """The base URL of a node started by `start_local_node`."""
    return f"http://127.0.0.1:{node.port.getHost().port}"


class NodeTestCase(unittest.TestCase):
    """Starts a node on a fresh data dir, with an HTTP receiver and a treq client;
    `restart` keeps the data dir."""

    shards = 4
    bootstrap = True
    node_options: dict = {}  # more keyword arguments of Node, for a subclass

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet import reactor

        self.data_dir = self.mktemp()
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        self.receiver = HTTPReceiver(reactor)
        self.receiver.start()
        self.addCleanup(self.receiver.stop)
        self.node = None
        yield self.start_node()
        self.addCleanup(self.stop_node)

    @defer.inlineCallbacks
    def start_node(self):
        from twisted.internet import reactor

        self.node = yield start_local_node(
            reactor,
            self.data_dir,
            shards=self.shards,
            bootstrap=self.bootstrap,
            executor_options={"refresh_ms": 200},
            **self.node_options,
        )
        self.base = node_url(self.node)

    @defer.inlineCallbacks
    def stop_node(self):
        if self.node is not None and self.node.running:
            yield self.node.stopService()

    @defer.inlineCallbacks
    def restart(self):
        yield self.stop_node()
        yield self.start_node()

    def now_ms(self):
        from twisted.internet import reactor

        return int(reactor.seconds() * 1000)

    @defer.inlineCallbacks
    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        response = yield self.http.request(method, self.base + path, data=data)
        content = yield response.content()
        return response.code, json.loads(content) if content else None

    @defer.inlineCallbacks
    def route(self, route_id="hook", **fields):
        body = {"id": route_id, "type": "http", "webhook_url": self.receiver.url(f"/{route_id}")}
        body.update(fields)
        code, answer = yield self.call("POST", "/route", body)
        self.assertEqual(code, 200, answer)

    @defer.inlineCallbacks
    def job(self, collection, job_id, trigger_ms, route="hook", meta=None):
        body = {"id": job_id, "trigger_ms": trigger_ms, "route": route, "meta": meta}
        code, answer = yield self.call("POST", f"/job/{collection}", body)
        self.assertEqual(code, 200, answer)
        return answer

    @defer.inlineCallbacks
    def wait_for_status(self, collection, job_id, status, rounds=500):
        """Poll the job over REST until it reaches ``status`` (bounded)."""
        from twisted.internet import reactor, task

        for _ in range(rounds):
            code, job = yield self.call("GET", f"/job/{collection}/{job_id}")
            if code == 200 and job["status"] == status:
                return job
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{collection}/{job_id} never reached {status}: {job}")
