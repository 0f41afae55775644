"""Assembly of one node: Raft groups, stores, executor, publisher, peers and REST.

Data directory layout::

    <data-dir>/raft/                  the node-wide Raft log of every group
                                      (`timemachine.raft.engine.RaftEngine`)
    <data-dir>/meta/cluster.sqlite    the meta group's state machine (members, shard
                                      map, routes, settings)
    <data-dir>/shards/<n>/jobs.sqlite shard n's state machine

A data directory written by a one-node build (a log per shard in ``meta/wal/`` and
``shards/<n>/wal/``) is migrated on start: see `timemachine.cluster.migrate`.
"""

from __future__ import annotations

import os
import random
import shutil

from treq.client import HTTPClient
from twisted.application import service
from twisted.internet import defer, endpoints, task
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from timemachine.cluster.coordinator import Coordinator
from timemachine.cluster.forwarding import Forwarding
from timemachine.cluster.identity import identity_problem, load_identity
from timemachine.cluster.membership import Membership
from timemachine.cluster.migrate import migrate_single_node_layout
from timemachine.cluster.mover import LeaderSpreader, ReplicaMover
from timemachine.cluster.raftgroup import (
    SET_ASIDE_DIR,
    TICK_SECONDS,
    EngineDisk,
    RaftGroup,
    RaftHost,
)
from timemachine.cluster.removal import Removals
from timemachine.cluster.retention import (
    DEFAULT_RETAIN_FAILED_MS,
    DEFAULT_RETAIN_FIRED_MS,
    Retention,
)
from timemachine.cluster.ring import DEFAULT_SHARDS, Ring
from timemachine.cluster.shards import HANDOVER_SECONDS, Shards
from timemachine.domain.commands import Configure, PutMember, RemoveMember
from timemachine.domain.errors import (
    CorruptLog,
    InvalidField,
    NotConfigured,
    NotFound,
    StorageError,
    Unavailable,
)
from timemachine.firing.collector import settle_collector
from timemachine.firing.executor import Executor
from timemachine.firing.publisher import Publisher
from timemachine.http.routes import TimeMachineAPI
from timemachine.http.site import make_site
from timemachine.metrics import Metrics
from timemachine.peer.network import PeerNetwork, split_host_port
from timemachine.peer.raftcodec import (
    META_GROUP,
    BadRaftMessage,
    decode_message,
    encode_message,
    group_of_shard,
    shard_of_group,
)
from timemachine.raft.engine import RaftEngine
from timemachine.raft.types import ConfState
from timemachine.storage.durable import write_atomically
from timemachine.storage.iothread import IOThread
from timemachine.storage.sqlite import unlink_if_exists
from timemachine.storage.store import ClusterStore, VnodeStore
from timemachine.storage.wal import DEFAULT_SEGMENT_BYTES

#: Seconds a replica asked to answer a read for this node may take before the next
#: replica is asked.
REPLICA_PROXY_TIMEOUT = 5.0
#: Seconds a count of a shard's jobs waits for the shard to have a leader to ask.
COUNT_WAIT_SECONDS = 5.0
#: Seconds a question to another node's REST API (its shards' state, a leadership
#: transfer) may take: a paused node accepts connections and never answers, and one
#: cut off leaves a pooled connection hanging until TCP gives up, many minutes on.
PEER_API_SECONDS = 10.0
#: Marks a REST request a node passed on to another, which must answer it itself.
FORWARDED_HEADER = "X-TimeMachine-Forwarded"
#: In the data dir while a node that gave up the one-node cluster it bootstrapped
#: waits for the joined cluster's meta state: a restart then waits too, blank, where
#: it would otherwise bootstrap a one-node cluster again and take writes that the
#: joined cluster's state would then replace.
JOINING_MARKER = "joining"
#: In the data dir after `timemachine repair --raft` cut the node's Raft log, until
#: every member of a group with other voters holds an entry committed in its leader's
#: term: till then they do not vote (`RaftCore.catching_up`), which a log cut below what
#: they acknowledged would make unsafe.
REPAIRED_MARKER = "raft-repaired"
#: Seconds between checks whether the node's members caught up after a repair.
REPAIR_CHECK_SECONDS = 1.0


