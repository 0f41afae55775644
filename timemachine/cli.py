"""The ``timemachine`` command: offline work on a node's data directory, and a
development cluster on this machine.

``timemachine dev-cluster N`` starts N nodes on 127.0.0.1 .. 127.0.0.N, forms one
cluster of them and stops them all on Ctrl-C (see `timemachine.devcluster`).

``timemachine repair --data-dir D --raft`` repairs the node's Raft log (one log for
every group of the node) when it refuses to open
(`timemachine.domain.errors.CorruptLog`): it cuts the log before its first bad record.
Each group then restarts from what is left of its records; a group alone on this node
whose store applied entries that were cut restarts from its store (those writes are
in it), and a group with other replicas catches up from them, its member voting
again only once it has (``REPAIRED_MARKER``, written here).

``--shard N`` and ``--meta`` repair the per-shard logs of a data directory written by
a one-node build, which a node migrates on start: they cut the log before its first
bad record and, when what is left cannot continue the log's store, empty it.

``--dry-run`` prints what would be deleted and lost, and changes nothing. Run it
while the node is stopped: it is the only code that deletes fsync'd records.

Exit status: 0 when the log needs nothing or was repaired, 1 when a dry run found
something to repair or the store cannot be read, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import os
import sys

from twisted.internet import defer, task, threads

from timemachine import devcluster
from timemachine.domain.errors import StorageError
from timemachine.node import REPAIRED_MARKER
from timemachine.storage.durable import write_atomically
from timemachine.storage.store import ClusterStore, VnodeStore
from timemachine.storage.wal import RepairPlan, plan_repair, repair_log, survey_log


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``timemachine`` console script."""
    args = _parser().parse_args(argv)
    if args.command is devcluster.run:
        devcluster.check_arguments(args.command_parser, args)
    task.react(args.command, [args])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timemachine",
        description="Offline commands on a timeMachine node's data; a development cluster.",
    )
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    repair = commands.add_parser(
        "repair",
        help="cut a damaged log at its first bad record (the node must be stopped)",
        description=(
            "Cut a log that refuses to open at its first bad record; when what is left "
            "cannot continue the log's store, empty the log. Run it while the node is "
            "stopped: it deletes fsync'd records. Exit status 1 after a dry run that "
            "found something to repair."
        ),
    )
    repair.add_argument("--data-dir", required=True, help="the node's --data-dir")
    which = repair.add_mutually_exclusive_group(required=True)
    which.add_argument("--raft", action="store_true", help="repair the node's Raft log")
    which.add_argument(
        "--shard", type=int, metavar="N", help="repair shard N's log (one-node build's layout)"
    )
    which.add_argument(
        "--meta", action="store_true", help="repair the meta log (one-node build's layout)"
    )
    repair.add_argument(
        "--dry-run", action="store_true", help="print what would be lost; change nothing"
    )
    repair.set_defaults(command=_repair)
    cluster = commands.add_parser(
        "dev-cluster",
        help="run N nodes on 127.0.0.1..N as one cluster until Ctrl-C",
        description=(
            "Start N `twistd -n timemachine` nodes, node i on 127.0.0.i (HTTP port "
            "HTTP_BASE+i, peer port PEER_BASE+i), join them into one cluster as "
            "upstream's join.sh does, configure its shards and replicas, print where "
            "each node listens and logs, and stop them all on Ctrl-C or SIGTERM. Exit "
            "status 1 when a node fails to start (its log's end is printed)."
        ),
    )
    devcluster.add_arguments(cluster)
    cluster.set_defaults(command=devcluster.run, command_parser=cluster)
    return parser


@defer.inlineCallbacks
def _repair(reactor, args):
    if args.raft:
        yield _repair_raft_log(args)
        return
    if args.meta:
        name, directory, store_class = "meta log", os.path.join(args.data_dir, "meta"), ClusterStore
        store_path = os.path.join(directory, "cluster.sqlite")
    else:
        name, directory, store_class = (
            f"shard {args.shard}",
            os.path.join(args.data_dir, "shards", str(args.shard)),
            VnodeStore,
        )
        store_path = os.path.join(directory, "jobs.sqlite")
    wal_directory = os.path.join(directory, "wal")
    if not os.path.isdir(wal_directory):
        print(f"timemachine repair: no log of {name} at {wal_directory}", file=sys.stderr)
        raise SystemExit(2)
    try:
        applied = yield _applied_index(reactor, store_class, store_path)
    except StorageError as e:
        print(f"timemachine repair: cannot read the store of {name}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    # Reading every segment blocks: in a thread, as everywhere else.
    plan = yield threads.deferToThread(plan_repair, wal_directory, applied)
    survey = plan.survey
    print(f"{name}: log {wal_directory}, store {store_path} (applied index {applied})")
    if not plan.changes_anything:
        span = (
            f"indexes {survey.first_index}..{survey.last_index}" if survey.records else "empty"
        )
        print(f"the log is intact: {survey.records} records ({span}); nothing to repair")
        if survey.torn is not None:
            torn = survey.torn
            print(
                f"its unfinished last write ({torn.size} bytes at byte {torn.offset} of "
                f"{torn.path}, never acknowledged) is cut when the node opens it"
            )
        return
    for line in plan.describe():
        print(line)
    if args.dry_run:
        print("dry run: nothing was changed; run without --dry-run to repair")
        raise SystemExit(1)
    yield threads.deferToThread(repair_log, plan)
    print(f"repaired: {name} now opens with its store at applied index {applied}")


@defer.inlineCallbacks
def _repair_raft_log(args):
    wal_directory = os.path.join(args.data_dir, "raft", "wal")
    if not os.path.isdir(wal_directory):
        print(f"timemachine repair: no Raft log at {wal_directory}", file=sys.stderr)
        raise SystemExit(2)
    # The log's record numbers are the node's write sequence, not any store's index:
    # the repair only cuts at the damage.
    survey = yield threads.deferToThread(survey_log, wal_directory)
    plan = RepairPlan(survey, applied_index=0, empty_log=False)
    print(f"the node's Raft log: {wal_directory}")
    if not plan.changes_anything:
        print(f"the log is intact: {survey.records} records; nothing to repair")
        return
    damage = survey.damage
    print(f"damage: {damage.describe()}")
    print(
        "the records cut hold the Raft entries and hard state that the node's groups "
        "wrote after the damage: a group alone on this node whose store applied them "
        "restarts from its store; a group with other replicas catches up from them; "
        "entries no store applied are lost"
    )
    if args.dry_run:
        print("dry run: nothing was changed; run without --dry-run to repair")
        raise SystemExit(1)
    yield threads.deferToThread(repair_log, plan)
    # Members may have lost entries they acknowledged: they must not vote as if they
    # never had them (see timemachine.node.REPAIRED_MARKER).
    marker = os.path.join(args.data_dir, REPAIRED_MARKER)
    yield threads.deferToThread(write_atomically, marker, b"the Raft log was cut by a repair\n")
    print("repaired: the Raft log now opens")
    print(
        f"until they have caught up with their leaders, the node's members of groups "
        f"with other voters do not vote ({marker} is removed then)"
    )


@defer.inlineCallbacks
def _applied_index(reactor, store_class, path: str):
    """The applied index of the store at ``path``; 0 when there is no store yet."""
    if not os.path.exists(path):
        return 0  # opening would create it
    store = store_class(path, reactor)
    yield store.open()
    applied = store.applied_index
    yield store.close()
    return applied
