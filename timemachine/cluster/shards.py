"""The shard replicas a node holds: one Raft group each, opened from the cluster config.

A replica of shard ``n`` is a `RaftGroup` (group ``n + 1`` of the node's `RaftEngine`)
in front of its `VnodeStore` in ``<data-dir>/shards/<n>/jobs.sqlite``. A replica
whose store or Raft state refuses to open (corruption, a failed disk), or that a disk
or store failure stopped since, is kept aside as unavailable with its reason, and the
node serves the others: its requests get ``503 E_UNAVAILABLE``, and ``/ready`` says
why.

Firing follows leadership: when a replica gains its group's lease the executor loads
the shard's due jobs and fires them, each only while the lease holds; when the replica
stops leading that term the executor drops them at once (see `RaftGroup.on_leadership`).
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import defer
from twisted.logger import Logger

from timemachine.cluster.placement import target_placement
from timemachine.cluster.raftgroup import SET_ASIDE_DIR, EngineDisk, RaftGroup
from timemachine.cluster.ring import Ring
from timemachine.domain.commands import Configure
from timemachine.domain.errors import (
    AlreadyConfigured,
    InvalidField,
    StorageError,
    Unavailable,
)
from timemachine.peer.raftcodec import group_of_shard
from timemachine.raft.types import ConfState
from timemachine.storage.durable import read_if_exists, write_atomically
from timemachine.storage.sqlite import unlink_if_exists
from timemachine.storage.store import VnodeStore

#: Seconds a shard leader waits for the voter it hands leadership to to take over.
HANDOVER_SECONDS = 3.0
#: In the data dir: the shards whose replica this node dropped (its group removed
#: it), with the shard map they belonged to, as JSON.
DROPPED_FILE = "dropped-replicas"


class Shards:
    """Opens, reconfigures and closes the shard replicas of this node.

    ``logs`` maps shard -> (group, store) for the replicas that are open;
    ``unavailable`` maps shard -> the `StorageError` that kept one closed or stopped it. Both dicts
    are shared with the coordinator, which routes by them, and are changed only here.

    ``host`` and ``engine`` are the node's Raft host and log; ``executor`` fires the
    jobs of the shards this node leads; ``coordinator`` gets the ring once its
    replicas are open; ``meta`` (the meta group) records a new configuration, which
    ``cluster_store`` (its state machine) then holds. ``group_options`` go to each
    `RaftGroup`. ``count_elsewhere(ring, shards)`` fires with the number of jobs the
    given shards (led by other nodes) store.
    """

    log = Logger()

    def __init__(self, reactor, node_id, data_dir, host, engine, store_io, executor,
                 coordinator, meta, cluster_store, group_options=None, metrics=None,
                 count_elsewhere=None):
        self._reactor = reactor
        self._node_id = node_id
        self._data_dir = data_dir
        self._host = host
        self._engine = engine
        self._store_io = store_io
        self._executor = executor
        self._coordinator = coordinator
        self._meta = meta
        self._cluster_store = cluster_store
        self._group_options = group_options or {}
        self._metrics = metrics
        self._count_elsewhere = count_elsewhere
        # The shard map this node's replicas were opened for.
        self._opened = None
        self.logs: dict[int, tuple] = coordinator.shards
        self.unavailable: dict[int, StorageError] = coordinator.unavailable_shards
        self._configuring = defer.DeferredLock()

    def _shard_dir(self, shard: int) -> str:
        return os.path.join(self._data_dir, "shards", str(shard))

    @property
    def ring(self):
        """The shard map requests are routed by (None while it changes)."""
        return self._coordinator.ring

    @defer.inlineCallbacks
    def open(self, config):
        """Open this node's replicas of ``config``; then route to them."""
        ring = Ring(config)
        for shard in ring.shards_of(self._node_id):
            yield self._open_placed(config, shard)
        # A replica alone in its group leads it at once: wait for that, so a one-node
        # cluster serves (and fires) when it says it is ready.
        yield defer.gatherResults(
            [group.wait_leading() for group, _ in self.logs.values() if group.alone]
        )
        # Only now: a request routed by the ring must find its shard's replica open.
        self._coordinator.ring = ring

    @defer.inlineCallbacks
    def _open_placed(self, config, shard: int):
        """Open this node's replica of ``shard``, placed here by ``config``.

        A replica the engine has never seen starts its group with the other members
        the group was created with, if this node is one of them and never dropped a
        replica of the shard in this map; a replica added to a running group later
        starts blank and waits for the leader's snapshot. (Started again from the
        group's first members, a replica placed back on a node it left would be a
        second group of the shard, electing its own leader: when those members were
        this node alone, at once.)
        """
        first = config.first_replicas(shard)
        known = group_of_shard(shard) in self._engine.groups()
        if known:
            known = yield self._same_map(config, shard)
        try:
            bootstrap = None
            if self._node_id in first and not known:
                dropped = yield self._dropped(config.map_index)
                if shard not in dropped:
                    bootstrap = ConfState(frozenset(first))
            yield self._open_replica(shard, bootstrap, config.map_index)
            yield self._store_io.call(
                write_atomically, self._map_marker(shard), str(config.map_index).encode()
            )
        except StorageError as error:
            self._shard_unavailable(shard, error)

    def _dropped_path(self) -> str:
        return os.path.join(self._data_dir, DROPPED_FILE)

    @defer.inlineCallbacks
    def _dropped(self, map_index: int):
        """The shards whose replica this node dropped in the map ``map_index``."""
        path = self._dropped_path()
        data = yield self._store_io.call(read_if_exists, path)
        if data is None:
            return frozenset()
        try:
            record = json.loads(data)
            dropped = frozenset(int(s) for s in record["shards"])
            recorded_map = int(record["map_index"])
        except (ValueError, TypeError, KeyError) as e:
            raise StorageError(f"{path}: not a record of dropped replicas: {e!r}") from e
        return dropped if recorded_map == map_index else frozenset()

    @defer.inlineCallbacks
    def _record_dropped(self, shard: int):
        map_index = self._opened.map_index
        dropped = yield self._dropped(map_index)
        record = {"map_index": map_index, "shards": sorted(dropped | {shard})}
        yield self._store_io.call(
            write_atomically, self._dropped_path(), json.dumps(record).encode()
        )

    def _map_marker(self, shard: int) -> str:
        """The file naming the shard map (its ``map_index``) a replica belongs to."""
        return os.path.join(self._shard_dir(shard), "map")

    @defer.inlineCallbacks
    def _same_map(self, config, shard: int):
        """Whether this node's replica of ``shard`` on disk belongs to ``config``'s map.

        One from an earlier map (this node was away when the map was made anew,
        only ever for an empty cluster) is deleted: its Raft state - terms, a log,
        votes - would otherwise meet the new group's under the same group number,
        and could win an election with a log the new group never wrote. A replica
        from before maps were marked counts as the current map's.
        """
        marker = yield self._store_io.call(read_if_exists, self._map_marker(shard))
        if marker is None or int(marker) == config.map_index:
            return True
        self.log.warn(
            "shard {shard}: this node's replica belongs to an earlier shard map ({old}, "
            "now {new}); deleting it", shard=shard, old=int(marker), new=config.map_index,
        )
        yield self._engine.remove_group(group_of_shard(shard))
        yield self._store_io.call(shutil.rmtree, self._shard_dir(shard), True)
        return False

    @defer.inlineCallbacks
    def _open_replica(self, shard: int, bootstrap, incarnation: int):
        directory = self._shard_dir(shard)
        yield self._store_io.call(os.makedirs, directory, 0o777, True)
        store = VnodeStore(os.path.join(directory, "jobs.sqlite"), self._reactor, self._store_io)
        group = RaftGroup(
            self._host,
            group_of_shard(shard),
            f"shard {shard}",
            EngineDisk(self._engine, group_of_shard(shard)),
            store,
            self._store_io,
            bootstrap=bootstrap,
            incarnation=incarnation,
            set_aside_dir=os.path.join(self._data_dir, SET_ASIDE_DIR, f"shard-{shard}"),
            **self._group_options,
        )
        group.on_leadership(lambda leading: self._leadership(shard, group, leading))
        group.on_failure(lambda error: self._shard_unavailable(shard, error))
        yield group.open()
        self.logs[shard] = (group, store)
        if self._metrics is not None:
            self._metrics.store_bytes.labels(store=group.name).set_function(
                lambda: group.store_bytes
            )

    @defer.inlineCallbacks
    def hand_over(self, shard: int, to: str):
        """Hand the leadership of ``shard`` (this node leads it) to voter ``to``; fire
        with whether this node let go within `HANDOVER_SECONDS`.

        The shard's deliveries in flight record their outcomes first, and none
        starts meanwhile (`Executor.hold`): a transfer refuses proposals, so an
        outcome proposed during it would be lost and the new leader would deliver
        the job again.
        """
        group, _ = self.logs[shard]
        yield self._executor.hold(shard)
        try:
            handed = yield group.hand_over(to, HANDOVER_SECONDS)
            return handed
        finally:
            self._executor.release(shard)

    def _leadership(self, shard: int, group, leading: bool) -> None:
        if leading:
            self._executor.add_shard(shard, group.store, group)
        else:
            self._executor.remove_shard(shard)

    def _shard_unavailable(self, shard: int, error: StorageError):
        self.unavailable[shard] = error
        self.log.error(
            "shard {shard} is unavailable, the node serves its other shards: {error}",
            shard=shard,
            error=error,
            data_dir=self._data_dir,
            path=getattr(error, "path", None),
            offset=getattr(error, "offset", None),
        )

    def close(self):
        """Stop firing and close every open replica, once a configure or a follow
        under way is done (it would go on opening replicas on a closed node)."""
        return self._configuring.run(self._close_all)

    @defer.inlineCallbacks
    def _close_all(self):
        for shard, (group, _) in list(self.logs.items()):
            self._executor.remove_shard(shard)
            yield group.close()
            del self.logs[shard]
        self.unavailable.clear()

    def follow(self):
        """Hold this node's replicas of the cluster's current shard map, when it came
        from elsewhere (another node's configure, or the meta state a joining node was
        sent); in turn with `configure`, and always the latest map, so a map this node
        made itself, or one already replaced, is not carried out again."""
        return self._configuring.run(self._follow_current)

    def _follow_current(self):
        config = self._cluster_store.config
        if config is None:
            return defer.succeed(None)
        return self._follow(config)

    @defer.inlineCallbacks
    def _follow(self, config):
        ring = self._coordinator.ring
        if ring is not None and ring.config == config:
            return
        opened = self._opened
        if opened is not None and opened.map_index == config.map_index:
            yield self._move(config)
            return
        if opened is not None:
            yield self._drop_all(opened)
        yield self.open(config)
        self._opened = config

    @defer.inlineCallbacks
    def _move(self, config):
        """The same shards with replicas moving (`ReplicaMover`): open this node's new
        replicas, blank until their leader's snapshot arrives. A replica the map no
        longer places here stays open, voting and copying, until its group's leader
        has removed it (`drop`)."""
        for shard in Ring(config).shards_of(self._node_id):
            if shard not in self.logs and shard not in self.unavailable:
                yield self._open_placed(config, shard)
        self._coordinator.ring = Ring(config)
        self._opened = config

    def drop(self, shard: int):
        """Close and delete this node's replica of ``shard``: its group removed it."""
        return self._configuring.run(self._drop, shard)

    @defer.inlineCallbacks
    def _drop(self, shard: int):
        ring = self._coordinator.ring
        if shard not in self.logs or (ring is not None and self._node_id in ring.replicas(shard)):
            return  # placed here again meanwhile: the group adds it back, and it catches up
        # Recorded first: a crash from here on must not leave a node that, placed here
        # again, starts the group anew (`_open_placed`).
        yield self._record_dropped(shard)
        group, _ = self.logs.pop(shard)
        self.unavailable.pop(shard, None)
        self._executor.remove_shard(shard)
        yield group.close()
        if group_of_shard(shard) in self._engine.groups():
            yield self._engine.remove_group(group_of_shard(shard))
        yield self._store_io.call(shutil.rmtree, self._shard_dir(shard), True)

    @defer.inlineCallbacks
    def _drop_all(self, old):
        """Close and forget every replica of the shard map ``old`` (a new map of new
        shards replaces it; no jobs were stored)."""
        self._coordinator.ring = None
        yield self._close_all()
        for shard in range(old.shards):
            group_id = group_of_shard(shard)
            if group_id in self._engine.groups():
                yield self._engine.remove_group(group_id)
        # Off the reactor: a tree of SQLite files.
        yield self._store_io.call(shutil.rmtree, os.path.join(self._data_dir, "shards"), True)

    def forget_map(self):
        """This node's replicas are gone (it left its own cluster): the next map it
        learns is opened whole, and nothing it dropped before counts."""
        self._opened = None
        return self._store_io.call(unlink_if_exists, self._dropped_path())

    def configure(self, shards: int, replicas: int):
        """Set the shard count and replication factor (``POST /cluster/configure``),
        on the meta group's leader.

        The replication factor is at most the number of members. A new replication
        factor moves replicas (`ReplicaMover`) to a balanced placement that keeps as
        many of the current ones as it can, while the shards go on serving. A new
        shard count makes the shard map anew (every replica placed afresh), which only
        an empty cluster can: a job's shard is its hash modulo the count. Calls run
        one at a time, in the order they came: each closes and opens replicas, which
        two at once would do over each other.
        """
        return self._configuring.run(self._configure, shards, replicas)

    def rebalance(self):
        """On the meta group's leader, after the members changed: move replicas to a
        balanced placement over the members, less those being removed (their replicas
        must go before they are). Fires with the shard map then in force."""
        return self._configuring.run(self._rebalance)

    @defer.inlineCallbacks
    def _rebalance(self):
        config = self._cluster_store.config
        if config is None:
            return None
        moved = yield self._move_to(config, config.replicas, self._cluster_store.staying())
        return moved

    @defer.inlineCallbacks
    def _move_to(self, config, replicas: int, members):
        placement = target_placement(config.shards, replicas, members, config.placement)
        if (replicas, placement) == (config.replicas, config.placement):
            return config
        yield self._meta.propose(config.moved_to(replicas, placement))
        moved = self._cluster_store.config
        yield self._follow(moved)
        return moved

    @defer.inlineCallbacks
    def _configure(self, shards: int, replicas: int):
        members = self._cluster_store.staying() or [self._node_id]
        if replicas > len(members):
            being_removed = ", not counting those being removed" if (
                self._cluster_store.leaving()) else ""
            raise InvalidField(
                "replicas",
                f"must be at most the number of members ({len(members)}{being_removed})",
            )
        current = self._cluster_store.config
        if current is not None and current.shards == shards:
            moved = yield self._move_to(current, replicas, members)
            return moved
        if self.unavailable:
            # A new map deletes every shard's files: never those of a shard whose jobs
            # cannot even be counted.
            raise Unavailable(
                "the shard map cannot change while shards "
                f"{sorted(self.unavailable)} are unavailable; repair them first"
            )
        # Built (and so validated) before anything is closed: a bad value changes nothing.
        config = Configure(shards, replicas, target_placement(shards, replicas, members))
        if current is not None:
            # New writes get 503 E_UNAVAILABLE (a retry) while the shards change, and
            # those already proposed are applied before the stores are counted.
            ring, self._coordinator.ring = self._coordinator.ring, None
            try:
                yield defer.gatherResults([group.drain() for group, _ in self.logs.values()])
                # Counted where the group's leader is: it applied every acknowledged
                # write, while a follower may not have applied the last commits yet,
                # and a new replica waiting for its snapshot has an empty store.
                holding = {
                    s: store for s, (group, store) in self.logs.items()
                    if group.is_leader() or (self._count_elsewhere is None and not group.blank)
                }
                counts = yield defer.gatherResults(
                    [store.count(None) for store in holding.values()]
                )
                elsewhere = [s for s in range(current.shards) if s not in holding]
                if elsewhere and self._count_elsewhere is not None:
                    counts.append((yield self._count_elsewhere(Ring(current), elsewhere)))
                if sum(counts):
                    raise AlreadyConfigured(
                        "the shard count cannot change while jobs are stored (a job's "
                        "shard is its hash modulo the count)"
                    )
            except Exception:
                self._coordinator.ring = ring
                raise
        yield self._meta.propose(config)
        # As applied: the meta store numbered the new map.
        config = self._cluster_store.config
        yield self._follow(config)
        return config
