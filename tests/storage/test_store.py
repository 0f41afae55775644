"""Tests for timemachine.storage.store: real SQLite files, the real reactor, the store's thread."""

import os
import shutil
import sqlite3
from dataclasses import replace

from sqlalchemy.dialects import sqlite as sqlite_dialect
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.commands import (
    Configure,
    DeleteJob,
    DeleteRoute,
    JobOutcome,
    JobVersion,
    MemberLeaving,
    OutcomeKind,
    PurgeJobs,
    PutJobs,
    PutMember,
    PutRoute,
    RemoveMember,
)
from timemachine.domain.errors import InvalidField, StorageError
from timemachine.domain.jobs import JobSpec, JobStatus, job_from_row
from timemachine.domain.routes import Route
from timemachine.interfaces import IClusterStore, IJobStore
from timemachine.storage.store import ClusterStore, VnodeStore, due_query


def spec(job_id, trigger_ms=1000, collection="orders", meta='{"n": 1}', route="billing"):
    return JobSpec(collection, job_id, trigger_ms, meta, route)


def put(*specs):
    return PutJobs(tuple(specs))


def outcome(kind, job_id, version, attempts=1, at_ms=5000, last_error=None, collection="orders"):
    return JobOutcome(kind, collection, job_id, version, attempts, at_ms, last_error)


def http_route(route_id="billing", url="http://127.0.0.1:4000/callback"):
    return Route(route_id, "http", webhook_url=url)


def set_meta(path, key, value):
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
    con.close()


class _StoreTestCase(unittest.TestCase):
    @inlineCallbacks
    def open_store(self, cls, path=None):
        store = cls(path or self.mktemp(), reactor)
        yield store.open()
        self.addCleanup(store.close)
        return store

    def vnode(self, path=None):
        return self.open_store(VnodeStore, path)

    def cluster(self, path=None):
        return self.open_store(ClusterStore, path)


