"""Who is in the cluster: joining, leaving, and the meta group's voters.

The meta group's leader admits a node (``POST /cluster/join``, upstream's body
``{"node_id", "raft_address"}``; ``http_address`` defaults to the peer port - 100):

1. it offers the node to join (a peer `JoinOffer`): a node with no cluster accepts; a
   node that bootstrapped alone and holds no jobs and no routes gives its one-node
   cluster up (upstream's ``spawn.sh`` starts every node alone) and accepts; any other
   node refuses with ``E_CONFIGURED`` and the reason;
2. it records the node (`PutMember`, so every node learns its addresses) and adds it
   to the meta group as a learner, which catches up from the leader's snapshot;
3. while the group has fewer voters than it should (`placement.meta_voters`: at most
   5, an odd number past 2), a learner that caught up is promoted. Further members
   stay learners: they follow the meta state without slowing its consensus.

The leader records the incarnation of each member's data dir
(`timemachine.cluster.identity`) as the member's `Hello` says it, once the member is
connected. Joining a member again is refused (``E_CONFIGURED``) while it presents
another data dir than the one recorded: it must be removed first.

``POST /cluster/remove`` takes a member out: it is marked leaving in the meta state
(`MemberLeaving`), so placement moves its replicas off and gives it none back, whoever
leads the meta group; then it leaves the meta group and the member list. A member
still placed with shard replicas is not taken out (the shards are named). Joining a
member that is leaving calls its removal off.
"""

from __future__ import annotations

import dataclasses

from twisted.internet import defer, task
from twisted.logger import Logger

from timemachine._pb import timemachine_pb2 as pb
from timemachine.cluster.identity import identity_problem
from timemachine.cluster.placement import meta_voters
from timemachine.cluster.ring import Ring
from timemachine.domain.commands import MemberLeaving, PutMember, RemoveMember
from timemachine.domain.errors import (
    AlreadyConfigured,
    InvalidField,
    NotFound,
    TimeMachineError,
    Unavailable,
)
from timemachine.peer.requests import error_of
from timemachine.raft.types import ConfChange, ConfChangeKind

#: Seconds between two looks at the meta group's learners (promotion).
PROMOTE_EVERY = 0.5
#: How long the leader tries to reach a node it was asked to admit.
OFFER_SECONDS = 10.0


def default_http_address(peer_address: str) -> str:
    """Upstream's rule for a node that gives no HTTP address: its peer port - 100."""
    host, _, port = peer_address.rpartition(":")
    return f"{host}:{int(port) - 100}"


