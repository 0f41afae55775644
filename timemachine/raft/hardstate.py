"""Comparing two hard states (term, vote, commit) saved by one Raft member.

The hard-state file this module used to write is gone: the node-wide log
(`timemachine.raft.engine`) carries each group's full hard state in every record, so
its latest record holds its latest hard state. What stays is `latest`, which the
simulation (`timemachine.raft.sim`) uses to model a member that saved two copies of
its hard state (a log record's and a file's, as the former per-member disk did) and
restarts from the later one: a superset of the crash states the engine can leave.
"""

from __future__ import annotations

from timemachine.raft.types import HardState


def latest(a: HardState, b: HardState) -> HardState:
    """The later of two hard states saved by one member.

    A member's term, its vote within a term and its commit index only ever move
    forward, so the later state is the field-wise maximum: the higher term with the
    vote cast in it, and the higher commit index.
    """
    term = max(a.term, b.term)
    votes = [s.vote for s in (a, b) if s.term == term and s.vote is not None]
    return HardState(term=term, vote=votes[0] if votes else None, commit=max(a.commit, b.commit))
