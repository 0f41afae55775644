"""Failures of the peer protocol that reach the caller of a request.

They are `Unavailable` (503, ``E_UNAVAILABLE``): the coordinator that forwarded a call
answers its client "retry", as it does when a shard has no leader. A timeout is
ambiguous for a proposal (it may still commit), which a retried put or delete of a job
tolerates: both are idempotent on the job's id.
"""

from __future__ import annotations

from timemachine.domain.errors import TooLarge, Unavailable


class PeerUnavailable(Unavailable):
    """No connection to the node, or it was lost before the answer came."""

    def __init__(self, node_id: str, message: str):
        super().__init__(f"peer {node_id}: {message}")
        self.node_id = node_id


class PeerNetworkStopped(PeerUnavailable):
    """This node's peer network stopped while the request waited (or before it)."""


class PeerTimeout(Unavailable):
    """No answer within the request's timeout; a late answer is ignored."""

    def __init__(self, node_id: str, timeout: float):
        super().__init__(f"peer {node_id}: no answer within {timeout:g} s")
        self.node_id = node_id
        self.timeout = timeout


class MessageTooLarge(TooLarge):
    """An envelope this node was about to send is over the frame limit.

    Sent, it would make the peer close the connection that every Raft group shares;
    it is refused here instead.
    """
