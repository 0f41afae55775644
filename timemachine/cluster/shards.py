"""The shards a node serves: opened from the cluster config, changed by configure, closed.

Each shard is a shard log over its own WAL and `VnodeStore`, in
``<data-dir>/shards/<n>/wal/`` and ``<data-dir>/shards/<n>/jobs.sqlite``. A shard whose
log or store refuses to open (corruption, a failed disk) is kept aside as unavailable
with its reason, and the node serves the others: its requests get ``503
E_UNAVAILABLE`` and ``timemachine repair`` says what a cut would lose.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import defer
from twisted.logger import Logger

from timemachine.cluster.ring import Ring
from timemachine.domain.errors import (
    AlreadyConfigured,
    InvalidField,
    StorageError,
    Unavailable,
)
from timemachine.storage.store import VnodeStore


class LocalShards:
    """Opens, reconfigures and closes the shards of this node.

    ``logs`` maps shard -> (log, store) for the shards that serve; ``unavailable``
    maps shard -> the `StorageError` that kept it closed. Both dicts are shared with
    the coordinator, which routes by them, and are changed only here.

    ``make_log(name, wal_directory, store)`` builds a shard log (the node's: WAL,
    compactor, metrics); ``executor`` fires the jobs of the open shards;
    ``coordinator`` gets the ring once its shards are open; ``meta_log`` records a
    new configuration, which ``cluster_store`` (its state machine) then holds.
    """

    log = Logger()

    def __init__(self, reactor, node_id, data_dir, make_log, store_io, executor, coordinator,
                 meta_log, cluster_store):
        self._reactor = reactor
        self._node_id = node_id
        self._data_dir = data_dir
        self._make_log = make_log
        self._store_io = store_io
        self._executor = executor
        self._coordinator = coordinator
        self._meta_log = meta_log
        self._cluster_store = cluster_store
        self.logs: dict[int, tuple] = coordinator.shards
        self.unavailable: dict[int, StorageError] = coordinator.unavailable_shards
        self._configuring = defer.DeferredLock()

    def _shard_dir(self, shard: int) -> str:
        return os.path.join(self._data_dir, "shards", str(shard))

    @defer.inlineCallbacks
    def open(self, config):
        """Open this node's shards of ``config``; then route to them and fire their jobs."""
        ring = Ring(config)
        for shard in ring.shards_of(self._node_id):
            directory = self._shard_dir(shard)
            os.makedirs(directory, exist_ok=True)
            log = self._make_log(
                f"shard {shard}",
                os.path.join(directory, "wal"),
                VnodeStore(os.path.join(directory, "jobs.sqlite"), self._reactor, self._store_io),
            )
            try:
                yield log.open()
            except StorageError as error:
                self._shard_unavailable(shard, error)
                continue
            self.logs[shard] = (log, log.store)
        # Only now: a request routed by the ring must find its shard's log open.
        self._coordinator.ring = ring
        yield defer.gatherResults(
            [self._executor.add_shard(s, store, log) for s, (log, store) in self.logs.items()]
        )

    def _shard_unavailable(self, shard: int, error: StorageError):
        self.unavailable[shard] = error
        self.log.error(
            "shard {shard} is unavailable, the node serves its other shards: {error} -- "
            "see what a cut would lose with "
            "`timemachine repair --data-dir {data_dir} --shard {shard} --dry-run`",
            shard=shard,
            error=error,
            data_dir=self._data_dir,
            path=getattr(error, "path", None),
            offset=getattr(error, "offset", None),
            intact_records=getattr(error, "intact_records", None),
            records_beyond=getattr(error, "records_beyond", None),
        )

    @defer.inlineCallbacks
    def close(self):
        """Stop firing and close every open shard's log and store."""
        for shard, (log, _) in list(self.logs.items()):
            self._executor.remove_shard(shard)
            yield log.close()
            del self.logs[shard]
        self.unavailable.clear()

    def configure(self, shards: int, replicas: int):
        """Set the shard count and replication factor (``POST /cluster/configure``).

        One node
        can hold one replica. The shard count changes only while the cluster stores
        no jobs. Calls run one at a time, in the order they came: each closes and
        opens the shards, which two at once would do over each other.
        """
        return self._configuring.run(self._configure, shards, replicas)

    @defer.inlineCallbacks
    def _configure(self, shards: int, replicas: int):
        if replicas != 1:
            raise InvalidField("replicas", "must be at most the number of members (1)")
        current = self._cluster_store.config
        if current is not None and current.shards == shards:
            return current
        if self.unavailable:
            # A new shard count deletes every shard's files: never those of a shard
            # whose jobs cannot even be counted.
            raise Unavailable(
                "the shard count cannot change while shards "
                f"{sorted(self.unavailable)} are unavailable; repair them first"
            )
        # Built (and so validated) before anything is closed: a bad count changes nothing.
        config = Ring.single_node(self._node_id, shards).config
        if current is not None:
            # New writes get E_NOT_CONFIGURED (503, retry) while the shards change, and
            # those already proposed are applied before the stores are counted.
            ring, self._coordinator.ring = self._coordinator.ring, None
            try:
                yield defer.gatherResults([log.drain() for log, _ in self.logs.values()])
                counts = yield defer.gatherResults(
                    [store.count(None) for _, store in self.logs.values()]
                )
                if sum(counts):
                    raise AlreadyConfigured(
                        "the shard count cannot change while jobs are stored"
                    )
            except Exception:
                self._coordinator.ring = ring
                raise
            yield self.close()
            # Off the reactor: a tree of WAL segments and SQLite files.
            yield self._store_io.call(
                shutil.rmtree, os.path.join(self._data_dir, "shards"), True
            )
        yield self._meta_log.propose(config)
        yield self.open(config)
        return config
