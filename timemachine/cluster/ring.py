"""Key placement: which shard holds a job, and which nodes hold a shard."""

from __future__ import annotations

import xxhash
from zope.interface import implementer

from timemachine.domain.commands import Configure
from timemachine.interfaces import IRing

DEFAULT_SHARDS = 8


def shard_of(job_id: str, shards: int) -> int:
    """``xxhash64(job_id) % shards``: the placement rule every node agrees on."""
    return xxhash.xxh64_intdigest(job_id.encode("utf-8")) % shards


@implementer(IRing)
class Ring:
    """The shard map of a cluster, built from its durable `Configure` record."""

    def __init__(self, config: Configure):
        self._config = config

    @classmethod
    def single_node(cls, node_id: str, shards: int = DEFAULT_SHARDS) -> Ring:
        """The map of a one-node cluster: every shard on ``node_id``."""
        return cls(Configure(shards, 1, tuple((node_id,) for _ in range(shards))))

    @property
    def config(self) -> Configure:
        return self._config

    @property
    def shards(self) -> int:
        return self._config.shards

    def shard_for(self, job_id: str) -> int:
        return shard_of(job_id, self._config.shards)

    def replicas(self, shard: int) -> tuple[str, ...]:
        if not 0 <= shard < self._config.shards:
            raise KeyError(shard)
        return self._config.placement[shard]

    def shards_of(self, node_id: str) -> list[int]:
        """The shards with a replica on ``node_id``."""
        return [s for s, nodes in enumerate(self._config.placement) if node_id in nodes]
