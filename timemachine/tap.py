"""``twistd timemachine``: command-line options and the node service (API.md)."""

from __future__ import annotations

import atexit
import os
import re
import sys

from twisted.python import usage

from timemachine.cluster.raftgroup import COMPACT_EVERY_ENTRIES
from timemachine.cluster.ring import DEFAULT_SHARDS
from timemachine.domain.names import ID_ALPHABET
from timemachine.raft.engine import DEFAULT_KEEP_ENTRIES
from timemachine.storage.wal import DEFAULT_SEGMENT_BYTES

_HOST_PORT = re.compile(r"\A[^\s:]+:\d{1,5}\Z")
_DURATION = re.compile(r"\A(\d+(?:\.\d+)?)(ms|s|m|h|d)\Z")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
# Below a page, most records would get a file (and a directory fsync) of their own.
_MIN_SEGMENT_BYTES = 4096


def parse_duration_ms(text: str) -> int:
    """Milliseconds of a duration: a number with a unit (``500ms``, ``90s``, ``36h``,
    ``7d``; also ``m`` for minutes), or ``0``. Raises ValueError otherwise."""
    if text == "0":
        return 0
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: a number with a unit (500ms, 90s, 15m, 36h, 7d), or 0"
        )
    number, unit = match.groups()
    return round(float(number) * _UNIT_MS[unit])


def _port_of(endpoint: str) -> int | None:
    match = re.match(r"\Atcp:(\d+)", endpoint)
    return int(match.group(1)) if match else None


class Options(usage.Options):
    """Options of a node; every one of API.md's table."""

    synopsis = "[options]"
    longdesc = "Run one timeMachine node: a durable scheduler that fires jobs on time."

    optFlags = [
        ["no-bootstrap", None, "Start empty and wait for /cluster/join or /cluster/configure."],
    ]
    optParameters = [
        ["node-id", None, "node1", "Unique, stable name of the node."],
        ["data-dir", None, None, "WAL segments, shard stores, Raft state "
         "[default: ./timemachine-data/<node-id>]."],
        ["http", None, "tcp:8001:interface=127.0.0.1", "REST endpoint (Twisted endpoint string)."],
        ["peer", None, "tcp:8101:interface=127.0.0.1", "Peer protocol endpoint "
         "(compat: HTTP port = peer port - 100)."],
        ["advertise", None, None, "Address other nodes use to reach this one "
         "[default: host:port of --peer]."],
        ["join", None, None, "HTTP address of any member; the node asks to join on start."],
        ["shards", None, DEFAULT_SHARDS, "Shard count of the cluster this node bootstraps.", int],
        ["retain-fired", None, "7d", "How long a fired job stays readable (0: purge at once)."],
        ["retain-failed", None, "30d", "How long a failed job (dead letter) stays readable."],
        ["wal-segment-bytes", None, DEFAULT_SEGMENT_BYTES,
         "Size after which a log starts a new segment file.", int],
        ["compact-every", None, COMPACT_EVERY_ENTRIES,
         "Entries a Raft group applies between two compactions of its log.", int],
        ["keep-entries", None, DEFAULT_KEEP_ENTRIES,
         "Entries a compaction keeps below its snapshot, for followers slightly behind.",
         int],
    ]

    def postOptions(self):
        node_id = self["node-id"]
        if not node_id or len(node_id) > 128 or not ID_ALPHABET.match(node_id):
            raise usage.UsageError("--node-id: 1-128 characters of A-Z a-z 0-9 . _ : @ -")
        if self["data-dir"] is None:
            self["data-dir"] = f"./timemachine-data/{node_id}"
        if not 1 <= self["shards"] <= 4096:
            raise usage.UsageError("--shards must be between 1 and 4096")
        for name in ("retain-fired", "retain-failed"):
            try:
                self[f"{name}-ms"] = parse_duration_ms(self[name])
            except ValueError as e:
                raise usage.UsageError(f"--{name}: {e}") from None
        if self["wal-segment-bytes"] < _MIN_SEGMENT_BYTES:
            raise usage.UsageError(f"--wal-segment-bytes must be at least {_MIN_SEGMENT_BYTES}")
        if self["compact-every"] < 1:
            raise usage.UsageError("--compact-every must be at least 1")
        if self["keep-entries"] < 0:
            raise usage.UsageError("--keep-entries must be at least 0")
        for name in ("http", "peer"):
            if _port_of(self[name]) is None and not self[name].startswith("unix:"):
                raise usage.UsageError(f"--{name} must be a tcp: or unix: endpoint string")
        if self["advertise"] is None:
            host = re.search(r"interface=([^:]+)", self["peer"])
            self["advertise"] = f"{host.group(1) if host else '127.0.0.1'}:{_port_of(self['peer'])}"
        elif not _HOST_PORT.match(self["advertise"]):
            raise usage.UsageError("--advertise must be host:port")
        if self["join"] is not None and not _HOST_PORT.match(self["join"]):
            raise usage.UsageError("--join must be host:port of a member's HTTP endpoint")


def _exit_status_1() -> None:
    # twistd ends with status 0 whatever stopped its reactor: run last, at interpreter
    # exit (after twistd removed its pidfile), this makes a node that refused to start
    # look like the failure it is to a supervisor, not like a clean stop.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def makeService(options):
    """The node as a twistd service (nothing is opened until it starts)."""
    from twisted.internet import reactor

    from timemachine.node import Node

    return Node(
        reactor,
        node_id=options["node-id"],
        data_dir=options["data-dir"],
        shards=options["shards"],
        http_endpoint=options["http"],
        peer_endpoint=options["peer"],
        bootstrap=not options["no-bootstrap"],
        advertise=options["advertise"],
        wal_segment_bytes=options["wal-segment-bytes"],
        retain_fired_ms=options["retain-fired-ms"],
        retain_failed_ms=options["retain-failed-ms"],
        group_options={"compact_every": options["compact-every"]},
        raft_log_options={"keep_entries": options["keep-entries"]},
        join=options["join"],
        on_start_failure=lambda: atexit.register(_exit_status_1),
    )
