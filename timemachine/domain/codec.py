"""The protobuf form of commands: the bytes of log entries (`encode_command`); and of
stored jobs, as one node lists them for another (`job_to_pb`).

Decoding builds values with `from_record`: a log entry was validated when it was
proposed, and must replay after a rule has been tightened.
"""

from __future__ import annotations

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain.commands import (
    Command,
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
from timemachine.domain.jobs import Job, JobSpec, JobStatus
from timemachine.domain.records import from_record
from timemachine.domain.routes import Route


def _route_to_pb(route: Route) -> pb.Route:
    return pb.Route(
        id=route.id,
        type=route.type,
        webhook_url=route.webhook_url,
        redis_url=route.redis_url,
        key=route.key,
        mode=route.mode,
        timeout_ms=route.timeout_ms,
        max_attempts=route.max_attempts,
        backoff_ms=route.backoff_ms,
        max_in_flight=route.max_in_flight,
    )


def _route_from_pb(msg: pb.Route) -> Route:
    return from_record(
        Route,
        id=msg.id,
        type=msg.type,
        webhook_url=msg.webhook_url,
        redis_url=msg.redis_url,
        key=msg.key,
        mode=msg.mode,
        timeout_ms=msg.timeout_ms,
        max_attempts=msg.max_attempts,
        backoff_ms=msg.backoff_ms,
        max_in_flight=msg.max_in_flight,
    )


def command_to_pb(command: Command) -> pb.Command:
    """The protobuf form of a command."""
    if isinstance(command, PutJobs):
        return pb.Command(
            put_jobs=pb.PutJobs(
                jobs=[
                    pb.JobSpec(
                        collection=j.collection,
                        id=j.id,
                        trigger_ms=j.trigger_ms,
                        meta=j.meta.encode("utf-8"),
                        route=j.route,
                    )
                    for j in command.jobs
                ]
            )
        )
    if isinstance(command, DeleteJob):
        return pb.Command(delete_job=pb.DeleteJob(collection=command.collection, id=command.id))
    if isinstance(command, JobOutcome):
        return pb.Command(
            outcome=pb.JobOutcome(
                kind=int(command.kind),
                collection=command.collection,
                id=command.id,
                version=command.version,
                attempts=command.attempts,
                at_ms=command.at_ms,
                last_error=command.last_error or "",
            )
        )
    if isinstance(command, PurgeJobs):
        return pb.Command(
            purge_jobs=pb.PurgeJobs(
                jobs=[
                    pb.JobVersion(collection=j.collection, id=j.id, version=j.version)
                    for j in command.jobs
                ]
            )
        )
    if isinstance(command, PutRoute):
        return pb.Command(put_route=_route_to_pb(command.route))
    if isinstance(command, DeleteRoute):
        return pb.Command(delete_route=pb.DeleteRoute(id=command.id))
    if isinstance(command, Configure):
        return pb.Command(
            configure=pb.ClusterConfig(
                shards=command.shards,
                replicas=command.replicas,
                placement=_placement_to_pb(command.placement),
                origin=_placement_to_pb(command.origin),
                map_index=command.map_index,
            )
        )
    if isinstance(command, PutMember):
        return pb.Command(
            put_member=pb.Member(
                node_id=command.node_id,
                peer_address=command.peer_address,
                http_address=command.http_address,
                incarnation=command.incarnation,
            )
        )
    if isinstance(command, RemoveMember):
        return pb.Command(remove_member=pb.RemoveMember(node_id=command.node_id))
    if isinstance(command, MemberLeaving):
        return pb.Command(
            member_leaving=pb.MemberLeaving(node_id=command.node_id, leaving=command.leaving)
        )
    raise TypeError(f"not a command: {command!r}")


def command_from_pb(msg: pb.Command) -> Command:
    """The command a protobuf `Command` holds."""
    kind = msg.WhichOneof("kind")
    if kind == "put_jobs":
        return from_record(
            PutJobs,
            tuple(
                from_record(
                    JobSpec, j.collection, j.id, j.trigger_ms, j.meta.decode("utf-8"), j.route
                )
                for j in msg.put_jobs.jobs
            ),
        )
    if kind == "delete_job":
        return DeleteJob(msg.delete_job.collection, msg.delete_job.id)
    if kind == "outcome":
        o = msg.outcome
        return JobOutcome(
            OutcomeKind(o.kind), o.collection, o.id, o.version, o.attempts, o.at_ms,
            o.last_error or None,
        )
    if kind == "purge_jobs":
        return from_record(
            PurgeJobs,
            tuple(JobVersion(j.collection, j.id, j.version) for j in msg.purge_jobs.jobs),
        )
    if kind == "put_route":
        return PutRoute(_route_from_pb(msg.put_route))
    if kind == "delete_route":
        return DeleteRoute(msg.delete_route.id)
    if kind == "configure":
        c = msg.configure
        return from_record(
            Configure, c.shards, c.replicas, _placement_from_pb(c.placement),
            _placement_from_pb(c.origin), c.map_index,
        )
    if kind == "put_member":
        m = msg.put_member
        return from_record(PutMember, m.node_id, m.peer_address, m.http_address, m.incarnation)
    if kind == "remove_member":
        return RemoveMember(msg.remove_member.node_id)
    if kind == "member_leaving":
        return MemberLeaving(msg.member_leaving.node_id, msg.member_leaving.leaving)
    raise ValueError("empty command record")


def encode_command(command: Command) -> bytes:
    """The bytes of a log entry carrying ``command``."""
    return command_to_pb(command).SerializeToString()


def decode_command(data: bytes) -> Command:
    """The command of a log entry's bytes (inverse of `encode_command`)."""
    msg = pb.Command()
    msg.ParseFromString(data)
    return command_from_pb(msg)


def _placement_to_pb(placement) -> list[pb.ShardPlacement]:
    return [
        pb.ShardPlacement(shard=shard, replicas=list(replicas))
        for shard, replicas in enumerate(placement)
    ]


def _placement_from_pb(placements) -> tuple[tuple[str, ...], ...]:
    placement = [()] * len(placements)
    for p in placements:
        placement[p.shard] = tuple(p.replicas)
    return tuple(placement)


def job_to_pb(job: Job) -> pb.StoredJob:
    return pb.StoredJob(
        collection=job.collection,
        id=job.id,
        trigger_ms=job.trigger_ms,
        meta=job.meta.encode("utf-8"),
        route=job.route,
        version=job.version,
        status=job.status.value,
        due_ms=job.due_ms,
        attempts=job.attempts,
        last_error=job.last_error,
        fired_at_ms=job.fired_at_ms,
    )


def job_from_pb(msg: pb.StoredJob) -> Job:
    """The `Job` of ``msg`` (inverse of `job_to_pb`), as a store loads one."""
    return from_record(
        Job,
        msg.collection,
        msg.id,
        msg.trigger_ms,
        msg.meta.decode("utf-8"),
        msg.route,
        msg.version,
        JobStatus(msg.status),
        msg.due_ms,
        msg.attempts,
        msg.last_error if msg.HasField("last_error") else None,
        msg.fired_at_ms if msg.HasField("fired_at_ms") else None,
    )
