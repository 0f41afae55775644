"""The shared blocking-call thread: order, errors and batching of calls."""

import threading
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from timemachine.storage.iothread import IOThread


class IOThreadTests(unittest.TestCase):
    def setUp(self):
        self.io = IOThread(reactor, "test-io")
        self.io.start()
        self.addCleanup(self.io.stop)

    @defer.inlineCallbacks
    def test_results_and_errors_come_back_in_order(self):
        seen = []

        def boom():
            raise OSError("disk on fire")

        first = self.io.call(seen.append, 1)
        failing = self.io.call(boom)
        last = self.io.call(lambda: seen.append(2) or "done")
        self.assertIsNone((yield first))
        yield self.assertFailure(failing, OSError)
        self.assertEqual((yield last), "done")
        self.assertEqual(seen, [1, 2])

    @defer.inlineCallbacks
    def test_calls_made_while_busy_come_back_together_in_one_hop(self):
        release = threading.Event()
        hops = []
        report = self.io._report
        self.io._report = lambda batch, results: hops.append(len(batch)) or report(
            batch, results
        )
        started = threading.Event()
        busy = self.io.call(lambda: started.set() or release.wait(10))
        self.assertTrue(started.wait(10))
        queued = [self.io.call(lambda i=i: (i, threading.get_ident())) for i in range(5)]
        release.set()
        self.assertTrue((yield busy))
        results = yield defer.gatherResults(queued)
        self.assertEqual([i for i, _ in results], list(range(5)))
        threads = {ident for _, ident in results}
        self.assertEqual(len(threads), 1)
        self.assertNotEqual(threads, {threading.get_ident()})
        self.assertEqual(hops, [1, 5])

    def test_a_stopped_thread_refuses_calls(self):
        self.io.stop()
        self.failureResultOf(self.io.call(lambda: None), RuntimeError)

    def test_stop_runs_the_calls_already_handed_over_first(self):
        ran = []
        self.io.call(lambda: time.sleep(0.05) or ran.append("slow"))
        self.io.stop()
        self.assertEqual(ran, ["slow"])
        self.assertFalse(self.io.running)

    def test_the_thread_carries_the_name_given(self):
        names = []
        d = self.io.call(lambda: names.append(threading.current_thread().name))
        return d.addCallback(lambda _: self.assertEqual(names, ["test-io"]))
