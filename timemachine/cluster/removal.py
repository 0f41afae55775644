"""Taking a member out of the cluster (``POST /cluster/remove``), on the meta leader.

A removal is first recorded in the meta state (`MemberLeaving`): from then on
placement leaves the member out, whoever leads the meta group. Its replicas move to
the other members (`ReplicaMover`); once every shard's group has let it go, it
leaves the meta group and the member list (`Membership.remove`).

The meta leader carries on every recorded removal by itself, every `FINISH_EVERY`
seconds: a call that gave up waiting (its ``503``), a meta leader that died or
handed over mid-way, or a leader asked to remove itself (it hands the meta group
over first) leave the rest to the next round, on whichever node leads then. A join
of the member calls its removal off.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from timemachine.cluster.placement import removal_problem
from timemachine.domain.commands import MemberLeaving
from timemachine.domain.errors import AlreadyConfigured, InvalidField, Unavailable

#: Seconds a removal call waits for the member's replicas to move off it.
REMOVE_WAIT_SECONDS = 60.0
#: Seconds between two looks, on the meta leader, at removals under way.
FINISH_EVERY = 5.0


class Removals:
    """The removals of members, carried out by the meta group's leader.

    ``meta`` is the meta group and ``cluster_store`` its state machine;
    ``membership`` takes a member out of the meta group and the member list,
    ``shards`` moves replicas (``rebalance``); ``connected()`` names the nodes this
    node has a peer connection to, and ``group_view(node_id)`` fires with that
    node's ``/cluster/shards`` entries by shard.
    """

    log = Logger()

    def __init__(self, reactor, node_id: str, meta, cluster_store, membership, shards,
                 connected: Callable[[], set], group_view: Callable):
        self._reactor = reactor
        self._node_id = node_id
        self._meta = meta
        self._store = cluster_store
        self._membership = membership
        self._shards = shards
        self._connected = connected
        self._group_view = group_view
        # node -> the Deferreds waiting for its removal under way here.
        self._under_way: dict[str, list[defer.Deferred]] = {}
        # node -> why its removal waited last (logged when it changes).
        self._waits: dict[str, str] = {}
        self._loop = task.LoopingCall(self._round)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(FINISH_EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    @defer.inlineCallbacks
    def remove(self, node_id: str):
        """Take ``node_id`` out of the cluster: refuse with the reason when its
        shards cannot do without it (`placement.removal_problem`), record it
        leaving, and fire once it is out.

        `Unavailable` when the moves take longer than `REMOVE_WAIT_SECONDS`: they go
        on, and the meta leader finishes the removal by itself. The meta leader does
        not remove itself: it hands the meta group over first, and answers
        `Unavailable`; the new leader carries the removal out.
        """
        self._membership.check_removable(node_id)
        config = self._store.config
        if config is not None:
            # Those another removal takes away already do not count.
            members = sorted({*self._store.staying(), node_id})
            connected = self._connected()
            down = [n for n in members if n != self._node_id and n not in connected]
            problem = removal_problem(node_id, config.placement, members, config.replicas, down)
            if problem is not None:
                raise InvalidField("node_id", problem)
        if node_id == self._node_id:
            successor = self._meta.successor()
            if successor is None:
                raise InvalidField(
                    "node_id", f"{node_id} leads the meta group, and no voter can take over"
                )
        if node_id not in self._store.leaving():
            yield self._meta.propose(MemberLeaving(node_id))
        if node_id == self._node_id:
            self._hand_over()
            raise Unavailable(
                f"{node_id} led the meta group and hands it over; the new leader "
                "finishes removing it"
            )
        yield self._finish(node_id)

    def _hand_over(self) -> None:
        successor = self._meta.successor()
        if successor is not None:
            self._meta.transfer_leadership(successor)

    def _round(self) -> None:
        if not self._meta.is_leader():
            return
        for node_id in sorted(self._store.leaving()):
            if node_id == self._node_id:
                self._hand_over()
                return
            if node_id not in self._under_way:
                self._finish(node_id).addErrback(self._waited, node_id)

    def _waited(self, failure: Failure, node_id: str) -> None:
        why = failure.getErrorMessage()
        if self._waits.get(node_id) != why:
            self._waits[node_id] = why
            self.log.info("removing {node} waits: {why}", node=node_id, why=why)

    def _finish(self, node_id: str):
        """A Deferred of the removal of ``node_id``, one at a time per node: a call
        made while one is under way waits for it."""
        waiter = defer.Deferred()
        waiting = self._under_way.get(node_id)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        waiting = self._under_way[node_id] = [waiter]

        def done(result):
            del self._under_way[node_id]
            if not isinstance(result, Failure):
                self._waits.pop(node_id, None)
            for each in waiting:
                if isinstance(result, Failure):
                    each.errback(result)
                else:
                    each.callback(result)

        self._carry_out(node_id).addBoth(done)
        return waiter

    @defer.inlineCallbacks
    def _carry_out(self, node_id: str):
        config = self._store.config
        if config is not None:
            yield self._shards.rebalance()
            yield self._until_groups_let_go(node_id, config.shards)
        yield self._membership.remove(node_id)
        self.log.info("node {node} is removed from the cluster", node=node_id)

    @defer.inlineCallbacks
    def _until_groups_let_go(self, node_id: str, shards: int):
        """Fire once no shard's group counts ``node_id`` as a member, as its leader
        says."""
        deadline = self._reactor.seconds() + REMOVE_WAIT_SECONDS
        holding = set(range(shards))
        while True:
            if node_id not in self._store.leaving():
                raise AlreadyConfigured(
                    f"the removal of {node_id} was called off: it joined again"
                )
            views = []
            for member in self._store.members():
                try:
                    views.append((yield self._group_view(member.node_id)))
                except Unavailable:
                    continue  # down, or the node leaving: the leaders' views tell
            for view in views:
                for shard, entry in view.items():
                    if entry.get("role") == "leader" and node_id not in (
                        entry["voters"] + entry["learners"]
                    ):
                        holding.discard(shard)
            if not holding:
                return
            if self._reactor.seconds() > deadline:
                raise Unavailable(
                    f"the replicas of shards {sorted(holding)} are still moving off "
                    f"{node_id}; the meta leader goes on removing it"
                )
            yield task.deferLater(self._reactor, 0.5, lambda: None)
