"""Moving a data directory written by a one-node build onto the Raft log.

A one-node build kept a write-ahead log per shard (``shards/<n>/wal/``) and one for
the meta state (``meta/wal/``), committing each entry on its own fsync. This build
keeps every group's Raft state in the node-wide log (``raft/``). On start, each old
log is first replayed into its store (what a restart of the old build did), so the
store holds every acknowledged write; the group then starts from a Raft snapshot at
the store's applied index, as a one-member group of this node in term 1. The old
log directory is renamed ``wal.migrated`` - never deleted: it is the operator's to
remove once the node serves.

A damaged old log refuses the migration (and the start) with the `CorruptLog` of the
WAL, naming file and offset; ``timemachine repair --data-dir D --shard N`` (or
``--meta``) cuts it, as before.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.logger import Logger

from timemachine.domain.codec import decode_command
from timemachine.peer.raftcodec import META_GROUP, group_of_shard
from timemachine.raft.types import ConfState, HardState, Ready, Snapshot
from timemachine.storage.store import ClusterStore, VnodeStore
from timemachine.storage.wal import WriteAheadLog

#: Entries replayed into a store per transaction.
REPLAY_BATCH = 2000
MIGRATED_SUFFIX = ".migrated"

_log = Logger()


def old_logs(data_dir: str) -> list[tuple[int, str, type]]:
    """``(group, directory, store class)`` of each one-node-build log in ``data_dir``."""
    found = []
    meta = os.path.join(data_dir, "meta")
    if os.path.isdir(os.path.join(meta, "wal")):
        found.append((META_GROUP, meta, ClusterStore))
    shards = os.path.join(data_dir, "shards")
    if os.path.isdir(shards):
        for name in sorted(os.listdir(shards), key=lambda n: (len(n), n)):
            directory = os.path.join(shards, name)
            if name.isdigit() and os.path.isdir(os.path.join(directory, "wal")):
                found.append((group_of_shard(int(name)), directory, VnodeStore))
    return found


@defer.inlineCallbacks
def migrate_single_node_layout(reactor, data_dir: str, node_id: str, engine, io):
    """Migrate every old log of ``data_dir`` into ``engine`` (open); see the module."""
    for group, directory, store_class in old_logs(data_dir):
        yield _migrate(reactor, group, directory, store_class, node_id, engine, io)


@defer.inlineCallbacks
def _migrate(reactor, group, directory, store_class, node_id, engine, io):
    wal_directory = os.path.join(directory, "wal")
    store_name = "cluster.sqlite" if store_class is ClusterStore else "jobs.sqlite"
    store = store_class(os.path.join(directory, store_name), reactor, io)
    wal = WriteAheadLog(wal_directory, reactor)
    yield wal.open()
    try:
        yield store.open()
        try:
            start = store.applied_index + 1
            while start <= wal.last_index:
                stop = min(wal.last_index + 1, start + REPLAY_BATCH)
                records = yield wal.read(start, stop)
                yield store.apply([(r.index, decode_command(r.payload)) for r in records])
                start = stop
            applied = store.applied_index
        finally:
            yield store.close()
    finally:
        yield wal.close()
    if group not in engine.groups():
        conf = ConfState(frozenset({node_id}))
        engine.storage(group, conf)
        point = Snapshot(applied, 1, conf, b"")
        yield engine.persist(
            group,
            Ready(snapshot=point, hard_state=HardState(1, node_id, applied), must_sync=True),
        )
    yield io.call(os.replace, wal_directory, wal_directory + MIGRATED_SUFFIX)
    _log.info(
        "migrated {directory} to the Raft log: its store holds every entry up to "
        "{applied}; the old log is kept as {kept}",
        directory=directory,
        applied=applied,
        kept=wal_directory + MIGRATED_SUFFIX,
    )
