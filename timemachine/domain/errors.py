"""Errors that reach users: each has an HTTP status and a code from API.md.

Raise them anywhere below the REST layer; ``timemachine.http.routes`` turns them into
``{"error": message, "code": code}`` responses in one place.
"""


class TimeMachineError(Exception):
    """A failure a client can act on."""

    status = 400
    code = "E_INVALID"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict:
        return {"error": self.message, "code": self.code}


class BadJSON(TimeMachineError):
    code = "E_BAD_JSON"


class InvalidField(TimeMachineError):
    """A field is missing or has a bad value; the message names the field."""

    code = "E_INVALID"

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class TriggerInPast(TimeMachineError):
    code = "E_PAST"


class UnknownRoute(TimeMachineError):
    code = "E_ROUTE"


class TooLarge(TimeMachineError):
    status = 413
    code = "E_TOO_LARGE"


class NotFound(TimeMachineError):
    status = 404
    code = "E_NOT_FOUND"


class AlreadyConfigured(TimeMachineError):
    code = "E_CONFIGURED"


class NotConfigured(TimeMachineError):
    status = 503
    code = "E_NOT_CONFIGURED"


class Unavailable(TimeMachineError):
    """No leader for the shard yet, or the node is shutting down; retry."""

    status = 503
    code = "E_UNAVAILABLE"


class ServedElsewhere(Unavailable):
    """This node holds no replica of the shard: ``nodes`` do (the REST layer passes
    the request on to one of them)."""

    def __init__(self, shard: int, nodes):
        super().__init__(
            f"shard {shard} is held by {', '.join(nodes) or 'no node'}, not by this node"
        )
        self.shard = shard
        self.nodes = tuple(nodes)


class Unauthorized(TimeMachineError):
    status = 401
    code = "E_UNAUTHORIZED"


class StorageError(Exception):
    """A local disk or database failure: not the client's fault, never retried blindly."""


class CorruptLog(StorageError):
    """A durable log that cannot be trusted as it is: it refuses to open.

    ``path`` and ``offset`` locate the damage when it is known (a segment file and the
    byte where its first bad record starts). The counts say what a repair that cuts
    there would keep and lose: ``intact_records`` readable before the damage,
    ``records_beyond`` still readable after it, in ``segments_beyond`` later files.
    """

    def __init__(
        self,
        message: str,
        path: str | None = None,
        offset: int | None = None,
        intact_records: int | None = None,
        records_beyond: int | None = None,
        segments_beyond: tuple[str, ...] = (),
    ):
        super().__init__(message)
        self.path = path
        self.offset = offset
        self.intact_records = intact_records
        self.records_beyond = records_beyond
        self.segments_beyond = segments_beyond


class LogBehindCommit(CorruptLog):
    """A Raft log ends below the commit index saved with it: committed entries are gone.

    Starting anyway would mean forgetting entries a quorum was told are durable here;
    the member refuses to start instead, naming the files and where the log ends.
    """
