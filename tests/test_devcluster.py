"""The options of ``timemachine dev-cluster``: what cannot make a cluster is refused
before anything starts (exit status 2, the reason on stderr)."""

import io
import sys

from twisted.trial import unittest

from timemachine import cli


class DevClusterOptionsTests(unittest.TestCase):
    def refused(self, *argv):
        """The usage error ``timemachine dev-cluster *argv`` exits with."""
        err = io.StringIO()
        self.patch(sys, "stderr", err)
        with self.assertRaises(SystemExit) as caught:
            # Not cli.main: with a check broken it would start the cluster.
            args = cli._parser().parse_args(["dev-cluster", *argv])
            cli.devcluster.check_arguments(args.command_parser, args)
        self.assertEqual(caught.exception.code, 2)
        return err.getvalue().strip().splitlines()[-1]

    def test_bad_options_are_refused_with_the_reason(self):
        for argv, reason in [
            (["0"], "N must be between 1 and 254 (node i listens on 127.0.0.i)"),
            (["255"], "N must be between 1 and 254 (node i listens on 127.0.0.i)"),
            (["three"], "argument N: invalid int value: 'three'"),
            (["2", "--replicas", "3"], "--replicas must be between 1 and N (2)"),
            (["2", "--replicas", "0"], "--replicas must be between 1 and N (2)"),
            (["3", "--shards", "0"], "--shards must be between 1 and 4096"),
            (["3", "--http-base", "65533"], "--http-base + N must be a port (at most 65535)"),
            (["3", "--peer-base", "-1"], "--peer-base + N must be a port (at most 65535)"),
            (["3", "--http-base", "8000", "--peer-base", "8002"],
             "--http-base and --peer-base give two nodes' ports the same number"),
            (["3", "--start-timeout", "0"], "--start-timeout must be a positive number of seconds"),
            (["3", "--stop-timeout", "-5"], "--stop-timeout must be a positive number of seconds"),
        ]:
            self.assertEqual(self.refused(*argv), f"timemachine dev-cluster: error: {reason}",
                             argv)

    def test_replicas_default_to_three_at_most(self):
        for nodes, replicas in [(1, 1), (2, 2), (3, 3), (5, 3)]:
            args = cli._parser().parse_args(["dev-cluster", str(nodes)])
            cli.devcluster.check_arguments(args.command_parser, args)
            self.assertEqual((args.replicas, args.shards), (replicas, 12))
