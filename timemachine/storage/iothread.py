"""One thread for blocking calls (fsync, SQLite), shared by the logs or stores of a node.

Each hop between the reactor and a worker thread costs a wake-up on both sides and a
trip through the reactor's queue of thread results, whatever the work carried. With a
thread per shard, sixteen concurrent requests spread over eight shards paid two hops
each. An `IOThread` shared by the shards carries back every call that was handed to
it while it was busy in one hop, so the hops per request fall as the load rises.

Calls are handed over as they are made. Waking a sleeping thread is the costly part
of the way there (a futex wake-up, with the GIL held: py-spy found the reactor in it
for 15% of the nodes' GIL samples under 16 clients on the 3-node bench cluster). A
thread still busy takes the calls handed over meanwhile off its inbox without
sleeping, so under load fewer calls wake it than when it was handed a batch at each
report.
"""

from __future__ import annotations

import contextlib
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

    The calls the thread finds waiting when it is free run together, and their results
    come back in one hop.
    """

    def __init__(self, reactor, name: str):
        self.name = name
        self._reactor = reactor
        # The thread's inbox: C-implemented, so handing a call over costs one put, not
        # the layers of a Twisted thread pool, and no wake-up while the thread is busy.
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

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
        self._inbox.put((f, args, d))
        return d

    def _serve(self) -> None:
        inbox = self._inbox
        while True:
            batch = [inbox.get()]
            with contextlib.suppress(queue.Empty):
                while batch[-1] is not _STOP:
                    batch.append(inbox.get_nowait())
            stopping = batch[-1] is _STOP
            if stopping:
                batch.pop()
            results = []
            for f, args, _ in batch:
                try:
                    results.append((True, f(*args)))
                except BaseException:
                    results.append((False, Failure()))
            if batch:
                self._reactor.callFromThread(self._report, batch, results)
            if stopping:
                return

    def _report(self, batch, results) -> None:
        for (_, _, d), (ok, value) in zip(batch, results, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(value)
