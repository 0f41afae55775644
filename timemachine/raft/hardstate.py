"""A Raft member's hard state (term, vote, commit) on disk, replaced atomically.

The vote must survive a crash exactly as it was promised: a member that forgot its
vote could vote twice in one term. Each save writes a temporary file, fsyncs it,
renames it over the old one and fsyncs the directory, so a crash leaves either the
old state or the new one, never a mix. A checksum catches a file damaged otherwise.

The file is not the only copy: `timemachine.raft.disk` also writes the hard state into
the WAL with the entries it covers, and a member starts from the `latest` of the two.
"""

from __future__ import annotations

import json
import os

import crc32c

from timemachine.domain.errors import CorruptLog
from timemachine.raft.types import HardState
from timemachine.storage.durable import write_atomically
from timemachine.storage.iothread import IOThread

FILE_NAME = "hardstate.json"


def encode(state: HardState) -> bytes:
    body = json.dumps(
        {"term": state.term, "vote": state.vote, "commit": state.commit}, sort_keys=True
    )
    return json.dumps({"crc32c": crc32c.crc32c(body.encode()), "state": body}).encode()


def decode(data: bytes, where: str) -> HardState:
    try:
        outer = json.loads(data)
        body = outer["state"]
        if crc32c.crc32c(body.encode()) != outer["crc32c"]:
            raise ValueError("checksum mismatch")
        fields = json.loads(body)
        return HardState(term=fields["term"], vote=fields["vote"], commit=fields["commit"])
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptLog(f"{where}: unreadable hard state: {e}") from e


def latest(a: HardState, b: HardState) -> HardState:
    """The later of two hard states saved by one member (the WAL's and the file's).

    A member's term, its vote within a term and its commit index only ever move
    forward, so the later state is the field-wise maximum: the higher term with the
    vote cast in it, and the higher commit index.
    """
    term = max(a.term, b.term)
    votes = [s.vote for s in (a, b) if s.term == term and s.vote is not None]
    return HardState(term=term, vote=votes[0] if votes else None, commit=max(a.commit, b.commit))


def write_hard_state(directory: str, state: HardState) -> None:
    """Replace the hard state in ``directory`` atomically and durably (blocking)."""
    write_atomically(os.path.join(directory, FILE_NAME), encode(state))


def read_hard_state(directory: str) -> HardState:
    """The hard state saved in ``directory``; the empty state if none was ever saved."""
    path = os.path.join(directory, FILE_NAME)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return HardState()
    return decode(data, path)


class HardStateFile:
    """The hard state of one member, saved and loaded on an `IOThread`."""

    def __init__(self, directory: str, io: IOThread):
        self.directory = directory
        self._io = io

    def load(self):
        """Fire with the saved `HardState` (creating the directory if needed)."""

        def load():
            os.makedirs(self.directory, exist_ok=True)
            return read_hard_state(self.directory)

        return self._io.call(load)

    def save(self, state: HardState):
        """Fire once ``state`` is durable."""
        return self._io.call(write_hard_state, self.directory, state)
