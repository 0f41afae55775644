"""Assembly of one node: logs, stores, executor, publisher and the REST endpoint.

Data directory layout::

    <data-dir>/meta/wal/            the meta group's log (routes, cluster config)
    <data-dir>/meta/cluster.sqlite  its state machine
    <data-dir>/shards/<n>/wal/      shard n's log
    <data-dir>/shards/<n>/jobs.sqlite
"""

from __future__ import annotations

import gc
import os
import shutil

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.logger import Logger

from timemachine.cluster.compaction import Compactor
from timemachine.cluster.coordinator import Coordinator
from timemachine.cluster.retention import (
    DEFAULT_RETAIN_FAILED_MS,
    DEFAULT_RETAIN_FIRED_MS,
    Retention,
)
from timemachine.cluster.ring import DEFAULT_SHARDS, Ring
from timemachine.cluster.shardlog import LocalShardLog
from timemachine.domain.commands import Configure
from timemachine.domain.errors import (
    AlreadyConfigured,
    CorruptLog,
    InvalidField,
    StorageError,
    Unavailable,
)
from timemachine.firing.executor import Executor
from timemachine.firing.publisher import Publisher
from timemachine.http.routes import TimeMachineAPI
from timemachine.http.site import make_site
from timemachine.metrics import Metrics
from timemachine.storage.iothread import IOThread
from timemachine.storage.store import ClusterStore, VnodeStore
from timemachine.storage.wal import DEFAULT_SEGMENT_BYTES, WriteAheadLog


