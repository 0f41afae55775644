"""Proposals made on a node that does not lead the group go to the node that does.

A write reaches whichever node the client picked. If this node's member of the group
leads, it proposes; otherwise the proposal travels over the peer protocol to the
leader this member knows, which answers once the entry is committed and applied. A
node that receives a proposal it cannot take passes it on once more if it knows a
leader (leadership may just have moved), and never twice (``Propose.forwarded``), so
a proposal crosses at most two hops and never loops. With no leader known it waits
for one (`RaftGroup.wait_for_leader`: a leadership transfer takes milliseconds), and
answers ``503 E_UNAVAILABLE``, a retry, when none is known in time.

A forwarded answer carries the entry's index and, for a delete, whether the job or
route was there; the caller gets ``(index, None)`` for other results.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import defer

from timemachine._pb import timemachine_pb2 as pb
from timemachine.cluster.raftgroup import NotLeader
from timemachine.domain.codec import command_from_pb, command_to_pb
from timemachine.domain.commands import DeleteJob, DeleteRoute
from timemachine.domain.errors import Unavailable
from timemachine.peer.errors import PeerTimeout, PeerUnavailable
from timemachine.peer.requests import error_of

#: Seconds a forwarded proposal may take before it is given up on that node: a leader
#: cut off by a partition never answers, while the one elected meanwhile (within an
#: election timeout or two) would.
FORWARD_TIMEOUT = 3.0
#: Times a proposal is passed on to a newly known leader after the one asked failed.
FORWARD_RETRIES = 3


class Forwarding:
    """Proposes on a group's leader, wherever it is; answers peers' proposals.

    ``network`` is the node's `PeerNetwork`; ``group_of(number)`` the node's member
    of a group (a `RaftGroup`), or None when it holds none.
    """

    def __init__(self, network, group_of: Callable[[int], object | None]):
        self._network = network
        self._group_of = group_of
        network.handle("propose", self._proposed_to_us)

    def propose(self, group, command):
        """Fire with ``(index, result)`` once ``command`` is applied by ``group``'s
        leader (``result`` is None when the leader was another node and the command
        is not a delete)."""
        if group.leads:
            return group.propose(command).addErrback(self._handed_over, group, command)
        return self._forward_following(group, command)

    def _handed_over(self, failure, group, command):
        """A leader refuses proposals while it hands its leadership over: the command
        goes to the new leader once there is one, or here again if the transfer gave
        up."""
        failure.trap(NotLeader)
        return self._propose_when_led(
            group, command, lambda _: self._forward_following(group, command),
            besides=self._network.node_id,
        )

    @defer.inlineCallbacks
    def _propose_when_led(self, group, command, forward, besides=None):
        """Once ``group``'s member knows a leader (other than ``besides``), propose
        ``command`` here if this node leads, else ``forward(leader)``."""
        leader = yield group.wait_for_leader(besides=besides)
        if group.leads:
            answer = yield group.propose(command)
        else:
            answer = yield forward(leader)
        return answer

    @defer.inlineCallbacks
    def _forward_following(self, group, command):
        """Pass ``command`` on to the leader ``group``'s member knows; when that one
        fails to answer and the member has learnt of another leader since (or of
        itself), try again there."""
        for _ in range(FORWARD_RETRIES):
            leader = group.leader
            if leader is None:
                leader = yield group.wait_for_leader()
                if group.leads:
                    answer = yield group.propose(command)
                    return answer
            try:
                answer = yield self._forward(group.group, leader, command, forwarded=False)
                return answer
            except (PeerUnavailable, PeerTimeout):
                if group.leads:
                    answer = yield group.propose(command)
                    return answer
                if group.leader in (None, leader):
                    raise
        raise Unavailable(f"group {group.group} is changing leader; retry")

    @defer.inlineCallbacks
    def propose_at(self, group_number: int, nodes, command):
        """Propose on a group this node holds no replica of, through one of the
        ``nodes`` holding it (each tried in turn; the one asked passes it on to its
        leader)."""
        last_error = Unavailable(f"group {group_number} has no replicas to ask")
        for node in nodes:
            try:
                answer = yield self._forward(group_number, node, command, forwarded=False)
                return answer
            except Unavailable as error:
                last_error = error
        raise last_error

    @defer.inlineCallbacks
    def _forward(self, group_number: int, leader: str | None, command, forwarded: bool):
        if leader is None:
            raise Unavailable(f"group {group_number} has no leader now; retry")
        request = pb.Request(
            propose=pb.Propose(
                group=group_number, command=command_to_pb(command), forwarded=forwarded
            )
        )
        response = yield self._network.request(leader, request, timeout=FORWARD_TIMEOUT)
        error = error_of(response)
        if error is not None:
            raise error
        result = response.propose
        found = result.found if isinstance(command, DeleteJob | DeleteRoute) else None
        return result.index, found

    @defer.inlineCallbacks
    def _proposed_to_us(self, from_node: str, propose: pb.Propose):
        group = self._group_of(propose.group)
        if group is None:
            raise Unavailable(f"this node holds no replica of group {propose.group}")
        command = command_from_pb(propose.command)
        try:
            if not group.leads and group.leader is None:
                yield group.wait_for_leader()
            if group.leads:
                try:
                    index, result = yield group.propose(command)
                except NotLeader:
                    if propose.forwarded:
                        raise
                    # It hands its leadership over: on to the new leader (or here
                    # again, if the transfer gave up).
                    index, result = yield self._propose_when_led(
                        group, command,
                        lambda leader: self._forward(
                            propose.group, leader, command, forwarded=True
                        ),
                        besides=self._network.node_id,
                    )
            elif not propose.forwarded:
                index, result = yield self._forward(
                    propose.group, group.leader, command, forwarded=True
                )
            else:
                raise NotLeader(f"group {propose.group}: not the leader either", group.leader)
        except NotLeader as e:
            raise Unavailable(f"group {propose.group} is changing leader; retry") from e
        found = bool(result) if isinstance(command, DeleteJob | DeleteRoute) else False
        return pb.ProposeResult(index=index, found=found)
