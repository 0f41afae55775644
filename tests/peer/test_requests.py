"""Request dispatch and error mapping, without a network."""

from twisted.internet import defer
from twisted.trial import unittest

from timemachine._pb import timemachine_pb2 as pb
from timemachine.domain import errors
from timemachine.peer.requests import (
    INTERNAL_ERROR_CODE,
    RemoteError,
    RequestHandlers,
    error_of,
    error_response,
)


class RequestHandlersTests(unittest.TestCase):
    def setUp(self):
        self.handlers = RequestHandlers()

    def answer(self, request):
        return self.successResultOf(self.handlers.answer("a", request))

    def test_the_result_goes_in_the_kinds_field_with_the_id(self):
        seen = []
        self.handlers.handle("ping", lambda frm, ping: seen.append(frm) or pb.Pong(node_id="b"))
        self.handlers.handle(
            "propose", lambda frm, p: defer.succeed(pb.ProposeResult(index=p.group))
        )
        self.handlers.handle("http", lambda frm, call: pb.HttpAnswer(status=201, body=call.body))
        self.assertEqual(
            self.answer(pb.Request(id=7, ping=pb.Ping())),
            pb.Response(id=7, pong=pb.Pong(node_id="b")),
        )
        self.assertEqual(
            self.answer(pb.Request(id=8, propose=pb.Propose(group=4))),
            pb.Response(id=8, propose=pb.ProposeResult(index=4)),
        )
        self.assertEqual(
            self.answer(pb.Request(id=9, http=pb.HttpCall(body=b"x"))),
            pb.Response(id=9, http=pb.HttpAnswer(status=201, body=b"x")),
        )
        self.assertEqual(seen, ["a"])

    def test_a_domain_error_becomes_its_code(self):
        self.handlers.handle("propose", lambda frm, p: defer.fail(errors.Unavailable("no leader")))
        self.assertEqual(
            self.answer(pb.Request(id=1, propose=pb.Propose())),
            error_response(1, "E_UNAVAILABLE", "no leader"),
        )

    def test_another_exception_is_logged_and_internal(self):
        def broken(frm, ping):
            raise KeyError("oops")

        self.handlers.handle("ping", broken)
        response = self.answer(pb.Request(id=2, ping=pb.Ping()))
        self.assertEqual(response, error_response(2, INTERNAL_ERROR_CODE, "internal error"))
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_a_storage_failure_is_logged_and_a_retry(self):
        # As the REST layer answers a local one: the asking node's client gets a 503.
        self.handlers.handle(
            "propose", lambda frm, p: defer.fail(errors.StorageError("disk full"))
        )
        response = self.answer(pb.Request(id=5, propose=pb.Propose()))
        self.assertEqual(response.error_code, errors.Unavailable.code)
        self.assertIsInstance(error_of(response), errors.Unavailable)
        self.assertEqual(len(self.flushLoggedErrors(errors.StorageError)), 1)

    def test_a_result_of_the_wrong_type_is_internal(self):
        self.handlers.handle("ping", lambda frm, ping: pb.HttpAnswer())
        self.assertEqual(
            self.answer(pb.Request(id=3, ping=pb.Ping())).error_code, INTERNAL_ERROR_CODE
        )
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_no_handler_and_no_kind(self):
        self.assertEqual(
            self.answer(pb.Request(id=4, http=pb.HttpCall())).error_code, "E_UNAVAILABLE"
        )
        self.assertEqual(self.answer(pb.Request(id=5)).error_code, "E_INVALID")

    def test_unknown_kind_is_refused_at_registration(self):
        self.assertRaises(ValueError, self.handlers.handle, "pong", lambda frm, b: None)


class ErrorOfTests(unittest.TestCase):
    def test_success_has_no_error(self):
        self.assertIsNone(error_of(pb.Response(id=1, pong=pb.Pong())))

    def test_known_codes_come_back_as_their_class(self):
        for cls in (
            errors.NotFound,
            errors.Unavailable,
            errors.TooLarge,
            errors.TriggerInPast,
            errors.NotConfigured,
        ):
            error = error_of(error_response(1, cls.code, "why"))
            self.assertIs(type(error), cls)
            self.assertEqual((error.message, error.status), ("why", cls.status))

    def test_invalid_field_comes_back_with_its_code_and_message(self):
        sent = errors.InvalidField("trigger_ms", "must be an integer")
        error = error_of(error_response(1, sent.code, sent.message))
        self.assertEqual(
            (error.code, error.message, error.status),
            ("E_INVALID", "trigger_ms: must be an integer", 400),
        )

    def test_an_unknown_code_is_a_remote_error(self):
        error = error_of(error_response(1, INTERNAL_ERROR_CODE, "internal error"))
        self.assertIsInstance(error, RemoteError)
        self.assertEqual((error.code, error.status), (INTERNAL_ERROR_CODE, 500))
        self.assertEqual(error.to_json(), {"error": "internal error", "code": "E_INTERNAL"})
