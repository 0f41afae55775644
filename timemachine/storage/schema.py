"""The schema of the stores' SQLite files: one `MetaData` per kind of file.

A file records which kind of store made it and its schema version in its ``meta``
table; a store refuses a file of another kind or of a version it does not know.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 1


def meta_table(metadata: MetaData) -> Table:
    # Key/value rows: ``schema_version``, ``store`` (which kind of store made the file)
    # and ``applied_index``.
    return Table(
        "meta",
        metadata,
        Column("key", String, primary_key=True),
        Column("value", String, nullable=False),
    )


vnode_metadata = MetaData()

jobs_table = Table(
    "jobs",
    vnode_metadata,
    Column("collection", String, nullable=False),
    Column("id", String, nullable=False),
    Column("version", BigInteger, nullable=False),
    Column("trigger_ms", BigInteger, nullable=False),
    Column("due_ms", BigInteger, nullable=False),
    Column("meta", Text, nullable=False),
    Column("route", String, nullable=False),
    Column("status", String, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("last_error", Text),
    Column("fired_at_ms", BigInteger),
    PrimaryKeyConstraint("collection", "id"),
)
# The executor's scan (`VnodeStore.due`): equality on status, range and order on due_ms.
jobs_status_due_index = Index("ix_jobs_status_due", jobs_table.c.status, jobs_table.c.due_ms)

vnode_meta_table = meta_table(vnode_metadata)

cluster_metadata = MetaData()

routes_table = Table(
    "routes",
    cluster_metadata,
    Column("id", String, primary_key=True),
    # Every field of the `Route` as JSON: routes are read whole, never queried by field.
    Column("spec", Text, nullable=False),
)

config_table = Table(
    "config",
    cluster_metadata,
    Column("id", Integer, primary_key=True),
    Column("shards", Integer, nullable=False),
    Column("replicas", Integer, nullable=False),
    Column("placement", Text, nullable=False),
    CheckConstraint("id = 1", name="config_single_row"),
)

members_table = Table(
    "members",
    cluster_metadata,
    Column("node_id", String, primary_key=True),
    Column("peer_address", String, nullable=False),
    Column("http_address", String, nullable=False),
)

# The incarnation of each member's data dir (`timemachine.cluster.identity`), once
# recorded: a table of its own, so files made before it need no new column.
member_incarnations_table = Table(
    "member_incarnations",
    cluster_metadata,
    Column("node_id", String, primary_key=True),
    Column("incarnation", String, nullable=False),
)

# Members whose removal has begun (`MemberLeaving`): placement leaves them out.
leaving_table = Table(
    "leaving_members",
    cluster_metadata,
    Column("node_id", String, primary_key=True),
)

cluster_meta_table = meta_table(cluster_metadata)

# The order in which the store unpacks a row of `jobs`: the field order of `Job`.
JOB_COLUMNS = (
    jobs_table.c.collection,
    jobs_table.c.id,
    jobs_table.c.trigger_ms,
    jobs_table.c.meta,
    jobs_table.c.route,
    jobs_table.c.version,
    jobs_table.c.status,
    jobs_table.c.due_ms,
    jobs_table.c.attempts,
    jobs_table.c.last_error,
    jobs_table.c.fired_at_ms,
)