class Membership:
    """The members of the cluster, changed through the meta group (``meta``) whose
    state machine is ``cluster_store``.

    ``network`` reaches the other nodes; ``give_up_alone()`` makes this node leave
    the one-node cluster it bootstrapped (the node's own reset) and ``holdings()``
    fires with ``(jobs, routes)`` this node's cluster stores, so it can tell whether
    it may.
    """

    log = Logger()

    def __init__(self, reactor, node_id, meta, cluster_store, network, give_up_alone, holdings):
        self._reactor = reactor
        self.node_id = node_id
        self._meta = meta
        self._store = cluster_store
        self._network = network
        self._give_up_alone = give_up_alone
        self._holdings = holdings
        self._offered: dict[str, str] = {}  # node -> peer address, while being admitted
        self._promoting = False
        self._recording = False
        self._loop = task.LoopingCall(self._look_after_members)
        self._loop.clock = reactor
        self._lock = defer.DeferredLock()
        network.handle("join", self._offer_received)

    def start(self) -> None:
        self._loop.start(PROMOTE_EVERY, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def peers(self) -> dict[str, str]:
        """Every node this node should be connected to: members and nodes being
        admitted."""
        peers = {m.node_id: m.peer_address for m in self._store.members()}
        peers.update(self._offered)
        return peers

    # -- the leader's side ---------------------------------------------------------------

    def join(self, node_id: str, peer_address: str, http_address: str | None = None):
        """Admit a node (see the module); fires once it is a learner of the meta group."""
        http_address = http_address or default_http_address(peer_address)
        member = PutMember(node_id, peer_address, http_address)
        return self._lock.run(self._join, member)

    @defer.inlineCallbacks
    def _join(self, member: PutMember):
        self._require_leader()
        if member.node_id == self.node_id:
            raise InvalidField("node_id", f"{member.node_id} is this node, already a member")
        conf = self._meta.conf
        known = self._store.member(member.node_id)
        if known is not None:
            refused = self._network.refused_incarnation(member.node_id)
            problem = None if refused is None else identity_problem(
                member.node_id, known.incarnation, refused
            )
            if problem is not None:
                raise AlreadyConfigured(f"node {member.node_id} is a member, but {problem}")
            member = dataclasses.replace(member, incarnation=known.incarnation)
        if known is not None and member.node_id in conf.voters | conf.learners:
            if known != member:
                yield self._meta.propose(member)  # it moved to new addresses
            yield self._call_off_removal(member.node_id)
            return
        self._offered[member.node_id] = member.peer_address
        self._network.set_peers(self.peers())
        try:
            yield self._offer(member.node_id)
            yield self._meta.propose(member)
            if member.node_id not in conf.voters | conf.learners:
                yield self._meta.change_membership(
                    ConfChange(ConfChangeKind.ADD_LEARNER, member.node_id)
                )
            yield self._call_off_removal(member.node_id)
        finally:
            self._offered.pop(member.node_id, None)
            self._network.set_peers(self.peers())
        self.log.info(
            "node {node} joined the cluster at {address}",
            node=member.node_id,
            address=member.peer_address,
        )

    @defer.inlineCallbacks
    def _call_off_removal(self, node_id: str):
        if node_id in self._store.leaving():
            yield self._meta.propose(MemberLeaving(node_id, leaving=False))
            self.log.info("node {node} joined again: its removal is called off", node=node_id)

    @defer.inlineCallbacks
    def _offer(self, node_id: str):
        deadline = self._reactor.seconds() + OFFER_SECONDS
        request = pb.Request(join=pb.JoinOffer(leader_id=self.node_id))
        while True:
            try:
                response = yield self._network.request(node_id, request)
                break
            except Unavailable:
                if self._reactor.seconds() > deadline:
                    raise Unavailable(
                        f"node {node_id} cannot be reached at "
                        f"{self._offered.get(node_id)}; is it running?"
                    ) from None
                yield task.deferLater(self._reactor, 0.1, lambda: None)
        error = error_of(response)
        if error is not None:
            raise error

    def check_removable(self, node_id: str) -> None:
        """Refuse to remove a node that is not a member, or off the meta leader."""
        self._require_leader()
        if self._store.member(node_id) is None:
            raise NotFound(f"node {node_id} is not a member")

    @defer.inlineCallbacks
    def remove(self, node_id: str):
        """Take a member that holds no replicas out of the meta group and the member
        list (not this node, the meta leader)."""
        self.check_removable(node_id)
        if node_id == self.node_id:
            raise InvalidField("node_id", "is the meta group's leader: hand it over first")
        config = self._store.config
        if config is not None:
            held = Ring(config).shards_of(node_id)
            if held:
                raise InvalidField(
                    "node_id", f"{node_id} is still placed with replicas of shards {held}"
                )
        conf = self._meta.conf
        if node_id in conf.voters | conf.learners:
            yield self._meta.change_membership(ConfChange(ConfChangeKind.REMOVE, node_id))
        yield self._meta.propose(RemoveMember(node_id))

    def _require_leader(self) -> None:
        if not self._meta.leads:
            raise Unavailable("this node does not lead the meta group; retry on the leader")

    def _look_after_members(self):
        self._record_incarnations()
        return self._promote_caught_up()

    def _record_incarnations(self) -> None:
        """Record the incarnation of members recorded without one (joined since, or
        by an earlier build), as their Hellos (this node's own: its network's) say."""
        if self._recording or not self._meta.is_leader():
            return
        unrecorded = {}
        for member in self._store.members():
            if member.node_id == self.node_id:
                incarnation = self._network.incarnation
            else:
                incarnation = self._network.incarnation_of(member.node_id)
            if incarnation and not member.incarnation:
                unrecorded[member.node_id] = incarnation
        if not unrecorded:
            return
        self._recording = True
        d = self._lock.run(self._record, unrecorded)
        d.addErrback(lambda f: self.log.info(
            "recording the members' incarnations waits: {error}", error=f.value
        ))
        d.addBoth(lambda _: setattr(self, "_recording", False))

    @defer.inlineCallbacks
    def _record(self, incarnations):
        for node_id, incarnation in incarnations.items():
            # As recorded now, under the lock: a join meanwhile may have moved it.
            current = self._store.member(node_id)
            if current is not None and not current.incarnation:
                yield self._meta.propose(dataclasses.replace(current, incarnation=incarnation))

    @defer.inlineCallbacks
    def _promote_caught_up(self):
        meta = self._meta
        if self._promoting or not meta.is_leader():
            return
        conf = meta.conf
        # Not those being removed: a voter leaving gets its successor before it goes.
        wanted = meta_voters(self._store.staying(), conf.voters, leader=self.node_id)
        ready = sorted(n for n in conf.learners if n in wanted and meta.caught_up(n))
        if not ready:
            return
        self._promoting = True
        try:
            yield meta.change_membership(ConfChange(ConfChangeKind.PROMOTE, ready[0]))
            self.log.info("node {node} votes in the meta group now", node=ready[0])
        except TimeMachineError as e:
            self.log.info("promoting {node} waits: {error}", node=ready[0], error=e)
        finally:
            self._promoting = False

    # -- the joining node's side ---------------------------------------------------------

    @defer.inlineCallbacks
    def _offer_received(self, from_node: str, offer: pb.JoinOffer):
        meta = self._meta
        if meta.blank:
            return pb.JoinAccepted()
        others = [m.node_id for m in self._store.members() if m.node_id != self.node_id]
        if not meta.alone or others:
            raise AlreadyConfigured(
                f"node {self.node_id} is a member of another cluster "
                f"(with {', '.join(others) or 'other voters'}): it cannot join this one"
            )
        jobs, routes = yield self._holdings()
        if jobs or routes:
            raise AlreadyConfigured(
                f"node {self.node_id} bootstrapped its own cluster and holds {jobs} jobs "
                f"and {routes} routes: it cannot join another one without losing them"
            )
        self.log.warn(
            "node {node} gives up the empty one-node cluster it bootstrapped to join "
            "{leader}'s",
            node=self.node_id,
            leader=offer.leader_id,
        )
        yield self._give_up_alone()
        return pb.JoinAccepted()