class Node(service.Service):
    """One timeMachine node. With no peers it is a one-node cluster.

    Nothing is opened before `startService`; ``http_endpoint`` is a Twisted endpoint
    description (``tcp:8001:interface=127.0.0.1``) or None to serve no REST port
    (tests drive `api` directly); ``peer_endpoint`` is the peer protocol's, and
    ``advertise`` (``host:port``; port 0: the port listened on) the address other
    nodes dial. ``wal_segment_bytes`` sizes the Raft log's segments;
    ``retain_fired_ms`` and ``retain_failed_ms`` are how long finished jobs stay
    readable. ``group_options`` go to each `RaftGroup`, ``raft_log_options`` to the
    `RaftEngine` and ``retention_options`` to the node's `Retention` (tests shorten
    their periods); ``tick_seconds`` is the
    Raft clock. ``join`` (``host:port`` of any member's REST API) makes a node with a
    new data directory ask to join that cluster instead of starting its own.
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
        peer_endpoint: str = "tcp:0:interface=127.0.0.1",
        advertise: str = "127.0.0.1:0",
        wal_segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        retain_fired_ms: int = DEFAULT_RETAIN_FIRED_MS,
        retain_failed_ms: int = DEFAULT_RETAIN_FAILED_MS,
        group_options: dict | None = None,
        raft_log_options: dict | None = None,
        retention_options: dict | None = None,
        tick_seconds: float = TICK_SECONDS,
        join: str | None = None,
        on_start_failure=None,
    ):
        self.reactor = reactor
        self.node_id = node_id
        self.on_start_failure = on_start_failure
        self.data_dir = data_dir
        self.initial_shards = shards
        self.http_endpoint = http_endpoint
        self.peer_endpoint = peer_endpoint
        self.bootstrap = bootstrap
        self.advertise = advertise
        self.executor_options = executor_options or {}
        self.group_options = group_options or {}
        self.raft_log_options = raft_log_options or {}
        self.tick_seconds = tick_seconds
        self.join_address = join
        # Set once this node gave up the one-node cluster it bootstrapped to join
        # another: blank until that cluster's meta state arrives, it must not start one.
        self._left_alone_to_join = False
        # Blank after leaving its one-node cluster (or restarted so, see
        # JOINING_MARKER), until the joined cluster's meta state arrives.
        self._awaiting_cluster_state = False
        # Checks, after a repair of the Raft log, until every member caught up.
        self._repair_check: task.LoopingCall | None = None
        self.shard_logs: dict[int, tuple[RaftGroup, VnodeStore]] = {}
        # Shards of this node whose replica refused to open, with the reason:
        # reported unavailable while the others serve.
        self.unavailable_shards: dict[int, StorageError] = {}
        self.wal_segment_bytes = wal_segment_bytes
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
        self.rng = random.Random()
        self.incarnation = ""
        self.engine = None
        self.network = None
        self.host = None
        self.membership = None
        self.mover = None
        self.spreader = None
        self.removals = None
        self.forwarding = None
        self.http_client = None
        self._joining = None
        self.meta_log = None
        self.cluster_store = None
        self.executor = None
        self.publisher = None
        self.coordinator = None
        self.shards = None
        self.api = None
        self.port = None
        self._http_address = ""
        self.ready = defer.Deferred()
        # One writer thread for the Raft log and one thread for every store of the
        # node: the work of all shards that queues up meanwhile crosses in one hop.
        self.wal_io = IOThread(reactor, "wal-writer")
        self.store_io = IOThread(reactor, "store")

    def startService(self):
        super().startService()
        d = self._start()
        d.addErrback(self._start_failed)
        return d

    def _start_failed(self, failure):
        if failure.check(CorruptLog):
            # Without its Raft log or meta state the node knows neither its shards
            # nor its routes.
            error = failure.value
            self.log.critical(
                "node {node} refuses to start: {error} -- see what a cut would lose with "
                "`timemachine repair --data-dir {data_dir} --raft --dry-run`",
                node=self.node_id,
                error=error,
                data_dir=self.data_dir,
                path=error.path,
                offset=error.offset,
                intact_records=error.intact_records,
                records_beyond=error.records_beyond,
            )
        elif failure.check(StorageError):
            self.log.critical(
                "node {node} refuses to start: {error}", node=self.node_id, error=failure.value
            )
        else:
            self.log.failure("node {node} failed to start", failure, node=self.node_id)
        if self.on_start_failure is not None:
            self.on_start_failure()
        if self.reactor.running:
            self.reactor.stop()
        else:
            # twistd starts the service before it runs the reactor: a step that fails
            # at once gets here first, and the reactor must still stop once it runs.
            self.reactor.callWhenRunning(self.reactor.stop)
        return failure

    @defer.inlineCallbacks
    def _start(self):
        os.makedirs(os.path.join(self.data_dir, "meta"), exist_ok=True)
        for io in (self.wal_io, self.store_io):
            io.start()
        # Before anything else of the data dir is touched: it may be another node's.
        self.incarnation = yield self.store_io.call(load_identity, self.data_dir, self.node_id)
        self.engine = RaftEngine(
            os.path.join(self.data_dir, "raft"),
            self.reactor,
            self.store_io,
            wal_io=self.wal_io,
            segment_bytes=self.wal_segment_bytes,
            on_fsync=self.metrics.wal_fsync.observe,
            **self.raft_log_options,
        )
        yield self.engine.open()
        self.metrics.log_bytes.labels(log="raft").set_function(lambda: self.engine.bytes_on_disk)
        yield migrate_single_node_layout(
            self.reactor, self.data_dir, self.node_id, self.engine, self.store_io
        )
        self.network = PeerNetwork(
            self.reactor,
            self.node_id,
            endpoints.serverFromString(self.reactor, self.peer_endpoint),
            self.advertise,
            random.Random(self.rng.random()),
            ready=lambda: self.ready.called,
            incarnation=self.incarnation,
        )
        yield self.network.start()
        self.host = RaftHost(
            self.reactor,
            self.node_id,
            self._send_raft,
            random.Random(self.rng.random()),
            tick_seconds=self.tick_seconds,
        )
        self.host.catching_up = os.path.exists(self._repaired_marker)
        self.network.set_raft_receiver(self._receive_raft)
        self.metrics.follow_cluster(self.host.groups, self.network.stats)
        self.cluster_store = ClusterStore(
            os.path.join(self.data_dir, "meta", "cluster.sqlite"), self.reactor, self.store_io
        )
        fresh = META_GROUP not in self.engine.groups()
        if os.path.exists(self._joining_marker):
            self._left_alone_to_join = self._awaiting_cluster_state = True
        bootstrapping = (
            fresh and self.bootstrap and self.join_address is None
            and not self._awaiting_cluster_state
        )
        self.meta_log = RaftGroup(
            self.host,
            META_GROUP,
            "meta",
            EngineDisk(self.engine, META_GROUP),
            self.cluster_store,
            self.store_io,
            bootstrap=ConfState(frozenset({self.node_id})) if bootstrapping else None,
            set_aside_dir=os.path.join(self.data_dir, SET_ASIDE_DIR, "meta"),
            **self.group_options,
        )
        yield self.meta_log.open()
        self._joined_if_so()
        if self.meta_log.alone:
            yield self.meta_log.wait_leading()
        self._http_pool = HTTPConnectionPool(self.reactor, persistent=True)
        # Calls to the other nodes leave from the advertised address, as the peer
        # connections do: a partition of that address cuts them too.
        self.http_client = HTTPClient(Agent(
            self.reactor, pool=self._http_pool,
            bindAddress=(split_host_port(self.network.advertise)[0], 0),
        ))
        self.membership = Membership(
            self.reactor, self.node_id, self.meta_log, self.cluster_store, self.network,
            self._give_up_alone, self._holdings,
        )
        self.forwarding = Forwarding(self.network, self._group_of)
        self.meta_log.subscribe(self._meta_applied)
        self.meta_log.on_restore(self._meta_restored)
        self.metrics.store_bytes.labels(store="meta").set_function(
            lambda: self.meta_log.store_bytes
        )
        self._follow_members()
        self.host.start()
        self.publisher = Publisher(self.reactor)
        self.coordinator = Coordinator(
            self.reactor, self.node_id, None, self.shard_logs, self.meta_log,
            self.cluster_store, self.metrics, unavailable_shards=self.unavailable_shards,
        )
        self.executor = Executor(
            self.reactor,
            self.publisher,
            self.cluster_store.route,
            metrics=self.metrics,
            current_routes=self.coordinator.meta_read_barrier,
            **self.executor_options,
        )
        self.coordinator.forwarding = self.forwarding
        self.coordinator.serve_listings(self.network)
        self.shards = Shards(
            self.reactor, self.node_id, self.data_dir, self.host, self.engine, self.store_io,
            self.executor, self.coordinator, self.meta_log, self.cluster_store,
            group_options=self.group_options,
            metrics=self.metrics,
            count_elsewhere=self._count_elsewhere,
        )
        self.mover = ReplicaMover(self.reactor, self.node_id, self.shards, self._group_view)
        self.removals = Removals(
            self.reactor, self.node_id, self.meta_log, self.cluster_store, self.membership,
            self.shards, self._connected, self._group_view,
        )
        self.spreader = LeaderSpreader(
            self.reactor, self.meta_log, self.cluster_store, self._group_view,
            self._ask_transfer,
        )
        if self.cluster_store.config is None and bootstrapping:
            yield self.meta_log.propose(Ring.single_node(self.node_id, self.initial_shards).config)
        # Before the shards open: nothing is held for firing or served yet, so the
        # one full collection this costs holds nothing back (see firing.collector).
        settle_collector()
        if self.cluster_store.config is not None:
            yield self.shards.follow()
        self.retention.start()
        self.api = TimeMachineAPI(self.coordinator, self, self.metrics)
        if self.http_endpoint:
            endpoint = endpoints.serverFromString(self.reactor, self.http_endpoint)
            self.port = yield endpoint.listen(make_site(self.api, self.metrics))
            address = self.port.getHost()
            self._http_address = f"{address.host}:{address.port}"
        yield self._announce(self._http_address)
        self.membership.start()
        self.removals.start()
        self.mover.start()
        self.spreader.start()
        if self.meta_log.blank and self.join_address is not None:
            self._joining = self._ask_to_join()
        if self.host.catching_up:
            self.log.warn(
                "node {node}: its Raft log was repaired; its members vote again once "
                "they have caught up with their leaders",
                node=self.node_id,
            )
            self._repair_check = task.LoopingCall(self._forget_repair_once_caught_up)
            self._repair_check.clock = self.reactor
            self._repair_check.start(REPAIR_CHECK_SECONDS, now=False)
        self.log.info(
            "node {node} serving {shards} shards from {data_dir}",
            node=self.node_id,
            shards=len(self.shard_logs),
            data_dir=self.data_dir,
        )
        self.ready.callback(self)

    @defer.inlineCallbacks
    def _announce(self, http_address: str):
        """Record this node's addresses in the meta group, if they changed (a restart
        on other ports). Only the meta leader can: a follower's are recorded by the
        leader when it joins."""
        me = PutMember(self.node_id, self.network.advertise, http_address, self.incarnation)
        if self.cluster_store.member(self.node_id) == me or not self.meta_log.is_leader():
            return
        yield self.meta_log.propose(me)

    # -- the peers ----------------------------------------------------------------------

    def _send_raft(self, to: str, group: int, incarnation: int, message) -> None:
        self.network.send_raft(to, encode_message(group, incarnation, message))

    def _receive_raft(self, frm: str, wire) -> None:
        try:
            group, incarnation, message = decode_message(wire, frm, self.node_id)
        except BadRaftMessage as e:
            self.log.warn("dropped a Raft message from {peer}: {error}", peer=frm, error=e)
            return
        self.host.receive(group, incarnation, message)

    def _meta_applied(self, index, command, result) -> None:
        self._joined_if_so()
        if isinstance(command, PutMember | RemoveMember):
            self._follow_members()
        elif isinstance(command, Configure):
            self._follow_config()

    def _meta_restored(self) -> None:
        """The meta state arrived whole (a snapshot from the leader, when joining)."""
        self._joined_if_so()
        self._follow_members()
        self._follow_config()

    @property
    def _joining_marker(self) -> str:
        return os.path.join(self.data_dir, JOINING_MARKER)

    @property
    def _repaired_marker(self) -> str:
        return os.path.join(self.data_dir, REPAIRED_MARKER)

    def _forget_repair_once_caught_up(self) -> None:
        if not self.host.caught_up():
            return
        self._repair_check.stop()
        self._repair_check = None
        self.host.catching_up = False
        self.log.info("node {node}: every member caught up after the repair", node=self.node_id)
        d = self.store_io.call(unlink_if_exists, self._repaired_marker)
        d.addErrback(lambda f: self.log.failure("removing the repair marker", f))

    def _joined_if_so(self) -> None:
        """Once the joined cluster's meta state is here (persisted before it applies),
        a restart no longer needs the marker to keep from bootstrapping."""
        if self._awaiting_cluster_state and not self.meta_log.blank:
            self._left_alone_to_join = self._awaiting_cluster_state = False
            d = self.store_io.call(unlink_if_exists, self._joining_marker)
            d.addErrback(lambda f: self.log.failure("removing the joining marker", f))

    def _follow_members(self) -> None:
        """Keep a connection to every other member of the cluster, on the data dir
        it joined with."""
        self.network.check_identities(self._peer_identity_problem)
        self.network.set_peers(self.membership.peers())

    def _peer_identity_problem(self, node_id: str, incarnation: str) -> str | None:
        member = self.cluster_store.member(node_id)
        return None if member is None else identity_problem(
            node_id, member.incarnation, incarnation
        )

    def _follow_config(self) -> None:
        """Route by the cluster's shard map once this node learns it."""
        if self.running and self.cluster_store.config is not None and self.shards is not None:
            d = self.shards.follow()
            d.addErrback(lambda f: self.log.failure("opening the shards failed", f))

    def _group_of(self, number: int):
        if number == META_GROUP:
            return self.meta_log
        held = self.shard_logs.get(shard_of_group(number))
        return None if held is None else held[0]

    def _connected(self) -> set[str]:
        """The nodes this node has a peer connection to now."""
        return {n for n, peer in self.network.stats().items() if peer.connected}

    @defer.inlineCallbacks
    def _group_view(self, node_id: str, count_jobs: bool = False):
        """What node ``node_id`` knows of each shard (its ``/cluster/shards`` entries,
        by shard; job counts only with ``count_jobs``); `Unavailable` when it cannot
        say."""
        member = self.cluster_store.member(node_id)
        if member is None or not member.http_address:
            raise Unavailable(f"node {node_id} has no known HTTP address")
        query = "" if count_jobs else "?jobs=0"
        try:
            _, answer = yield self._ask_node(
                "GET", f"http://{member.http_address}/cluster/shards{query}"
            )
            return {entry["shard"]: entry for entry in answer["shards"]}
        except Exception as e:
            raise Unavailable(f"node {node_id} cannot tell its shards now: {e}") from e

    def _ask_node(self, method: str, url: str, body=None):
        """``(status, JSON answer)`` of another node's REST API, within
        `PEER_API_SECONDS` (else `defer.TimeoutError`)."""
        return self._ask_node_untimed(method, url, body).addTimeout(
            PEER_API_SECONDS, self.reactor
        )

    @defer.inlineCallbacks
    def _ask_node_untimed(self, method: str, url: str, body):
        response = yield self.http_client.request(method, url, json=body)
        answer = yield response.json()
        return response.code, answer

    @defer.inlineCallbacks
    def _ask_transfer(self, node_id: str, shard: int, to: str):
        """Ask node ``node_id`` (it leads ``shard``) to hand the shard over to ``to``."""
        member = self.cluster_store.member(node_id)
        if member is None or not member.http_address:
            raise Unavailable(f"node {node_id} has no known HTTP address")
        try:
            code, answer = yield self._ask_node(
                "POST", f"http://{member.http_address}/cluster/shards/{shard}/leader",
                {"node_id": to},
            )
        except Exception as e:
            raise Unavailable(f"node {node_id} cannot be asked now: {e}") from e
        if code != 200:
            raise Unavailable(f"node {node_id} answered {code}: {answer}")
        return answer

    @defer.inlineCallbacks
    def transfer_shard(self, shard: int, to: str):
        """Hand the leadership of ``shard``, which this node leads, to voter ``to``;
        fire with the leader then known, once this node no longer leads (or after
        `HANDOVER_SECONDS`: `Unavailable`)."""
        ring = self.coordinator.ring
        if ring is None:
            raise NotConfigured("the cluster has no shards yet")
        if not 0 <= shard < ring.shards:
            raise NotFound(f"shard {shard} does not exist (the cluster has {ring.shards})")
        held = self.shard_logs.get(shard)
        if held is None or not held[0].leads:
            raise Unavailable(f"this node does not lead shard {shard}; ask its leader")
        group = held[0]
        if to == self.node_id:
            return to
        if to not in group.conf.voters:
            raise InvalidField("node_id", f"{to} is not a voter of shard {shard}")
        if not (yield self.shards.hand_over(shard, to)):
            raise Unavailable(f"{to} did not take over shard {shard} in time; retry")
        return group.leader

    @defer.inlineCallbacks
    def _count_elsewhere(self, ring, shards):
        """The jobs ``shards`` store, asked of their leaders: for each shard, of its
        leader (with its lease: it applied every acknowledged write), looked for among
        its placed replicas first, then the other members (while replicas move, the
        group's members are not yet the ones placed). A shard with no such leader
        yet (its group was just made, or is electing) is asked again for
        `COUNT_WAIT_SECONDS`."""
        deadline = self.reactor.seconds() + COUNT_WAIT_SECONDS
        counts: dict[int, int] = {}
        while True:
            views = {}
            for shard in shards:
                if shard in counts:
                    continue
                held = self.shard_logs.get(shard)
                if held is not None and held[0].is_leader():
                    # Elected here while the others were asked.
                    counts[shard] = yield held[1].count(None)
                    continue
                for node_id in self.coordinator.nodes_to_ask(ring, shard):
                    if node_id not in views:
                        try:
                            views[node_id] = yield self._group_view(node_id, count_jobs=True)
                        except Unavailable:
                            views[node_id] = {}
                    entry = views[node_id].get(shard, {})
                    if entry.get("lease") and entry.get("jobs") is not None:
                        counts[shard] = entry["jobs"]
                        break
            missing = [shard for shard in shards if shard not in counts]
            if not missing:
                return sum(counts.values())
            if self.reactor.seconds() >= deadline:
                raise Unavailable(f"shard {missing[0]}'s jobs cannot be counted now; retry")
            yield task.deferLater(self.reactor, 0.2, lambda: None)

    @defer.inlineCallbacks
    def _holdings(self):
        """``(jobs, routes)`` this node's cluster holds (is it empty?)."""
        counts = yield defer.gatherResults(
            [store.count(None) for _, store in self.shard_logs.values()]
        )
        return sum(counts), len(self.cluster_store.routes())

    @defer.inlineCallbacks
    def _give_up_alone(self):
        """Leave the empty one-node cluster this node bootstrapped: forget its shards
        and its meta state, and wait, blank, to be sent the joined cluster's."""
        # First, so that a crash from here on leaves a node that waits, blank.
        yield self.store_io.call(
            write_atomically, self._joining_marker,
            b"this node left the one-node cluster it bootstrapped to join another\n",
        )
        self.coordinator.ring = None
        shards = list(self.shard_logs)
        yield self.shards.close()
        for shard in shards:
            if group_of_shard(shard) in self.engine.groups():
                yield self.engine.remove_group(group_of_shard(shard))
        yield self.store_io.call(shutil.rmtree, os.path.join(self.data_dir, "shards"), True)
        yield self.shards.forget_map()
        self._left_alone_to_join = True
        yield self.meta_log.start_over()
        self._awaiting_cluster_state = True
        self._joined_if_so()

    @defer.inlineCallbacks
    def _ask_to_join(self):
        """Ask the member at ``--join`` to admit this node, until it does."""
        url = f"http://{self.join_address}/cluster/join"
        body = {
            "node_id": self.node_id,
            "raft_address": self.network.advertise,
            "http_address": self._http_address or None,
        }
        while self.running and self.meta_log.blank:
            try:
                response = yield self.http_client.post(url, json=body)
                answer = yield response.content()
            except Exception as e:
                self.log.info("joining through {url} waits: {error}", url=url, error=e)
            else:
                if response.code == 200:
                    self.log.info("joined the cluster through {url}", url=url)
                    return
                if response.code < 500:
                    self.log.error(
                        "{url} refused to admit this node: {answer}", url=url,
                        answer=answer.decode("utf-8", "replace"),
                    )
                    return
            yield task.deferLater(self.reactor, 1.0, lambda: None)

    @defer.inlineCallbacks
    def proxy(self, request, node_id: str, timeout: float | None = None):
        """Answer ``request`` with what node ``node_id``'s REST API answers to it
        (within ``timeout`` seconds, if given)."""
        member = self.cluster_store.member(node_id)
        if member is None or not member.http_address:
            raise Unavailable(f"node {node_id} has no known HTTP address; retry")
        if request.getHeader(FORWARDED_HEADER) is not None:
            raise Unavailable("forwarded already, and this node cannot answer it; retry")
        url = f"http://{member.http_address}{request.uri.decode('ascii')}"
        request.content.seek(0)
        response = yield self.http_client.request(
            request.method.decode("ascii"),
            url,
            data=request.content.read() or None,
            headers={FORWARDED_HEADER: "1", "Content-Type": "application/json"},
            timeout=timeout,
        )
        body = yield response.content()
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() in (b"content-type",):
                request.responseHeaders.setRawHeaders(name, values)
        return body

    @defer.inlineCallbacks
    def proxy_to_replica(self, request, node_ids):
        """`proxy` ``request`` to the first of ``node_ids`` (replicas of a shard this
        node cannot serve) that answers within `REPLICA_PROXY_TIMEOUT`: one may be
        down or cut off while the others serve."""
        failures = []
        for node_id in node_ids:
            try:
                body = yield self.proxy(request, node_id, timeout=REPLICA_PROXY_TIMEOUT)
                return body
            except Exception as e:
                failures.append(f"{node_id}: {e.__class__.__name__}")
        raise Unavailable(f"no replica answered ({', '.join(failures)}); retry")

    @defer.inlineCallbacks
    def join(self, node_id: str, peer_address: str, http_address: str | None = None):
        """Admit a node (`Membership.join`), then give it its share of the replicas."""
        yield self.membership.join(node_id, peer_address, http_address)
        yield self.shards.rebalance()

    def remove(self, node_id: str):
        """Take ``node_id`` out of the cluster, on the meta group's leader (`Removals`)."""
        return self.removals.remove(node_id)

    def meta_leader(self) -> str | None:
        """The node leading the meta group, as this node knows it."""
        return self.meta_log.leader

    @defer.inlineCallbacks
    def configure(self, shards: int, replicas: int):
        """Set the shard count and replication factor (see `Shards.configure`).

        A node started with ``--no-bootstrap`` and configured before anything joined
        it becomes a one-node cluster first.
        """
        if self.meta_log.blank:
            if self.join_address is not None:
                raise NotConfigured(f"this node is joining the cluster at {self.join_address}")
            if self._left_alone_to_join:
                raise NotConfigured(
                    "this node is joining a cluster and waits for its state; configure "
                    "it through a member (if no cluster admitted it, remove "
                    f"{self._joining_marker} and restart it to start one of its own)"
                )
            yield self.meta_log.bootstrap(ConfState(frozenset({self.node_id})))
            yield self.meta_log.wait_leading()
            yield self._announce(self._http_address)
        config = yield self.shards.configure(shards, replicas)
        return config

    @defer.inlineCallbacks
    def _hand_over_leadership(self):
        """Before stopping: hand each group this node leads to another voter, so the
        cluster need not wait an election timeout for its new leaders. Fires once
        they took over, or after `HANDOVER_SECONDS`."""
        groups = [group for group, _ in self.shard_logs.values()]
        if self.meta_log is not None:
            groups.append(self.meta_log)
        # The executor stopped first: no delivery is in flight to hold for.
        handing = [(group, group.successor()) for group in groups]
        handing = [(group, to) for group, to in handing if to is not None]
        handed = yield defer.gatherResults(
            [group.hand_over(to, HANDOVER_SECONDS) for group, to in handing]
        )
        if handing:
            kept = [g.name for (g, _), done in zip(handing, handed, strict=True) if not done]
            self.log.info(
                "handed over the leadership of {count} groups before stopping{kept}",
                count=len(handing) - len(kept),
                kept=f"; still leading {', '.join(kept)}" if kept else "",
            )

    @defer.inlineCallbacks
    def stopService(self):
        """Stop accepting requests, let in-flight deliveries finish, close the groups."""
        super().stopService()
        try:
            if self.port is not None:
                yield self.port.stopListening()
            if self.membership is not None:
                self.membership.stop()
                self.removals.stop()
            if self.mover is not None:
                self.mover.stop()
                self.spreader.stop()
            if self._repair_check is not None:
                self._repair_check.stop()
                self._repair_check = None
            if self.executor is not None:
                yield self.executor.stop()
            yield self._hand_over_leadership()
            yield self.retention.stop()
            if self.shards is not None:
                yield self.shards.close()
            if self.meta_log is not None:
                yield self.meta_log.close()
            if self.host is not None:
                self.host.stop()
            if self.network is not None:
                yield self.network.stop()
            if self.engine is not None:
                yield self.engine.close()
            if self.publisher is not None:
                yield self.publisher.close()
            if self.http_client is not None:
                yield self._http_pool.closeCachedConnections()
        finally:
            # Last: the groups and stores above hand their final writes to these threads.
            for io in (self.wal_io, self.store_io):
                io.stop()
