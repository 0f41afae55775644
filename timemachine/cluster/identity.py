"""Which data dir a node runs on: the data dir's identity, and what peers make of it.

A Raft member that loses its disk and comes back under the same id has forgotten its
votes and its log. Raft's safety rests on both: with its vote, a candidate that lacks
entries this member helped commit can win, and those entries are lost. Raft cannot
see the loss; the data dir can. On its first start a data dir gets an *incarnation*,
a random id kept in `IDENTITY_FILE` with the node id it was made for. A node says its
incarnation in its `Hello`; the meta group records each member's (`PutMember`), the
meta leader once the member is connected. A node refuses a peer connection from a member whose
Hello names another incarnation than the recorded one: that node is cut off before a
single Raft message, until it is removed (``POST /cluster/remove``) and joined again,
as a new member.

The file also keeps a data dir to its node: a node started on another node's data
dir refuses to start rather than vote and write with that node's Raft state.
"""

from __future__ import annotations

import json
import os
import secrets

from timemachine.domain.errors import StorageError
from timemachine.storage.durable import read_if_exists, write_atomically

#: The file of a data dir naming the node it belongs to and its incarnation.
IDENTITY_FILE = "identity"
_INCARNATION_HEX_DIGITS = 32


def load_identity(data_dir: str, node_id: str) -> str:
    """The incarnation of the data dir at ``data_dir``, made (durably) on its first
    start; `StorageError` naming the file if it belongs to another node than
    ``node_id`` or is damaged. Blocks."""
    path = os.path.join(data_dir, IDENTITY_FILE)
    data = read_if_exists(path)
    if data is None:
        incarnation = secrets.token_hex(_INCARNATION_HEX_DIGITS // 2)
        record = {"node_id": node_id, "incarnation": incarnation}
        write_atomically(path, json.dumps(record).encode())
        return incarnation
    try:
        record = json.loads(data)
        owner, incarnation = record["node_id"], record["incarnation"]
        if not isinstance(owner, str) or len(incarnation) != _INCARNATION_HEX_DIGITS:
            raise ValueError(f"not a node id and {_INCARNATION_HEX_DIGITS} hex digits")
        int(incarnation, 16)
    except (ValueError, TypeError, KeyError) as e:
        raise StorageError(
            f"{path}: not a record of this data dir's identity ({e!r}); it tells peers "
            f"which data dir the node runs on: restore it, or give the node a new data "
            f"dir and join it to the cluster again"
        ) from e
    if owner != node_id:
        raise StorageError(
            f"{path}: this data dir belongs to node {owner}, not {node_id}: start it as "
            f"{owner}, or give {node_id} a data dir of its own"
        )
    return incarnation


def identity_problem(node_id: str, recorded: str, presented: str) -> str | None:
    """Why a peer connection from member ``node_id`` is refused, or None: the cluster
    knows its data dir as incarnation ``recorded`` ("" when not yet recorded), its
    Hello says ``presented``."""
    if not recorded or presented == recorded:
        return None
    return (
        f"its data dir is not the one {node_id} joined the cluster with (incarnation "
        f"{presented or 'none'}, the cluster knows {recorded}): a node that lost its data "
        f"must be removed (POST /cluster/remove) and joined again"
    )
