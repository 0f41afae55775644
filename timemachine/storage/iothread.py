"""One thread for blocking calls (fsync, SQLite), shared by the logs or stores of a node.

Each hop between the reactor and a worker thread costs a wake-up on both sides and a
trip through the reactor's queue of thread results, whatever the work carried. With a
thread per shard, sixteen concurrent requests spread over eight shards paid two hops
each. An `IOThread` shared by the shards carries every call that queued up while it
was busy in one hop, so the hops per request fall as the load rises.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

#: What `IOThread.stop` hands the thread to end it.
_STOP = object()


class IOThread:
    """Runs blocking calls on one thread, in the order they were made.

    A call made while the thread is idle leaves at once; calls made while it is busy
    wait and leave together, in one hop, when it reports back.
    """

    def __init__(self, reactor, name: str):
        self.name = name
        self._reactor = reactor
        # The thread's inbox: C-implemented, so handing a batch over costs one put,
        # not the layers of a Twisted thread pool (a hop per batch, many per second).
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._queue: list[tuple[Callable[..., Any], tuple, defer.Deferred]] = []
        self._busy = False

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread once the calls already handed to it have run.

        Joins the thread: call it when nothing is in flight (after the users closed).
        """
        if self._thread is not None:
            self._inbox.put(_STOP)
            self._thread.join()
            self._thread = None

    def call(self, f: Callable[..., Any], *args) -> defer.Deferred:
        """Run ``f(*args)`` on the thread; fire with its result or its exception."""
        if self._thread is None:
            return defer.fail(RuntimeError(f"{self.name} is not running"))
        d = defer.Deferred()
        self._queue.append((f, args, d))
        if not self._busy:
            self._send()
        return d

    def _send(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        self._inbox.put(batch)

    def _serve(self) -> None:
        while (batch := self._inbox.get()) is not _STOP:
            results = []
            for f, args, _ in batch:
                try:
                    results.append((True, f(*args)))
                except BaseException:
                    results.append((False, Failure()))
            self._reactor.callFromThread(self._report, batch, results)

    def _report(self, batch, results) -> None:
        self._busy = False
        if self._queue:
            self._send()
        for (_, _, d), (ok, value) in zip(batch, results, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