class Node(service.Service):
    """One timeMachine node. With no peers it is a one-node cluster.

    Nothing is opened before `startService`; ``http_endpoint`` is a Twisted endpoint
    description (``tcp:8001:interface=127.0.0.1``) or None to serve no REST port
    (tests drive `api` directly). ``advertise`` is the peer address shown to clients.
    ``wal_segment_bytes`` sizes every log's segments; ``retain_fired_ms`` and
    ``retain_failed_ms`` are how long finished jobs stay readable.
    ``compaction_options`` and ``retention_options`` go to each log's `Compactor`
    and to the node's `Retention` (tests shorten their periods).
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        node_id: str,
        data_dir: str,
        shards: int = DEFAULT_SHARDS,
        http_endpoint: str | None = None,
        bootstrap: bool = True,
        executor_options: dict | None = None,
        advertise: str = "127.0.0.1:8101",
        wal_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retain_fired_ms: int = DEFAULT_RETAIN_FIRED_MS,
        retain_failed_ms: int = DEFAULT_RETAIN_FAILED_MS,
        compaction_options: dict | None = None,
        retention_options: dict | None = None,
    ):
        self.reactor = reactor
        self.node_id = node_id
        self.data_dir = data_dir
        self.initial_shards = shards
        self.http_endpoint = http_endpoint
        self.bootstrap = bootstrap
        self.advertise = advertise
        self.executor_options = executor_options or {}
        self.shard_logs: dict[int, tuple[LocalShardLog, VnodeStore]] = {}
        # Shards of this node whose log or store refused to open, with the reason:
        # reported unavailable while the others serve.
        self.unavailable_shards: dict[int, StorageError] = {}
        self.wal_segment_bytes = wal_segment_bytes
        self.compaction_options = compaction_options or {}
        self.metrics = Metrics()
        self.retention = Retention(
            reactor,
            self.shard_logs,
            retain_fired_ms,
            retain_failed_ms,
            metrics=self.metrics,
            **(retention_options or {}),
        )
        self.meta_log = None
        self.cluster_store = None
        self.executor = None
        self.publisher = None
        self.coordinator = None
        self.api = None
        self.port = None
        self.ready = defer.Deferred()
        self._configuring = defer.DeferredLock()
        # One writer thread for every log and one thread for every store of the node:
        # the work of all shards that queues up meanwhile crosses over in one hop.
        self.wal_io = IOThread(reactor, "wal-writer")
        self.store_io = IOThread(reactor, "store")

    def _wal(self, directory):
        return WriteAheadLog(
            directory,
            self.reactor,
            segment_bytes=self.wal_segment_bytes,
            on_fsync=self.metrics.wal_fsync.observe,
            io=self.wal_io,
        )

    def _log(self, name, wal_directory, store):
        """A shard log (or the meta log) over a new WAL, compacted as it grows."""
        wal = self._wal(wal_directory)
        compactor = Compactor(
            name,
            wal,
            store,
            every_bytes=self.wal_segment_bytes,
            metrics=self.metrics,
            **self.compaction_options,
        )
        return LocalShardLog(name, wal, store, compactor)

    def startService(self):
        super().startService()
        d = self._start()
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure):
        if failure.check(CorruptLog):
            # Without its meta log the node knows neither its shards nor its routes.
            error = failure.value
            self.log.critical(
                "node {node} refuses to start: {error} -- see what a cut would lose with "
                "`timemachine repair --data-dir {data_dir} --meta --dry-run`",
                node=self.node_id,
                error=error,
                data_dir=self.data_dir,
                path=error.path,
                offset=error.offset,
                intact_records=error.intact_records,
                records_beyond=error.records_beyond,
            )
        else:
            self.log.failure("node {node} failed to start", failure, node=self.node_id)
        if self.reactor.running:
            self.reactor.stop()
        return failure

    @defer.inlineCallbacks
    def _start(self):
        os.makedirs(os.path.join(self.data_dir, "meta"), exist_ok=True)
        for io in (self.wal_io, self.store_io):
            io.start()
        self.cluster_store = ClusterStore(
            os.path.join(self.data_dir, "meta", "cluster.sqlite"), self.reactor, self.store_io
        )
        self.meta_log = self._log(
            "meta", os.path.join(self.data_dir, "meta", "wal"), self.cluster_store
        )
        yield self.meta_log.open()
        self.publisher = Publisher(self.reactor)
        self.executor = Executor(
            self.reactor,
            self.publisher,
            self.cluster_store.route,
            metrics=self.metrics,
            **self.executor_options,
        )
        self.coordinator = Coordinator(
            self.reactor, self.node_id, None, self.shard_logs, self.meta_log,
            self.cluster_store, self.metrics, unavailable_shards=self.unavailable_shards,
        )
        if self.cluster_store.config is None and self.bootstrap:
            yield self.meta_log.propose(Ring.single_node(self.node_id, self.initial_shards).config)
        if self.cluster_store.config is not None:
            yield self._open_shards(self.cluster_store.config)
        self.retention.start()
        self.api = TimeMachineAPI(self.coordinator, self, self.metrics)
        if self.http_endpoint:
            endpoint = endpoints.serverFromString(self.reactor, self.http_endpoint)
            self.port = yield endpoint.listen(make_site(self.api, self.metrics))
        # Everything allocated so far lives as long as the node: moved out of the
        # collector's sight, a full collection no longer walks ~100k objects (~30 ms,
        # a firing-lateness spike) to find nothing.
        gc.collect()
        gc.freeze()
        self.log.info(
            "node {node} serving {shards} shards from {data_dir}",
            node=self.node_id,
            shards=len(self.shard_logs),
            data_dir=self.data_dir,
        )
        self.ready.callback(self)

    def _shard_dir(self, shard: int) -> str:
        return os.path.join(self.data_dir, "shards", str(shard))

    @defer.inlineCallbacks
    def _open_shards(self, config: Configure):
        ring = Ring(config)
        for shard in ring.shards_of(self.node_id):
            directory = self._shard_dir(shard)
            os.makedirs(directory, exist_ok=True)
            log = self._log(
                f"shard {shard}",
                os.path.join(directory, "wal"),
                VnodeStore(os.path.join(directory, "jobs.sqlite"), self.reactor, self.store_io),
            )
            try:
                yield log.open()
            except StorageError as error:
                self._shard_unavailable(shard, error)
                continue
            self.shard_logs[shard] = (log, log.store)
        # Only now: a request routed by the ring must find its shard's log open.
        self.coordinator.ring = ring
        yield defer.gatherResults(
            [self.executor.add_shard(s, store, log) for s, (log, store) in self.shard_logs.items()]
        )

    def _shard_unavailable(self, shard: int, error: StorageError):
        self.unavailable_shards[shard] = error
        self.log.error(
            "shard {shard} is unavailable, the node serves its other shards: {error} -- "
            "see what a cut would lose with "
            "`timemachine repair --data-dir {data_dir} --shard {shard} --dry-run`",
            shard=shard,
            error=error,
            data_dir=self.data_dir,
            path=getattr(error, "path", None),
            offset=getattr(error, "offset", None),
            intact_records=getattr(error, "intact_records", None),
            records_beyond=getattr(error, "records_beyond", None),
        )

    @defer.inlineCallbacks
    def _close_shards(self):
        for shard, (log, _) in list(self.shard_logs.items()):
            self.executor.remove_shard(shard)
            yield log.close()
            del self.shard_logs[shard]
        self.unavailable_shards.clear()

    def configure(self, shards: int, replicas: int):
        """Set the shard count and replication factor (``POST /cluster/configure``).

        One node can hold one replica. The shard count changes only while the cluster
        stores no jobs. Calls run one at a time, in the order they came: each closes
        and opens the shards, which two at once would do over each other.
        """
        return self._configuring.run(self._configure, shards, replicas)

    @defer.inlineCallbacks
    def _configure(self, shards: int, replicas: int):
        if replicas != 1:
            raise InvalidField("replicas", "must be at most the number of members (1)")
        current = self.cluster_store.config
        if current is not None and current.shards == shards:
            return current
        if self.unavailable_shards:
            # A new shard count deletes every shard's files: never those of a shard
            # whose jobs cannot even be counted.
            raise Unavailable(
                "the shard count cannot change while shards "
                f"{sorted(self.unavailable_shards)} are unavailable; repair them first"
            )
        # Built (and so validated) before anything is closed: a bad count changes nothing.
        config = Ring.single_node(self.node_id, shards).config
        if current is not None:
            # New writes get E_NOT_CONFIGURED (503, retry) while the shards change, and
            # those already proposed are applied before the stores are counted.
            ring, self.coordinator.ring = self.coordinator.ring, None
            try:
                yield defer.gatherResults([log.drain() for log, _ in self.shard_logs.values()])
                counts = yield defer.gatherResults(
                    [store.count(None) for _, store in self.shard_logs.values()]
                )
                if sum(counts):
                    raise AlreadyConfigured(
                        "the shard count cannot change while jobs are stored"
                    )
            except Exception:
                self.coordinator.ring = ring
                raise
            yield self._close_shards()
            # Off the reactor: a tree of WAL segments and SQLite files.
            yield self.store_io.call(shutil.rmtree, os.path.join(self.data_dir, "shards"), True)
        yield self.meta_log.propose(config)
        yield self._open_shards(config)
        return config

    @defer.inlineCallbacks
    def stopService(self):
        """Stop accepting requests, let in-flight deliveries finish, close the logs."""
        super().stopService()
        try:
            if self.port is not None:
                yield self.port.stopListening()
            if self.executor is not None:
                yield self.executor.stop()
            yield self.retention.stop()
            yield self._close_shards()
            if self.meta_log is not None:
                yield self.meta_log.close()
            if self.publisher is not None:
                yield self.publisher.close()
        finally:
            # Last: the logs and stores above hand their final writes to these threads.
            for io in (self.wal_io, self.store_io):
                io.stop()