class VnodeStoreTests(_StoreTestCase):
    @inlineCallbacks
    def test_interface(self):
        store = yield self.vnode()
        self.assertTrue(verifyObject(IJobStore, store))
        self.assertEqual(store.applied_index, 0)

    def test_constructor_does_no_io(self):
        path = self.mktemp()
        VnodeStore(path, reactor)
        self.assertFalse(os.path.exists(path))

    @inlineCallbacks
    def test_put_and_get(self):
        store = yield self.vnode()
        [jobs] = yield store.apply([(1, put(spec("a", trigger_ms=1234)))])
        [job] = jobs
        self.assertEqual(
            (job.collection, job.id, job.trigger_ms, job.meta, job.route),
            ("orders", "a", 1234, '{"n": 1}', "billing"),
        )
        self.assertEqual(job.version, 1)
        self.assertEqual(job.status, JobStatus.SCHEDULED)
        self.assertEqual(
            (job.due_ms, job.attempts, job.last_error, job.fired_at_ms), (1234, 0, None, None)
        )
        self.assertEqual((yield store.get("orders", "a")), job)
        self.assertIsNone((yield store.get("orders", "missing")))
        self.assertIsNone((yield store.get("other", "a")))
        self.assertEqual(store.applied_index, 1)

    @inlineCallbacks
    def test_replace_starts_a_new_version(self):
        store = yield self.vnode()
        yield store.apply(
            [
                (1, put(spec("a", trigger_ms=1000), spec("b", trigger_ms=1000))),
                (2, outcome(OutcomeKind.RETRY, "a", 1, attempts=2, at_ms=3000, last_error="503")),
                (3, outcome(OutcomeKind.FIRED, "b", 1, attempts=1, at_ms=1001)),
            ]
        )
        [jobs] = yield store.apply(
            [
                (4, put(spec("a", trigger_ms=9000, meta="[1]"), spec("b", trigger_ms=8000))),
            ]
        )
        a = yield store.get("orders", "a")
        b = yield store.get("orders", "b")
        self.assertEqual([a, b], jobs)
        self.assertEqual(
            (a.version, a.status, a.trigger_ms, a.due_ms, a.meta),
            (4, JobStatus.SCHEDULED, 9000, 9000, "[1]"),
        )
        self.assertEqual((a.attempts, a.last_error, a.fired_at_ms), (0, None, None))
        self.assertEqual(
            (b.version, b.status, b.due_ms, b.attempts, b.fired_at_ms),
            (4, JobStatus.SCHEDULED, 8000, 0, None),
        )

    @inlineCallbacks
    def test_batch_of_500(self):
        store = yield self.vnode()
        specs = [spec(f"job-{i:04d}", trigger_ms=10_000 + i) for i in range(500)]
        [jobs] = yield store.apply([(7, put(*specs))])
        self.assertEqual([j.id for j in jobs], [s.id for s in specs])
        self.assertEqual({j.version for j in jobs}, {7})
        self.assertEqual((yield store.count()), 500)
        job = yield store.get("orders", "job-0321")
        self.assertEqual((job.trigger_ms, job.version), (10_321, 7))

    @inlineCallbacks
    def test_same_key_twice_in_one_put_later_wins(self):
        store = yield self.vnode()
        [jobs] = yield store.apply(
            [
                (1, put(spec("a", trigger_ms=1000), spec("b"), spec("a", trigger_ms=2000))),
            ]
        )
        self.assertEqual([j.id for j in jobs], ["a", "b", "a"])
        self.assertEqual((yield store.get("orders", "a")).trigger_ms, 2000)
        self.assertEqual((yield store.count()), 2)

    @inlineCallbacks
    def test_delete(self):
        store = yield self.vnode()
        results = yield store.apply(
            [
                (1, put(spec("a"))),
                (2, DeleteJob("orders", "a")),
                (3, DeleteJob("orders", "a")),
                (4, DeleteJob("orders", "never")),
            ]
        )
        self.assertEqual(results[1:], [True, False, False])
        self.assertIsNone((yield store.get("orders", "a")))
        self.assertEqual((yield store.count()), 0)

    @inlineCallbacks
    def test_outcome_fired(self):
        store = yield self.vnode()
        yield store.apply([(1, put(spec("a")))])
        [job] = yield store.apply([(2, outcome(OutcomeKind.FIRED, "a", 1, attempts=1, at_ms=1003))])
        self.assertEqual(
            (job.status, job.fired_at_ms, job.attempts, job.version), (JobStatus.FIRED, 1003, 1, 1)
        )
        self.assertEqual((yield store.get("orders", "a")), job)
        # A second outcome of a finished job (e.g. a repeated delivery) changes nothing.
        results = yield store.apply(
            [
                (3, outcome(OutcomeKind.FIRED, "a", 1, attempts=2, at_ms=2000)),
                (4, outcome(OutcomeKind.RETRY, "a", 1, attempts=2, at_ms=2000)),
                (5, outcome(OutcomeKind.FAILED, "a", 1, attempts=2, last_error="x")),
            ]
        )
        self.assertEqual(results, [None, None, None])
        self.assertEqual((yield store.get("orders", "a")), job)

    @inlineCallbacks
    def test_outcome_retry(self):
        store = yield self.vnode()
        yield store.apply([(1, put(spec("a", trigger_ms=1000)))])
        [job] = yield store.apply(
            [
                (2, outcome(OutcomeKind.RETRY, "a", 1, attempts=1, at_ms=1500, last_error="503")),
            ]
        )
        self.assertEqual(
            (job.status, job.due_ms, job.trigger_ms, job.attempts, job.last_error),
            (JobStatus.SCHEDULED, 1500, 1000, 1, "503"),
        )
        self.assertIsNone(job.fired_at_ms)
        # Still scheduled, so the next attempt's outcome applies.
        [job] = yield store.apply([(3, outcome(OutcomeKind.FIRED, "a", 1, attempts=2, at_ms=1501))])
        self.assertEqual((job.status, job.attempts, job.fired_at_ms), (JobStatus.FIRED, 2, 1501))

    @inlineCallbacks
    def test_outcome_failed(self):
        store = yield self.vnode()
        yield store.apply([(1, put(spec("a", trigger_ms=1000)))])
        [job] = yield store.apply(
            [
                (2, outcome(OutcomeKind.FAILED, "a", 1, attempts=10, at_ms=9000, last_error="404")),
            ]
        )
        self.assertEqual(
            (job.status, job.attempts, job.last_error, job.fired_at_ms),
            (JobStatus.FAILED, 10, "404", None),
        )
        self.assertEqual((yield store.get("orders", "a")), job)

    @inlineCallbacks
    def test_outcome_of_stale_version_ignored(self):
        store = yield self.vnode()
        yield store.apply([(1, put(spec("a"))), (2, put(spec("a", trigger_ms=5000)))])
        before = yield store.get("orders", "a")
        results = yield store.apply(
            [
                (3, outcome(OutcomeKind.FIRED, "a", 1)),
                (4, outcome(OutcomeKind.RETRY, "a", 1, last_error="x")),
                (5, outcome(OutcomeKind.FAILED, "a", 1, last_error="x")),
                (6, outcome(OutcomeKind.FIRED, "absent", 1)),
            ]
        )
        self.assertEqual(results, [None, None, None, None])
        self.assertEqual((yield store.get("orders", "a")), before)
        self.assertEqual(store.applied_index, 6)

    @inlineCallbacks
    def test_unknown_command_is_a_programming_error(self):
        store = yield self.vnode()
        yield self.assertFailure(store.apply([(1, PutRoute(http_route()))]), ValueError)
        self.assertEqual(store.applied_index, 0)

    @inlineCallbacks
    def test_due_order_limit_and_boundary(self):
        store = yield self.vnode()
        yield store.apply(
            [
                (
                    1,
                    put(
                        spec("t30", trigger_ms=30),
                        spec("t10", trigger_ms=10),
                        spec("t20", trigger_ms=20),
                        spec("t40", trigger_ms=40),
                        spec("fired", trigger_ms=5),
                        spec("failed", trigger_ms=6),
                        spec("other-coll", trigger_ms=15, collection="carts"),
                    ),
                )
            ]
        )
        yield store.apply(
            [
                (2, outcome(OutcomeKind.FIRED, "fired", 1)),
                (3, outcome(OutcomeKind.FAILED, "failed", 1, last_error="x")),
            ]
        )
        due = yield store.due(30, 100)
        # Rows, in Job's field order.
        for row in due:
            self.assertEqual(job_from_row(row), (yield store.get(*row[:2])))

        def ids(rows):
            return [job_from_row(row).id for row in rows]

        # Strictly before before_ms; every collection; only scheduled jobs.
        self.assertEqual(ids(due), ["t10", "other-coll", "t20"])
        self.assertEqual(ids((yield store.due(31, 2))), ["t10", "other-coll"])
        self.assertEqual((yield store.due(10, 100)), [])
        self.assertEqual(ids((yield store.due(31, 100, from_ms=20))), ["t20", "t30"])
        # A retry moves the job in the order.
        yield store.apply([(4, outcome(OutcomeKind.RETRY, "t10", 1, at_ms=35))])
        self.assertEqual(
            ids((yield store.due(100, 100))), ["other-coll", "t20", "t30", "t10", "t40"]
        )

    @inlineCallbacks
    def test_due_uses_the_status_due_index(self):
        store = yield self.vnode()
        yield store.apply([(1, put(*(spec(f"j{i}", trigger_ms=i) for i in range(50))))])
        sql = str(
            due_query(25, 10).compile(
                dialect=sqlite_dialect.dialect(), compile_kwargs={"literal_binds": True}
            )
        )
        # A second connection reads the WAL-mode file alongside the store's own.
        con = sqlite3.connect(store.path)
        try:
            plan = " | ".join(row[-1] for row in con.execute("EXPLAIN QUERY PLAN " + sql))
        finally:
            con.close()
        self.assertIn("USING INDEX ix_jobs_status_due (status=? AND due_ms>? AND due_ms<?)", plan)
        self.assertNotIn("TEMP B-TREE", plan)

    @inlineCallbacks
    def test_list_jobs_paging_and_status(self):
        store = yield self.vnode()
        ids = [f"j{i:02d}" for i in range(7)]
        yield store.apply(
            [(1, put(*(spec(i) for i in reversed(ids)), spec("x", collection="carts")))]
        )
        yield store.apply(
            [
                (2, outcome(OutcomeKind.FAILED, "j01", 1, last_error="e")),
                (3, outcome(OutcomeKind.FAILED, "j04", 1, last_error="e")),
                (4, outcome(OutcomeKind.FAILED, "j05", 1, last_error="e")),
            ]
        )
        pages, cursor = [], None
        while True:
            jobs, cursor = yield store.list_jobs("orders", None, 3, cursor)
            pages.append([j.id for j in jobs])
            if cursor is None:
                break
        self.assertEqual(pages, [ids[0:3], ids[3:6], ids[6:]])

        jobs, cursor = yield store.list_jobs("orders", JobStatus.FAILED, 2, None)
        self.assertEqual(([j.id for j in jobs], cursor), (["j01", "j04"], "j04"))
        jobs, cursor = yield store.list_jobs("orders", "failed", 2, cursor)
        self.assertEqual(([j.id for j in jobs], cursor), (["j05"], None))

        # Exactly a full last page: no further cursor.
        jobs, cursor = yield store.list_jobs("orders", "scheduled", 4, None)
        self.assertEqual(([j.id for j in jobs], cursor), (["j00", "j02", "j03", "j06"], None))
        self.assertEqual((yield store.list_jobs("nothing", None, 10, None)), ([], None))

    @inlineCallbacks
    def test_bad_status_or_limit_is_the_clients_error(self):
        store = yield self.vnode()
        yield self.assertFailure(store.list_jobs("orders", "bogus", 10, None), InvalidField)
        yield self.assertFailure(store.list_jobs("orders", None, 0, None), InvalidField)
        yield self.assertFailure(store.count("bogus"), InvalidField)

    @inlineCallbacks
    def test_count(self):
        store = yield self.vnode()
        self.assertEqual((yield store.count()), 0)
        yield store.apply([(1, put(spec("a"), spec("b"), spec("c"), spec("d", collection="x")))])
        yield store.apply(
            [(2, outcome(OutcomeKind.FIRED, "a", 1)), (3, outcome(OutcomeKind.FAILED, "b", 1))]
        )
        self.assertEqual((yield store.count()), 4)
        self.assertEqual((yield store.count(None)), 4)
        self.assertEqual((yield store.count(JobStatus.SCHEDULED)), 2)
        self.assertEqual((yield store.count("fired")), 1)
        self.assertEqual((yield store.count(JobStatus.FAILED)), 1)

    @inlineCallbacks
    def test_applied_index_persists_and_replay_is_a_no_op(self):
        path = self.mktemp()
        store = VnodeStore(path, reactor)
        yield store.open()
        yield store.apply([(1, put(spec("a"))), (2, put(spec("b"))), (3, DeleteJob("orders", "a"))])
        yield store.close()

        store = yield self.vnode(path)
        self.assertEqual(store.applied_index, 3)
        # Replaying the log from the start after a crash: everything at or below 3 is
        # skipped, so "a" stays deleted and "b" keeps its version.
        results = yield store.apply(
            [
                (1, put(spec("a"))),
                (2, put(spec("b", trigger_ms=7))),
                (3, DeleteJob("orders", "a")),
                (4, put(spec("c"))),
            ]
        )
        self.assertEqual(results[:3], [None, None, None])
        self.assertEqual([j.id for j in results[3]], ["c"])
        self.assertIsNone((yield store.get("orders", "a")))
        self.assertEqual((yield store.get("orders", "b")).version, 2)
        self.assertEqual(store.applied_index, 4)
        # A batch that is wholly old changes nothing, applied_index included.
        self.assertEqual((yield store.apply([(2, DeleteJob("orders", "b"))])), [None])
        self.assertEqual(store.applied_index, 4)
        self.assertIsNotNone((yield store.get("orders", "b")))

    @inlineCallbacks
    def test_back_to_back_batches_skip_by_the_committed_index(self):
        store = yield self.vnode()
        # Issued before either fires: the second must see the first's index.
        first = store.apply([(1, put(spec("a")))])
        second = store.apply([(1, DeleteJob("orders", "a")), (2, put(spec("b")))])
        self.assertEqual(len((yield first)[0]), 1)
        self.assertEqual((yield second)[0], None)
        self.assertIsNotNone((yield store.get("orders", "a")))
        self.assertEqual(store.applied_index, 2)

    @inlineCallbacks
    def test_failed_batch_changes_nothing(self):
        path = self.mktemp()
        store = VnodeStore(path, reactor)
        yield store.open()
        yield store.apply([(1, put(spec("a")))])
        bad = [(2, put(spec("b"))), (3, DeleteJob("orders", "a")), (4, Configure(1, 1))]
        yield self.assertFailure(store.apply(bad), ValueError)
        self.assertEqual(store.applied_index, 1)
        self.assertIsNone((yield store.get("orders", "b")))
        self.assertIsNotNone((yield store.get("orders", "a")))
        yield store.close()

        store = yield self.vnode(path)
        self.assertEqual(store.applied_index, 1)
        self.assertIsNone((yield store.get("orders", "b")))
        # The entries were not counted as applied: the good part applies once retried.
        results = yield store.apply(bad[:2])
        self.assertEqual(results[1], True)
        self.assertEqual(store.applied_index, 3)

    @inlineCallbacks
    def test_unknown_schema_version_refused(self):
        path = self.mktemp()
        store = VnodeStore(path, reactor)
        yield store.open()
        yield store.close()
        set_meta(path, "schema_version", "999")
        store = VnodeStore(path, reactor)
        failure = yield self.assertFailure(store.open(), StorageError)
        self.assertIn("schema version", str(failure))
        # Refusing leaves nothing running; the next call says the store is closed.
        yield self.assertFailure(store.get("orders", "a"), StorageError)
        yield store.close()

    @inlineCallbacks
    def test_other_kinds_of_file_refused(self):
        cluster_path = self.mktemp()
        cluster = ClusterStore(cluster_path, reactor)
        yield cluster.open()
        yield cluster.close()
        yield self.assertFailure(VnodeStore(cluster_path, reactor).open(), StorageError)

        garbage = self.mktemp()
        with open(garbage, "wb") as f:
            f.write(b"not a database at all" * 100)
        yield self.assertFailure(VnodeStore(garbage, reactor).open(), StorageError)

        foreign = self.mktemp()
        con = sqlite3.connect(foreign)
        con.execute("CREATE TABLE things (x)")
        con.close()
        yield self.assertFailure(VnodeStore(foreign, reactor).open(), StorageError)

    @inlineCallbacks
    def test_snapshot_and_restore(self):
        source = yield self.vnode()
        yield source.apply(
            [
                (1, put(*(spec(f"j{i}", trigger_ms=100 + i) for i in range(20)))),
                (2, outcome(OutcomeKind.FIRED, "j3", 1, at_ms=104)),
                (3, outcome(OutcomeKind.FAILED, "j4", 1, last_error="gone")),
                (4, DeleteJob("orders", "j5")),
            ]
        )
        snapshot = self.mktemp()
        yield source.snapshot(snapshot)
        # Later changes are not in the copy.
        yield source.apply([(5, put(spec("late")))])

        target_path = self.mktemp()
        target = yield self.vnode(target_path)
        yield target.apply([(1, put(spec("mine"))), (2, put(spec("j0", trigger_ms=1)))])
        yield target.restore(snapshot)
        self.assertEqual(target.applied_index, 4)
        expected, _ = yield source.list_jobs("orders", None, 100, None)
        expected = [j for j in expected if j.id != "late"]
        self.assertEqual((yield target.list_jobs("orders", None, 100, None)), (expected, None))
        self.assertEqual((yield target.count()), 19)
        # The restored store goes on from the snapshot's index, and survives a reopen.
        self.assertEqual((yield target.apply([(4, put(spec("x"))), (5, put(spec("y")))]))[0], None)
        yield target.close()
        target = yield self.vnode(target_path)
        self.assertEqual(target.applied_index, 5)
        self.assertEqual((yield target.count()), 20)
        self.assertIsNone((yield target.get("orders", "mine")))

    @inlineCallbacks
    def test_restore_refuses_a_foreign_snapshot(self):
        cluster = yield self.cluster()
        snapshot = self.mktemp()
        yield cluster.snapshot(snapshot)
        store = yield self.vnode()
        yield store.apply([(1, put(spec("a")))])
        yield self.assertFailure(store.restore(snapshot), StorageError)
        yield self.assertFailure(store.restore(self.mktemp()), StorageError)
        self.assertEqual(store.applied_index, 1)
        self.assertIsNotNone((yield store.get("orders", "a")))

    @inlineCallbacks
    def test_checkpoint_makes_the_applied_index_durable_in_the_database_file(self):
        """After checkpoint() the database file alone (no -wal beside it, as a power
        cut can leave a file whose -wal was never synced) holds every applied entry."""
        path = self.mktemp()
        store = yield self.vnode(path)
        yield store.apply([(1, put(spec("a"))), (2, put(spec("b"))), (3, DeleteJob("orders", "a"))])
        self.assertEqual((yield store.checkpoint()), 3)
        self.assertEqual(os.path.getsize(path + "-wal"), 0)
        copy = self.mktemp()
        shutil.copyfile(path, copy)
        con = sqlite3.connect(copy)
        try:
            applied = con.execute("SELECT value FROM meta WHERE key = 'applied_index'").fetchone()
            ids = [row[0] for row in con.execute("SELECT id FROM jobs")]
        finally:
            con.close()
        self.assertEqual((applied, ids), (("3",), ["b"]))

    @inlineCallbacks
    def test_disk_bytes_counts_the_database_and_its_wal(self):
        path = self.mktemp()
        store = yield self.vnode(path)
        yield store.apply([(1, put(*(spec(f"j{i}") for i in range(200))))])
        files = sum(os.path.getsize(path + s) for s in ("", "-wal", "-shm"))
        self.assertEqual((yield store.disk_bytes()), files)
        self.assertGreater(os.path.getsize(path + "-wal"), 0)

    @inlineCallbacks
    def test_purge_removes_finished_jobs_at_their_version_only(self):
        store = yield self.vnode()
        yield store.apply(
            [
                (1, put(spec("fired"), spec("failed"), spec("replaced"), spec("scheduled"))),
                (2, outcome(OutcomeKind.FIRED, "fired", 1)),
                (3, outcome(OutcomeKind.FAILED, "failed", 1, last_error="404")),
                (4, outcome(OutcomeKind.FIRED, "replaced", 1)),
                (5, put(spec("replaced", trigger_ms=9000))),
            ]
        )
        names = [JobVersion("orders", n, 1) for n in ("fired", "failed", "replaced", "scheduled")]
        [purged] = yield store.apply([(6, PurgeJobs((*names, JobVersion("orders", "absent", 1))))])
        self.assertEqual(purged, 2)
        self.assertIsNone((yield store.get("orders", "fired")))
        self.assertIsNone((yield store.get("orders", "failed")))
        self.assertEqual((yield store.get("orders", "replaced")).version, 5)
        self.assertEqual((yield store.get("orders", "scheduled")).status, JobStatus.SCHEDULED)

    @inlineCallbacks
    def test_expired_picks_finished_jobs_past_their_retention(self):
        store = yield self.vnode()
        yield store.apply(
            [
                (1, put(*(spec(n, trigger_ms=1000) for n in ("f1", "f2", "late", "x1", "s")))),
                (2, outcome(OutcomeKind.FIRED, "f1", 1, at_ms=1001)),
                (3, outcome(OutcomeKind.FIRED, "f2", 1, at_ms=1002)),
                # Due at 1000 but delivered much later: it is kept from its delivery.
                (4, outcome(OutcomeKind.FIRED, "late", 1, at_ms=50_000)),
                (5, outcome(OutcomeKind.RETRY, "x1", 1, at_ms=3000, last_error="503")),
                (6, outcome(OutcomeKind.FAILED, "x1", 1, attempts=2, at_ms=3100)),
            ]
        )
        self.assertEqual(
            (yield store.expired(2000, None, 10)),
            [JobVersion("orders", "f1", 1), JobVersion("orders", "f2", 1)],
        )
        self.assertEqual((yield store.expired(1001, None, 10)), [JobVersion("orders", "f1", 1)])
        self.assertEqual((yield store.expired(2000, None, 1)), [JobVersion("orders", "f1", 1)])
        # A failed job counts from its last due time (the retry at 3000).
        self.assertEqual((yield store.expired(None, 2999, 10)), [])
        self.assertEqual((yield store.expired(None, 3000, 10)), [JobVersion("orders", "x1", 1)])
        self.assertEqual(
            [j.id for j in (yield store.expired(60_000, 60_000, 10))], ["f1", "f2", "late", "x1"]
        )
        self.assertEqual(
            [j.id for j in (yield store.expired(60_000, 60_000, 3))], ["f1", "f2", "late"]
        )

    @inlineCallbacks
    def test_closed_store(self):
        store = yield self.vnode()
        yield store.close()
        yield store.close()
        yield self.assertFailure(store.get("orders", "a"), StorageError)
        yield self.assertFailure(store.apply([(1, put(spec("a")))]), StorageError)


