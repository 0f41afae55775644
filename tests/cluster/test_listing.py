"""Listing a collection across shards: pages merged by id, and a node's answer for
another node, bounded in bytes."""

from twisted.internet import defer
from twisted.trial import unittest

from tests.support import NodeTestCase
from timemachine._pb import timemachine_pb2 as pb
from timemachine.cluster import coordinator
from timemachine.cluster.coordinator import merge_pages
from timemachine.domain.codec import job_from_pb
from timemachine.domain.jobs import Job


def _jobs(*ids):
    return [Job("c", i, 1, "{}", "hook", 1) for i in ids]


def _ids(page):
    jobs, next_cursor = page
    return [job.id for job in jobs], next_cursor


class MergePagesTests(unittest.TestCase):
    def test_pages_merge_by_id_up_to_the_limit(self):
        pages = [(_jobs("a", "d"), None), (_jobs("b", "c", "e"), None)]
        self.assertEqual(_ids(merge_pages(pages, 10)), (["a", "b", "c", "d", "e"], None))
        self.assertEqual(_ids(merge_pages(pages, 3)), (["a", "b", "c"], "c"))

    def test_a_full_page_of_one_shard_goes_on_from_the_last_job_listed(self):
        pages = [(_jobs("a", "b"), "b"), (_jobs("c"), None)]
        self.assertEqual(_ids(merge_pages(pages, 2)), (["a", "b"], "b"))

    def test_a_page_cut_short_ends_the_merged_page_at_its_last_job(self):
        # The second shard's answer stopped at "b" (its bytes ran out), with "c" and
        # more unread: "d" of the first shard may not come before them.
        pages = [(_jobs("a", "d"), None), (_jobs("b"), "b")]
        self.assertEqual(_ids(merge_pages(pages, 10)), (["a", "b"], "b"))

    def test_no_pages_make_an_empty_last_page(self):
        self.assertEqual(_ids(merge_pages([], 5)), ([], None))


class ListedForAnotherNodeTests(NodeTestCase):
    @defer.inlineCallbacks
    def test_an_answer_stops_when_its_bytes_run_out_and_says_where(self):
        yield self.route()
        far = self.now_ms() + 3_600_000
        meta = {"pad": "x" * 1000}
        batch = [
            {"id": f"j{n:02}", "trigger_ms": far, "route": "hook", "meta": meta}
            for n in range(30)
        ]
        code, _ = yield self.call("POST", "/job/c", batch)
        self.assertEqual(code, 200)
        self.patch(coordinator, "LISTED_PAGE_BYTES", 10_000)
        shards = range(self.node.coordinator.ring.shards)
        ask = pb.ListJobs(collection="c", limit=25, shards=list(shards))
        page = yield self.node.coordinator._listed_to_us("node9", ask)
        listed = [job_from_pb(job) for job in page.jobs]
        self.assertEqual([job.id for job in listed], [f"j{n:02}" for n in range(len(listed))])
        self.assertLess(len(listed), 25)
        self.assertEqual(page.next_cursor, listed[-1].id)
        self.assertEqual(listed[0].meta, '{"pad": "' + "x" * 1000 + '"}')
        self.assertLessEqual(sum(len(job.meta) for job in listed), 10_000)
