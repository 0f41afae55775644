"""Compaction: cut a log below what its store has durably applied.

A log only needs the entries its store could still lose: those above the index the
store has made durable. The store commits with ``synchronous=NORMAL``, so the
compactor first asks it for a checkpoint (which syncs) and learns the index that is
durable now; it then keeps a tail of ``tail`` entries below that index, so a Raft
follower slightly behind catches up from the log rather than from a snapshot, and
lets the WAL delete the segments wholly below the cut (in its writer thread, with
the directory fsync, never on the reactor).

When: after ``every_entries`` applied entries or ``every_bytes`` appended bytes
(the segment size, so a log never holds more than a few segments of history) since
the last compaction, and once when the log opens. The cut seals the active segment
when it holds entries below the cut, so a large segment size never keeps history
alive: the next compaction deletes that segment whole. What is left on disk is the
tail, plus at most the entries appended between two compactions; a restart reads
only that.
"""

from __future__ import annotations

import contextlib

from twisted.internet import defer
from twisted.logger import Logger

DEFAULT_TAIL_ENTRIES = 1000
DEFAULT_EVERY_ENTRIES = 10_000


class Compactor:
    """Compacts one log (``wal``) in front of one store (``store``).

    ``name`` labels the metrics (``metrics`` is a `timemachine.metrics.Metrics` or
    None): bytes on disk of the log and of the store. The owner calls `start` once
    the log is open, `applied` after entries are applied, and `stop` before closing
    the WAL and the store.
    """

    log = Logger()

    def __init__(
        self,
        name: str,
        wal,
        store,
        tail: int = DEFAULT_TAIL_ENTRIES,
        every_entries: int = DEFAULT_EVERY_ENTRIES,
        every_bytes: int | None = None,
        metrics=None,
    ):
        if tail < 1:
            # The last entry stays: a log that is never empty tells a restart where
            # the store must be, which an empty one cannot.
            raise ValueError(f"the compaction tail must keep at least 1 entry, not {tail}")
        if every_entries < 1:
            raise ValueError(f"every_entries must be positive, not {every_entries}")
        self.name = name
        self._wal = wal
        self._store = store
        self._tail = tail
        self._every_entries = every_entries
        self._every_bytes = every_bytes
        self._metrics = metrics
        self._since_entries = 0
        self._since_bytes = 0  # the log's bytes on disk after the last compaction
        self._running: defer.Deferred | None = None
        self._stopped = False
        self.compactions = 0
        self.store_bytes = 0

    def start(self):
        """Compact once (the log just opened) and publish the disk gauges."""
        if self._metrics is not None:
            self._metrics.log_bytes.labels(log=self.name).set_function(
                lambda: self._wal.bytes_on_disk
            )
            self._metrics.store_bytes.labels(store=self.name).set_function(
                lambda: self.store_bytes
            )
        return self.compact()

    def applied(self, entries: int) -> None:
        """``entries`` more entries were applied: compact when enough piled up."""
        self._since_entries += entries
        if self._running is not None or self._stopped:
            return
        grown = self._wal.bytes_on_disk - self._since_bytes
        if self._since_entries >= self._every_entries or (
            self._every_bytes is not None and grown >= self._every_bytes
        ):
            self.compact()

    def compact(self):
        """Cut the log below the store's durable index less the tail; fires when done.

        A compaction already running is joined, not repeated. Failures are logged and
        swallowed: the log keeps its entries and the next compaction tries again.
        """
        if self._stopped:
            return defer.succeed(None)
        if self._running is None:
            self._since_entries = 0
            self._running = self._compact()
            self._running.addErrback(self._failed)
            self._running.addBoth(self._done)
        return self._join()

    @defer.inlineCallbacks
    def _compact(self):
        durable = yield self._store.checkpoint()
        cut = durable - self._tail + 1
        first = self._wal.first_index
        if first is not None and cut > first:
            yield self._wal.drop_prefix(cut, seal=True)
        self._since_bytes = self._wal.bytes_on_disk
        self.store_bytes = yield self._store.disk_bytes()
        self.compactions += 1

    def _join(self):
        waiter = defer.Deferred()

        def finished(result):
            waiter.callback(None)
            return result

        self._running.addBoth(finished)
        return waiter

    def _failed(self, failure):
        self.log.failure(
            "compaction of {name} failed; its log keeps its entries", failure, name=self.name
        )

    def _done(self, result):
        self._running = None
        return result

    def stop(self):
        """Start no more compactions; fires once the running one (if any) is done."""
        self._stopped = True
        if self._metrics is not None:
            for gauge in (self._metrics.log_bytes, self._metrics.store_bytes):
                with contextlib.suppress(KeyError):
                    gauge.remove(self.name)
        if self._running is None:
            return defer.succeed(None)
        return self._join()