class ClusterStoreTests(_StoreTestCase):
    @inlineCallbacks
    def test_interface(self):
        store = yield self.cluster()
        self.assertTrue(verifyObject(IClusterStore, store))
        self.assertEqual((store.applied_index, store.config, store.routes()), (0, None, []))

    @inlineCallbacks
    def test_apply_results_and_memory_view(self):
        store = yield self.cluster()
        billing = http_route("billing")
        events = Route(
            "events",
            "redis",
            redis_url="redis://127.0.0.1:6379/0",
            key="tm:events",
            mode="lpush",
            max_attempts=3,
        )
        config = Configure(2, 1, (("node1",), ("node1",)))
        d = store.apply([(1, PutRoute(events)), (2, PutRoute(billing)), (3, config)])
        # Nothing shows before the commit has come back to the reactor.
        self.assertIsNone(store.route("events"))
        self.assertIsNone(store.config)
        # A new shard map is stamped with the index it was applied at.
        config = replace(config, map_index=3)
        self.assertEqual((yield d), [events, billing, config])
        self.assertEqual(store.routes(), [billing, events])
        self.assertEqual(store.route("events"), events)
        self.assertEqual(store.config, config)
        self.assertEqual(store.applied_index, 3)

        replaced = http_route("billing", url="http://127.0.0.1:5000/hook")
        results = yield store.apply(
            [
                (4, PutRoute(replaced)),
                (5, DeleteRoute("events")),
                (6, DeleteRoute("events")),
                (7, Configure(2, 3)),
            ]
        )
        remade = Configure(2, 3, map_index=7)
        self.assertEqual(results, [replaced, True, False, remade])
        self.assertEqual(store.routes(), [replaced])
        self.assertIsNone(store.route("events"))
        self.assertEqual(store.config, remade)

    @inlineCallbacks
    def test_members_are_kept_and_reloaded(self):
        path = self.mktemp()
        store = yield self.cluster(path)
        node2 = PutMember("node2", "127.0.0.2:8102", "127.0.0.2:8002")
        results = yield store.apply(
            [
                (1, PutMember("node1", "127.0.0.1:8101", "127.0.0.1:8001")),
                (2, node2),
                (3, PutMember("node1", "127.0.0.9:8101", "127.0.0.9:8001")),
                (4, RemoveMember("node3")),
            ]
        )
        self.assertEqual(results[-1], False)
        self.assertEqual([m.node_id for m in store.members()], ["node1", "node2"])
        self.assertEqual(store.member("node1").peer_address, "127.0.0.9:8101")
        yield store.apply([(5, RemoveMember("node1"))])
        self.assertIsNone(store.member("node1"))
        yield store.close()
        reopened = yield self.cluster(path)
        self.assertEqual(reopened.members(), [node2])

    @inlineCallbacks
    def test_a_members_incarnation_stays_until_another_is_recorded_or_it_is_removed(self):
        path = self.mktemp()
        store = yield self.cluster(path)
        first = PutMember("node2", "127.0.0.2:8102", "127.0.0.2:8002", "aa" * 16)
        moved = PutMember("node2", "127.0.0.9:8102", "127.0.0.9:8002")
        yield store.apply([(1, first), (2, moved)])
        # A move (or a build that sends none) leaves the recorded incarnation as it is.
        kept = replace(moved, incarnation="aa" * 16)
        self.assertEqual(store.member("node2"), kept)
        yield store.close()
        store = yield self.cluster(path)
        self.assertEqual(store.members(), [kept])
        yield store.apply([(3, replace(moved, incarnation="bb" * 16))])
        self.assertEqual(store.member("node2").incarnation, "bb" * 16)
        # Removed and joined again: recorded anew.
        yield store.apply([(4, RemoveMember("node2")), (5, moved)])
        self.assertEqual(store.member("node2"), moved)
        yield store.close()
        store = yield self.cluster(path)
        self.assertEqual(store.members(), [moved])

    @inlineCallbacks
    def test_members_being_removed_are_kept_and_reloaded(self):
        path = self.mktemp()
        store = yield self.cluster(path)
        members = [PutMember(f"node{n}", f"127.0.0.{n}:8101") for n in (1, 2, 3)]
        results = yield store.apply(
            [*enumerate(members, 1), (4, MemberLeaving("node2")), (5, MemberLeaving("node3")),
             (6, MemberLeaving("node3"))]
        )
        self.assertEqual(
            results[3:], [MemberLeaving("node2"), MemberLeaving("node3"), MemberLeaving("node3")]
        )
        self.assertEqual(store.leaving(), {"node2", "node3"})
        self.assertEqual(store.staying(), ["node1"])
        # Joined again: no longer leaving. Removed: gone from both.
        yield store.apply([(7, MemberLeaving("node2", leaving=False)), (8, RemoveMember("node3"))])
        self.assertEqual((store.leaving(), store.staying()), (frozenset(), ["node1", "node2"]))
        yield store.apply([(9, MemberLeaving("node1"))])
        yield store.close()
        reopened = yield self.cluster(path)
        self.assertEqual((reopened.leaving(), reopened.staying()), ({"node1"}, ["node2"]))

    @inlineCallbacks
    def test_a_file_made_before_members_existed_opens(self):
        path = self.mktemp()
        store = yield self.cluster(path)
        yield store.apply([(1, PutRoute(http_route()))])
        yield store.close()
        with sqlite3.connect(path) as db:
            db.execute("DROP TABLE members")
        reopened = yield self.cluster(path)
        self.assertEqual(reopened.members(), [])
        self.assertEqual([r.id for r in reopened.routes()], ["billing"])
        yield reopened.apply([(2, PutMember("node1", "127.0.0.1:8101"))])
        self.assertEqual(len(reopened.members()), 1)

    @inlineCallbacks
    def test_persists_and_reloads(self):
        path = self.mktemp()
        store = ClusterStore(path, reactor)
        yield store.open()
        events = Route("events", "redis", redis_url="redis://127.0.0.1:6379/0", key="tm:events")
        config = Configure(3, 2, (("a", "b"), ("b", "c"), ("c", "a")))
        yield store.apply(
            [
                (1, PutRoute(http_route())),
                (2, PutRoute(events)),
                (3, DeleteRoute("billing")),
                (4, config),
            ]
        )
        yield store.close()

        store = yield self.cluster(path)
        self.assertEqual(store.applied_index, 4)
        self.assertEqual(store.routes(), [events])
        self.assertEqual(store.config, replace(config, map_index=4))
        # Replay of old entries is skipped here too.
        self.assertEqual((yield store.apply([(1, PutRoute(http_route()))])), [None])
        self.assertIsNone(store.route("billing"))

    @inlineCallbacks
    def test_a_moved_shard_map_keeps_its_origin(self):
        path = self.mktemp()
        store = ClusterStore(path, reactor)
        yield store.open()
        first = Configure(2, 1, (("a",), ("b",)), map_index=1)
        moved = first.moved_to(2, (("a", "b"), ("b", "a")))
        self.assertEqual(moved.map_index, 1)
        self.assertEqual(moved.origin, first.placement)
        self.assertEqual(moved.first_replicas(1), ("b",))
        # A second move keeps the map's first placement.
        self.assertEqual(moved.moved_to(1, (("b",), ("a",))).origin, first.placement)
        yield store.apply([(1, replace(first, map_index=0))])
        self.assertEqual(store.config, first)
        yield store.apply([(2, moved)])
        yield store.close()
        store = yield self.cluster(path)
        self.assertEqual(store.config, moved)

    @inlineCallbacks
    def test_failed_batch_changes_nothing(self):
        store = yield self.cluster()
        d = store.apply([(1, PutRoute(http_route())), (2, put(spec("a")))])
        yield self.assertFailure(d, ValueError)
        self.assertEqual((store.applied_index, store.routes()), (0, []))
        yield store.close()
        store = yield self.cluster(store.path)
        self.assertEqual((store.applied_index, store.routes()), (0, []))

    @inlineCallbacks
    def test_snapshot_and_restore(self):
        source = yield self.cluster()
        config = Configure(1, 1, (("node1",),))
        member = PutMember("node1", "127.0.0.1:8101", "127.0.0.1:8001", "ab" * 16)
        leaving = PutMember("node2", "127.0.0.2:8101", "127.0.0.2:8001")
        yield source.apply(
            [(1, PutRoute(http_route())), (2, config), (3, member), (4, leaving),
             (5, MemberLeaving("node2"))]
        )
        config = replace(config, map_index=2)
        snapshot = self.mktemp()
        self.assertEqual((yield source.snapshot(snapshot)), 5)
        # The meta state as protobuf: the commands that rebuild it.
        with open(snapshot, "rb") as f:
            message = pb.ClusterSnapshot.FromString(f.read())
        self.assertEqual(message.applied_index, 5)
        self.assertEqual(len(message.commands), 5)
        target = yield self.cluster()
        yield target.apply(
            [(1, PutRoute(http_route("other"))), (2, PutMember("x", "h:1")),
             (3, MemberLeaving("x"))]
        )
        yield target.restore(snapshot)
        expected = (5, [http_route()], config, [member, leaving], {"node2"})

        def state(store):
            return (store.applied_index, store.routes(), store.config, store.members(),
                    store.leaving())

        self.assertEqual(state(target), expected)
        yield target.close()
        target = yield self.cluster(target.path)
        self.assertEqual(state(target), expected)

    @inlineCallbacks
    def test_restore_refuses_a_damaged_snapshot_and_takes_a_database_copy(self):
        source = yield self.cluster()
        yield source.apply([(1, PutRoute(http_route()))])
        target = yield self.cluster()
        yield target.apply([(1, PutRoute(http_route("other")))])
        damaged = self.mktemp()
        with open(damaged, "wb") as f:
            f.write(b"\xff\xff not a snapshot")
        yield self.assertFailure(target.restore(damaged), StorageError)
        self.assertEqual((target.applied_index, target.routes()), (1, [http_route("other")]))
        # What an earlier build sent: a copy of its database file.
        yield source.close()
        yield target.restore(source.path)
        self.assertEqual((target.applied_index, target.routes()), (1, [http_route()]))

    @inlineCallbacks
    def test_unknown_schema_version_refused(self):
        path = self.mktemp()
        store = ClusterStore(path, reactor)
        yield store.open()
        yield store.close()
        set_meta(path, "schema_version", "0")
        yield self.assertFailure(ClusterStore(path, reactor).open(), StorageError)
