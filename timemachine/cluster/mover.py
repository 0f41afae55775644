"""Replica moves and leader spreading: each shard's Raft group walks to the replicas
the shard map names, and the shard leaders spread evenly over the nodes.

The meta group's shard map (`Configure.placement`) says where each shard's replicas
should be; a group's own membership says where they are. The two differ after a
member joins or leaves, or the replication factor changes, and `ReplicaMover` closes
the gap on every node, for the groups that node leads (as CockroachDB's replicate
queue runs on each range's leaseholder): nobody else knows a group's membership and
the progress of its members as its leader does, and the work spreads with leadership.

One change at a time, by `placement.next_change`:

1. a new replica joins as a learner: its node opened it blank on learning the map
   (`Shards`), and the leader's snapshot - a copy of the shard's store - brings it up
   to date while the group goes on taking writes; when the group grows by more than
   one, every new replica joins as a learner before any is promoted;
2. once they have caught up they are promoted to voters, one after the other;
3. only then is a replica that is no longer wanted removed (so a group never has
   fewer voters than it started with), and when the leader itself is to go it first
   hands leadership to a replica that stays.

A node holding a replica the map no longer names keeps it until the group's leader
confirms it was removed, then deletes it (`Shards.drop`): its votes and its copy of
the data count until then. The removed member cannot learn that from the group
itself (the leader stops talking to it once the removal applies), so it asks the
leader's ``/cluster/shards``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, task
from twisted.logger import Logger

from timemachine.cluster.placement import StepKind, leadership_moves, next_change
from timemachine.domain.errors import TimeMachineError
from timemachine.raft.types import ConfChange, ConfChangeKind

#: Seconds between two looks at the groups this node leads.
MOVE_EVERY = 0.5
#: Seconds between two questions to a group's leader about a replica the map dropped.
CHECK_REMOVED_EVERY = 2.0
#: Seconds between two rounds of leader spreading (on the meta leader).
SPREAD_EVERY = 5.0


class ReplicaMover:
    """Moves the replicas of the shard groups this node leads toward the shard map.

    ``shards`` is the node's `Shards` (its open replicas, the map it routes by, and
    ``drop(shard)``); ``group_view(node_id)`` fires with that node's
    ``/cluster/shards`` entries by shard.
    """

    log = Logger()

    def __init__(self, reactor, node_id: str, shards, group_view: Callable):
        self._reactor = reactor
        self._node_id = node_id
        self._shards = shards
        self._group_view = group_view
        self._changing: set[int] = set()
        self._checked_at: dict[int, float] = {}
        self._loop = task.LoopingCall(self._round)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(MOVE_EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _round(self) -> None:
        ring = self._shards.ring
        if ring is None:
            return
        for shard, (group, _) in list(self._shards.logs.items()):
            if shard >= ring.shards or shard in self._changing:
                continue
            target = ring.replicas(shard)
            if group.is_leader():
                self._move(shard, group, target)
            elif self._node_id not in target:
                self._check_removed(shard, group)

    def _move(self, shard: int, group, target) -> None:
        conf = group.conf
        learners = sorted(conf.learners)
        step = next_change(
            sorted(conf.voters), learners, {n for n in learners if group.caught_up(n)},
            target, leader=self._node_id,
        )
        if step is None:
            return
        if step.kind == StepKind.ADD:
            self._change(shard, group, ConfChange(ConfChangeKind.ADD_LEARNER, step.node))
        elif step.kind == StepKind.PROMOTE:
            self._change(shard, group, ConfChange(ConfChangeKind.PROMOTE, step.node))
        elif step.kind == StepKind.REMOVE:
            self._change(shard, group, ConfChange(ConfChangeKind.REMOVE, step.node))
        else:
            self.log.info(
                "shard {shard}: handing leadership to {node}, as this node's replica "
                "is to go", shard=shard, node=step.node,
            )
            self._changing.add(shard)
            d = self._shards.hand_over(shard, step.node)
            d.addErrback(lambda f: self.log.failure("shard {shard}: handing over failed", f,
                                                    shard=shard))
            d.addBoth(lambda _: self._changing.discard(shard))

    def _change(self, shard: int, group, change: ConfChange) -> None:
        self._changing.add(shard)
        d = group.change_membership(change)

        def done(index):
            self.log.info(
                "shard {shard}: {kind} {node} (entry {index})",
                shard=shard, kind=change.kind.name.lower(), node=change.node, index=index,
            )

        def failed(failure):
            failure.trap(TimeMachineError)
            self.log.info(
                "shard {shard}: {kind} {node} waits: {error}",
                shard=shard, kind=change.kind.name.lower(), node=change.node,
                error=failure.value,
            )

        d.addCallbacks(done, failed)
        d.addBoth(lambda _: self._changing.discard(shard))

    def _check_removed(self, shard: int, group) -> None:
        now = self._reactor.seconds()
        if now < self._checked_at.get(shard, 0.0) + CHECK_REMOVED_EVERY:
            return
        self._checked_at[shard] = now
        self._changing.add(shard)
        d = self._removed(shard, group)
        d.addErrback(
            lambda f: self.log.info(
                "shard {shard}: cannot tell yet whether this replica was removed: {error}",
                shard=shard, error=f.getErrorMessage(),
            )
        )
        d.addBoth(lambda _: self._changing.discard(shard))

    @defer.inlineCallbacks
    def _removed(self, shard: int, group):
        """Drop this node's replica of ``shard`` once it applied its own removal, or
        the group's leader says it no longer counts it (it is neither a voter nor a
        learner there)."""
        conf = group.conf
        if not group.blank and self._node_id not in conf.voters | conf.learners:
            self.log.info("shard {shard}: this node's replica was removed; deleting it",
                          shard=shard)
            yield self._shards.drop(shard)
            return
        ring = self._shards.ring
        asked = [group.leader] if group.leader not in (None, self._node_id) else []
        asked += [n for n in ring.replicas(shard) if n not in asked and n != self._node_id]
        for node in asked:
            try:
                entries = yield self._group_view(node)
            except TimeMachineError:
                continue  # down or busy: another replica may know its leader
            entry = entries.get(shard)
            if entry is None or entry.get("role") != "leader":
                continue
            if self._node_id in entry["voters"] or self._node_id in entry["learners"]:
                return
            self.log.info(
                "shard {shard}: the group's leader {leader} removed this node's replica; "
                "deleting it", shard=shard, leader=node,
            )
            yield self._shards.drop(shard)
            self._checked_at.pop(shard, None)
            return


class LeaderSpreader:
    """On the meta group's leader: spreads shard leaderships evenly over the nodes.

    Elections put leaders wherever a candidate won first, and a node that restarted
    (or handed its groups over on SIGTERM) leads nothing until something moves
    leaders back; every leader fires its shard's jobs and takes its writes, so an
    uneven spread makes one node do the work of several. Every `SPREAD_EVERY`
    seconds this asks each member which groups it leads (``group_view``), and has
    `placement.leadership_moves` (fewest transfers to counts within one of each other)
    carried out by the shards' leaders (``transfer(leader, shard, to)``).
    """

    log = Logger()

    def __init__(self, reactor, meta, cluster_store, group_view: Callable, transfer: Callable):
        self._meta = meta
        self._cluster_store = cluster_store
        self._group_view = group_view
        self._transfer = transfer
        self._running: defer.Deferred | None = None
        self._loop = task.LoopingCall(self._round)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(SPREAD_EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _round(self) -> None:
        if self._running is None and self._meta.is_leader():
            self._running = self.spread()
            self._running.addErrback(
                lambda f: self.log.info("spreading shard leaders waits: {error}",
                                        error=f.getErrorMessage())
            )
            self._running.addBoth(lambda _: setattr(self, "_running", None))

    @defer.inlineCallbacks
    def spread(self):
        """One round: learn the shard leaders, ask for the transfers that even them
        out; fires with the transfers asked for."""
        config = self._cluster_store.config
        if config is None:
            return []
        leaders: dict[int, str] = {}
        for member in self._cluster_store.members():
            try:
                view = yield self._group_view(member.node_id)
            except TimeMachineError:
                return []  # a node that cannot say may lead some: wait for a full picture
            for shard, entry in view.items():
                if entry.get("role") == "leader":
                    leaders[shard] = member.node_id
        moves = leadership_moves(config.placement, leaders)
        for shard, to in moves:
            self.log.info("shard {shard}: moving its leadership from {leader} to {to}, to "
                          "spread leaders evenly", shard=shard, leader=leaders[shard], to=to)
            try:
                yield self._transfer(leaders[shard], shard, to)
            except TimeMachineError as e:
                self.log.info("shard {shard}: the transfer to {to} waits: {error}",
                              shard=shard, to=to, error=e)
        return moves
