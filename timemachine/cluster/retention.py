"""Retention: purge fired and failed jobs once their retention period has ended.

The leader of a shard looks for jobs past retention in its store and proposes a
`PurgeJobs` naming each at the version that finished, so every replica applying the
log removes the same rows and a job replaced meanwhile stays. Batches are bounded
(``batch`` jobs per command), one at a time per shard: a store read, then a proposal,
each a Deferred, so the reactor never waits on a large purge.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.logger import Logger

from timemachine.domain.commands import PurgeJobs
from timemachine.domain.errors import StorageError, TimeMachineError

DEFAULT_RETAIN_FIRED_MS = 7 * 24 * 3600 * 1000
DEFAULT_RETAIN_FAILED_MS = 30 * 24 * 3600 * 1000
DEFAULT_SWEEP_S = 1.0
DEFAULT_BATCH = 500


class Retention:
    """Purges the finished jobs of the shards this node leads.

    ``shards`` maps shard number -> (log, store), the node's live map (shards come
    and go with configure); every ``sweep_s`` seconds each shard whose log this node
    leads is swept until no expired job is left.
    """

    log = Logger()

    def __init__(
        self,
        reactor,
        shards,
        retain_fired_ms: int = DEFAULT_RETAIN_FIRED_MS,
        retain_failed_ms: int = DEFAULT_RETAIN_FAILED_MS,
        sweep_s: float = DEFAULT_SWEEP_S,
        batch: int = DEFAULT_BATCH,
        metrics=None,
    ):
        if retain_fired_ms < 0 or retain_failed_ms < 0:
            raise ValueError("retention periods cannot be negative")
        if batch < 1:
            raise ValueError(f"batch must be positive, not {batch}")
        self._reactor = reactor
        self._shards = shards
        self.retain_fired_ms = retain_fired_ms
        self.retain_failed_ms = retain_failed_ms
        self._batch = batch
        self._metrics = metrics
        self._loop = task.LoopingCall(self.sweep)
        self._loop.clock = reactor
        self._sweep_s = sweep_s
        self._looping: defer.Deferred | None = None
        self.purged = 0

    def start(self) -> None:
        """Sweep every ``sweep_s`` seconds, the first time one period from now."""
        self._looping = self._loop.start(self._sweep_s, now=False)
        self._looping.addErrback(lambda failure: self.log.failure("retention stopped", failure))

    def stop(self):
        """Sweep no more; fires once the sweep in progress (if any) is done."""
        if not self._loop.running:
            return defer.succeed(None)
        # The loop's Deferred fires only after a sweep in progress has finished.
        self._loop.stop()
        return self._looping

    @defer.inlineCallbacks
    def sweep(self):
        """Purge every expired job of the led shards; fires with how many went."""
        now_ms = int(self._reactor.seconds() * 1000)
        fired_before = now_ms - self.retain_fired_ms
        failed_before = now_ms - self.retain_failed_ms
        total = 0
        for shard, (log, store) in list(self._shards.items()):
            try:
                total += yield self._sweep_shard(log, store, fired_before, failed_before)
            except (TimeMachineError, StorageError) as e:
                # The shard is closing, or its log refuses writes (and says so itself):
                # the next sweep tries again.
                self.log.warn("retention of shard {shard} skipped: {error}", shard=shard, error=e)
            except Exception:
                self.log.failure("retention of shard {shard} failed", shard=shard)
        return total

    @defer.inlineCallbacks
    def _sweep_shard(self, log, store, fired_before, failed_before):
        total = 0
        while log.is_leader():
            expired = yield store.expired(fired_before, failed_before, self._batch)
            if not expired:
                break
            _, purged = yield log.propose(PurgeJobs(tuple(expired)))
            total += purged
            self.purged += purged
            if self._metrics is not None:
                self._metrics.jobs_purged.inc(purged)
            if len(expired) < self._batch:
                break
        return total
