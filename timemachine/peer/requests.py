"""Requests between nodes: the handlers by kind, and errors to and from responses.

A `Request` carries one of the kinds ``propose``, ``http``, ``ping``, ``join`` or
``list``; the handler registered for its kind answers with that kind's result message
(`ProposeResult`, `HttpAnswer`, `Pong`, `JoinAccepted`, `JobPage`). A
`TimeMachineError` a handler raises travels back as the response's ``error_code`` and
``error``, and `error_of` turns it into the same error class on the asking node, so a
forwarded call fails the way a local one would; a `StorageError` (the handling node's
disk failed) travels back as ``E_UNAVAILABLE``, as the REST layer answers it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain import errors

RESULT_TYPES = {
    "propose": pb.ProposeResult,
    "http": pb.HttpAnswer,
    "ping": pb.Pong,
    "join": pb.JoinAccepted,
    "list": pb.JobPage,
}
"""The request kinds, and the message each kind's handler answers with."""

RESPONSE_FIELDS = {
    "propose": "propose",
    "http": "http",
    "ping": "pong",
    "join": "joined",
    "list": "page",
}
"""The `Response` field that carries the answer to each request kind."""

INTERNAL_ERROR_CODE = "E_INTERNAL"
"""What an unexpected exception in a handler answers: the code the REST layer gives a
500 (`timemachine.http.routes`), so a forwarded call that hits a bug looks like a local
call that hit it. Its message says nothing more; the traceback is logged where it
happened."""

Handler = Callable[[str, Any], Any]


class RemoteError(errors.TimeMachineError):
    """An error a peer answered with a code this node has no class for."""

    status = 500

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


# Classes whose constructor takes the message alone; InvalidField (E_INVALID) comes
# back as its base class, which has the same code and status.
_ERRORS_BY_CODE = {
    cls.code: cls
    for cls in (
        errors.TimeMachineError,
        errors.BadJSON,
        errors.TriggerInPast,
        errors.UnknownRoute,
        errors.TooLarge,
        errors.NotFound,
        errors.AlreadyConfigured,
        errors.NotConfigured,
        errors.Unavailable,
        errors.Unauthorized,
    )
}


def error_response(request_id: int, code: str, message: str) -> pb.Response:
    """A response to request ``request_id`` that failed with ``code``."""
    return pb.Response(id=request_id, error_code=code, error=message)


def error_of(response: pb.Response) -> errors.TimeMachineError | None:
    """The error a response carries, as a domain error, or None if it succeeded."""
    if not response.error_code:
        return None
    cls = _ERRORS_BY_CODE.get(response.error_code)
    if cls is None:
        return RemoteError(response.error_code, response.error)
    return cls(response.error)


class RequestHandlers:
    """The handler of each request kind; `answer` turns a request into its response.

    A handler is called as ``handler(from_node, body)`` with the kind's message and
    returns the result message, or a Deferred of it.
    """

    log = Logger()

    def __init__(self):
        self._handlers: dict[str, Handler] = {}

    def handle(self, kind: str, handler: Handler) -> None:
        """Answer requests of ``kind`` with ``handler`` (replacing any earlier one)."""
        if kind not in RESULT_TYPES:
            raise ValueError(f"unknown request kind {kind!r}; known: {sorted(RESULT_TYPES)}")
        self._handlers[kind] = handler

    def answer(self, from_node: str, request: pb.Request) -> defer.Deferred:
        """A Deferred of the `Response` to ``request``; it never fails."""
        kind = request.WhichOneof("kind")
        if kind is None:
            # A kind this build does not know (a newer peer) or none at all.
            return defer.succeed(
                error_response(request.id, "E_INVALID", "request of no known kind")
            )
        handler = self._handlers.get(kind)
        if handler is None:
            return defer.succeed(
                error_response(
                    request.id, errors.Unavailable.code, f"no handler for {kind} requests"
                )
            )
        d = defer.maybeDeferred(handler, from_node, getattr(request, kind))
        d.addCallback(self._result, request.id, kind)
        d.addErrback(self._failure, request.id, kind, from_node)
        return d

    def _result(self, result, request_id: int, kind: str) -> pb.Response:
        expected = RESULT_TYPES[kind]
        if not isinstance(result, expected):
            raise TypeError(
                f"{kind} handler returned {type(result).__name__}, not {expected.__name__}"
            )
        response = pb.Response(id=request_id)
        getattr(response, RESPONSE_FIELDS[kind]).CopyFrom(result)
        return response

    def _failure(self, failure, request_id: int, kind: str, from_node: str) -> pb.Response:
        error = failure.value
        if isinstance(error, errors.TimeMachineError):
            return error_response(request_id, error.code, error.message)
        if isinstance(error, errors.StorageError):
            # As the REST layer answers a local one: this node's disk failed, another
            # replica takes over, so the asking node's client retries (503).
            self.log.failure(
                "{kind} request {id} from {node}: storage failure",
                failure, kind=kind, id=request_id, node=from_node,
            )
            return error_response(
                request_id, errors.Unavailable.code, "storage failure on the node asked; retry"
            )
        self.log.failure(
            "{kind} request {id} from {node} failed",
            failure,
            kind=kind,
            id=request_id,
            node=from_node,
        )
        return error_response(request_id, INTERNAL_ERROR_CODE, "internal error")
