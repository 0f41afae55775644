"""``twistd timemachine`` options and service construction (no reactor run)."""

from twisted.application.service import IService
from twisted.python import usage
from twisted.trial import unittest

from timemachine.node import Node
from timemachine.tap import Options, makeService


def parse(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options


class OptionsTests(unittest.TestCase):
    def test_defaults_are_those_of_the_contract(self):
        options = parse()
        self.assertEqual(options["node-id"], "node1")
        self.assertEqual(options["data-dir"], "./timemachine-data/node1")
        self.assertEqual(options["http"], "tcp:8001:interface=127.0.0.1")
        self.assertEqual(options["peer"], "tcp:8101:interface=127.0.0.1")
        self.assertEqual(options["advertise"], "127.0.0.1:8101")
        self.assertEqual(options["shards"], 8)
        self.assertFalse(options["no-bootstrap"])
        self.assertEqual(options["retain-fired-ms"], 7 * 86_400_000)
        self.assertEqual(options["retain-failed-ms"], 30 * 86_400_000)
        self.assertEqual(options["wal-segment-bytes"], 64 * 1024 * 1024)
        self.assertEqual(options["compact-every"], 10_000)
        self.assertEqual(options["keep-entries"], 1000)

    def test_every_option_is_listed_in_help(self):
        text = str(Options())
        for name in ("--node-id", "--data-dir", "--http", "--peer", "--advertise", "--join",
                     "--shards", "--no-bootstrap", "--retain-fired", "--retain-failed",
                     "--wal-segment-bytes", "--compact-every", "--keep-entries"):
            self.assertIn(name, text)

    def test_data_dir_follows_node_id(self):
        self.assertEqual(parse("--node-id", "node2")["data-dir"], "./timemachine-data/node2")

    def test_bad_values_are_usage_errors(self):
        for argv in (
            ["--node-id", "bad id"],
            ["--shards", "0"],
            ["--shards", "many"],
            ["--http", "8001"],
            ["--advertise", "nowhere"],
            ["--join", "nowhere"],
            ["--wal-segment-bytes", "100"],
            ["--wal-segment-bytes", "1MiB"],
            ["--compact-every", "0"],
            ["--keep-entries", "-1"],
        ):
            self.assertRaises((usage.UsageError, ValueError), parse, *argv)

    def test_durations(self):
        for text, ms in (("0", 0), ("500ms", 500), ("90s", 90_000), ("15m", 900_000),
                         ("36h", 129_600_000), ("7d", 604_800_000), ("1.5s", 1500)):
            self.assertEqual(parse("--retain-fired", text)["retain-fired-ms"], ms)
        for bad in ("", "7", "-5s", "5 s", "5w", "s", "1e3s", "0s0"):
            with self.assertRaises(usage.UsageError) as caught:
                parse("--retain-failed", bad)
            self.assertIn("--retain-failed", str(caught.exception))
            self.assertIn("500ms, 90s", str(caught.exception))

    def test_storage_options_reach_the_node(self):
        options = parse("--data-dir", self.mktemp(), "--retain-fired", "5s",
                        "--retain-failed", "0", "--wal-segment-bytes", "1048576")
        node = makeService(options)
        self.assertEqual(node.wal_segment_bytes, 1048576)
        self.assertEqual(
            (node.retention.retain_fired_ms, node.retention.retain_failed_ms), (5000, 0)
        )

    def test_compaction_options_reach_the_node(self):
        options = parse("--data-dir", self.mktemp(), "--compact-every", "200",
                        "--keep-entries", "20")
        node = makeService(options)
        self.assertEqual(node.group_options, {"compact_every": 200})
        self.assertEqual(node.raft_log_options, {"keep_entries": 20})

    def test_peer_options_reach_the_node(self):
        options = parse("--data-dir", self.mktemp(), "--peer", "tcp:8103:interface=127.0.0.3",
                        "--join", "127.0.0.2:8001")
        node = makeService(options)
        self.assertEqual(node.peer_endpoint, "tcp:8103:interface=127.0.0.3")
        self.assertEqual(node.advertise, "127.0.0.3:8103")
        self.assertEqual(node.join_address, "127.0.0.2:8001")

    def test_make_service_builds_a_node_without_opening_anything(self):
        options = parse("--node-id", "n7", "--data-dir", self.mktemp(), "--shards", "3",
                        "--no-bootstrap")
        node = makeService(options)
        self.assertTrue(IService.providedBy(node))
        self.assertIsInstance(node, Node)
        self.assertEqual((node.node_id, node.initial_shards, node.bootstrap), ("n7", 3, False))
        self.assertIsNone(node.port)
