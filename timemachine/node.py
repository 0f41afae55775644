"""Assembly of one node: logs, stores, executor, publisher and the REST endpoint.

Data directory layout::

    <data-dir>/meta/wal/            the meta group's log (routes, cluster config)
    <data-dir>/meta/cluster.sqlite  its state machine
    <data-dir>/shards/<n>/wal/      shard n's log
    <data-dir>/shards/<n>/jobs.sqlite
"""

from __future__ import annotations

import os

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
from timemachine.cluster.shards import LocalShards
from timemachine.domain.errors import (
    CorruptLog,
    StorageError,
)
from timemachine.firing.collector import settle_collector
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
    ``on_start_failure()`` is called when the node cannot start, before it stops the
    reactor (``twistd`` uses it to exit with a failure status).
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
        on_start_failure=None,
    ):
        self.reactor = reactor
        self.node_id = node_id
        self.on_start_failure = on_start_failure
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
        self.metrics.shards_unavailable.set_function(lambda: len(self.unavailable_shards))
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
        self.shards = None
        self.api = None
        self.port = None
        self.ready = defer.Deferred()
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
        if self.on_start_failure is not None:
            self.on_start_failure()
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
        self.shards = LocalShards(
            self.reactor, self.node_id, self.data_dir, self._log, self.store_io,
            self.executor, self.coordinator, self.meta_log, self.cluster_store,
        )
        if self.cluster_store.config is None and self.bootstrap:
            yield self.meta_log.propose(Ring.single_node(self.node_id, self.initial_shards).config)
        # Before the shards open: nothing is held for firing or served yet, so the
        # one full collection this costs holds nothing back (see firing.collector).
        settle_collector()
        if self.cluster_store.config is not None:
            yield self.shards.open(self.cluster_store.config)
        self.retention.start()
        self.api = TimeMachineAPI(self.coordinator, self, self.metrics)
        if self.http_endpoint:
            endpoint = endpoints.serverFromString(self.reactor, self.http_endpoint)
            self.port = yield endpoint.listen(make_site(self.api, self.metrics))
        self.log.info(
            "node {node} serving {shards} shards from {data_dir}",
            node=self.node_id,
            shards=len(self.shard_logs),
            data_dir=self.data_dir,
        )
        self.ready.callback(self)

    def configure(self, shards: int, replicas: int):
        """Set the shard count and replication factor (see `LocalShards.configure`)."""
        return self.shards.configure(shards, replicas)

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
            if self.shards is not None:
                yield self.shards.close()
            if self.meta_log is not None:
                yield self.meta_log.close()
            if self.publisher is not None:
                yield self.publisher.close()
        finally:
            # Last: the logs and stores above hand their final writes to these threads.
            for io in (self.wal_io, self.store_io):
                io.stop()

