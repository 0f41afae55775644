"""The one-member shard log: propose -> durable append -> commit -> apply -> answer.

A single node commits an entry as soon as its WAL record is fsync'd. The Raft groups
of a cluster replace this class behind the same `IShardLog` interface, leaving the
API, stores, executor and publisher as they are.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from timemachine.domain.codec import decode_command, encode_command
from timemachine.domain.errors import CorruptLog, StorageError, Unavailable
from timemachine.interfaces import IShardLog

# A one-member group never changes term; Raft will write real terms here.
LOCAL_TERM = 1

# Entries applied in one store transaction at most; bounds the time a batch
# holds the store's thread so reads interleave with a large replay.
MAX_APPLY_BATCH = 2000


@implementer(IShardLog)
class LocalShardLog:
    """A shard log whose only member is this node.

    ``compactor`` (a `timemachine.cluster.compaction.Compactor` of the same WAL and
    store, or None) is started once the log is open, told of every apply and
    stopped before the WAL and the store close.
    """

    log = Logger()

    def __init__(self, name: str, wal, store, compactor=None):
        self.name = name
        self._wal = wal
        self._store = store
        self._compactor = compactor
        self._listeners = []
        self._answers: dict[int, defer.Deferred] = {}
        self._to_apply: list[tuple[int, object]] = []
        self._applying = False
        self._next_index = 1
        self._open = False
        self._broken: StorageError | None = None
        self._idle: list[defer.Deferred] = []

    @property
    def store(self):
        """The state machine this log applies to."""
        return self._store

    @property
    def wal(self):
        """The write-ahead log holding this log's entries."""
        return self._wal

    @property
    def compactor(self):
        """The `Compactor` cutting this log, or None."""
        return self._compactor

    @property
    def applied_index(self) -> int:
        return self._store.applied_index

    @property
    def last_index(self) -> int:
        return self._next_index - 1

    @defer.inlineCallbacks
    def open(self):
        """Open the WAL and the store and replay the entries the store lacks.

        Fails with `CorruptLog` (closing both, changing nothing) when either log is
        damaged, or the log does not reach back to the store's next entry or forward
        to its applied index: entries the store has applied, or has yet to, are gone.
        """
        yield self._wal.open()
        try:
            yield self._store.open()
            self._check_log_covers_store()
            yield self._replay()
        except Exception:
            # A log that failed to open holds no thread or file open: the node goes
            # on with its other shards, and a process that stops can exit.
            yield self._store.close()
            yield self._wal.close()
            raise
        # A store restored from a snapshot may be ahead of an emptied WAL.
        self._next_index = max(self._wal.last_index, self._store.applied_index) + 1
        self._open = True
        if self._compactor is not None:
            compactor = self._compactor
            self.subscribe(lambda index, command, result: compactor.applied(1))
            yield compactor.start()

    @defer.inlineCallbacks
    def _replay(self):
        """Apply the entries of the log above the store's applied_index, in batches."""
        last = self._wal.last_index
        start = self._store.applied_index + 1
        while start <= last:
            stop = min(last + 1, start + MAX_APPLY_BATCH)
            records = yield self._wal.read(start, stop)
            entries = [(r.index, decode_command(r.payload)) for r in records]
            yield self._store.apply(entries)
            start = stop

    def _check_log_covers_store(self):
        first, last = self._wal.first_index, self._wal.last_index
        if first is None:
            return  # an emptied log: the store holds everything (a snapshot, a cut)
        applied = self._store.applied_index
        if applied > last:
            problem = (
                f"its store {self._store.path} has applied index {applied}, "
                f"beyond the log's last entry {last}"
            )
        elif first > applied + 1:
            problem = (
                f"the log starts at index {first}, but its store {self._store.path} "
                f"has applied only up to {applied}: entries {applied + 1}..{first - 1} "
                "are missing"
            )
        else:
            return
        raise CorruptLog(
            f"{self.name}: write-ahead log {self._wal.directory} (entries {first}..{last}) "
            f"does not match its store: {problem}",
            path=self._wal.directory,
            intact_records=last - first + 1,
        )

    def subscribe(self, listener):
        self._listeners.append(listener)

    def is_leader(self) -> bool:
        return self._open and self._broken is None

    def propose(self, command):
        if not self._open:
            return defer.fail(Unavailable(f"{self.name} is not serving"))
        if self._broken is not None:
            return defer.fail(self._broken)
        index = self._next_index
        try:
            durable = self._wal.append(index, LOCAL_TERM, encode_command(command))
        except Exception as e:  # the WAL refuses after a failed fsync
            return defer.fail(StorageError(f"{self.name}: cannot append: {e}"))
        self._next_index += 1
        answer = defer.Deferred()
        self._answers[index] = answer
        durable.addCallbacks(
            lambda _: self._committed(index, command),
            lambda failure: self._append_failed(index, failure),
        )
        return answer

    def _committed(self, index, command):
        self._to_apply.append((index, command))
        if not self._applying:
            self._apply_pending()

    def _append_failed(self, index, failure):
        self._broken = StorageError(f"{self.name}: write-ahead log failed: {failure.value}")
        self.log.failure("shard log {name} cannot append", failure, name=self.name)
        self._answer_failure(index, self._broken)

    def _answer_failure(self, index, error):
        answer = self._answers.pop(index, None)
        if answer is not None:
            answer.errback(error)
        self._maybe_idle()

    @defer.inlineCallbacks
    def _apply_pending(self):
        self._applying = True
        try:
            while self._to_apply:
                batch = self._to_apply[:MAX_APPLY_BATCH]
                del self._to_apply[:MAX_APPLY_BATCH]
                try:
                    results = yield self._store.apply(batch)
                except Exception as e:
                    self._broken = StorageError(f"{self.name}: store failed to apply: {e}")
                    self.log.failure("shard log {name} cannot apply", name=self.name)
                    for index, _ in batch + self._to_apply:
                        self._answer_failure(index, self._broken)
                    self._to_apply.clear()
                    return
                for (index, command), result in zip(batch, results, strict=True):
                    for listener in self._listeners:
                        try:
                            listener(index, command, result)
                        except Exception:
                            self.log.failure("listener of {name} failed", name=self.name)
                    answer = self._answers.pop(index, None)
                    if answer is not None:
                        answer.callback((index, result))
        finally:
            self._applying = False
            self._maybe_idle()

    def _maybe_idle(self):
        if not self._answers and not self._applying:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def drain(self):
        """Fire once every proposal made so far is applied and answered."""
        if not self._answers and not self._applying:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._idle.append(waiter)
        return waiter

    @defer.inlineCallbacks
    def close(self):
        """Refuse new proposals, wait for those in progress, close the WAL and store."""
        if not self._open:
            return
        self._open = False
        yield self.drain()
        if self._compactor is not None:
            yield self._compactor.stop()
        yield self._wal.close()
        yield self._store.close()
