"""The body reader on its own: bytes in, JSON values (and the client's text) out."""

from twisted.trial import unittest

from timemachine.domain.errors import BadJSON
from timemachine.http.strictjson import JSONText, decode_json

META = frozenset({"meta"})


class DecodeTests(unittest.TestCase):
    def test_values_as_json_loads_gives_them(self):
        self.assertEqual(
            decode_json(b' {"a": [1, 2.5, "x", null, true], "b": {"c": {}}} \n'),
            {"a": [1, 2.5, "x", None, True], "b": {"c": {}}},
        )
        self.assertEqual(decode_json(b"[]", META), [])
        self.assertEqual(decode_json(b"{}", META), {})
        self.assertEqual(decode_json(b'"text"', META), "text")

    def test_raw_member_keeps_numbers_escapes_and_key_order(self):
        text = (
            '{"z": 1.0e2, "a": 0.10, "e": "caf\\u00e9 \\"q\\"", "n": -0,'
            ' "big": 12345678901234567890123}'
        )
        body = decode_json(('{"id": "j", "meta": ' + text + ' , "route": "r"}').encode(), META)
        self.assertEqual(body, {"id": "j", "meta": JSONText(text), "route": "r"})

    def test_raw_member_of_every_batch_item(self):
        body = decode_json(b'[{"meta": 0.10}, 7, {"meta":[ 1 ,2 ]}, {"id": "m"}]', META)
        self.assertEqual(
            body, [{"meta": JSONText("0.10")}, 7, {"meta": JSONText("[ 1 ,2 ]")}, {"id": "m"}]
        )

    def test_raw_only_at_the_top_level_or_in_batch_items(self):
        body = decode_json(b'{"x": {"meta": 1.0}, "meta": null}', META)
        self.assertEqual(body, {"x": {"meta": 1.0}, "meta": JSONText("null")})
        self.assertEqual(decode_json(b'{"meta": 1.50}'), {"meta": 1.5})

    def test_escaped_names_and_odd_spacing_read_the_same(self):
        body = decode_json(b'{"m\\u0065ta": 1.50}', META)
        self.assertEqual(body, {"meta": JSONText("1.50")})
        body = decode_json(b'{ "id" :"a" ,"x\\"y": 1,\n\t"meta"\r: [1.0] }', META)
        self.assertEqual(body, {"id": "a", 'x"y': 1, "meta": JSONText("[1.0]")})

    def test_a_repeated_name_keeps_its_last_value(self):
        self.assertEqual(decode_json(b'{"meta": 1, "meta": [2]}', META), {"meta": JSONText("[2]")})

    def test_non_finite_numbers_are_refused_anywhere(self):
        for data in [
            b'{"meta": 1e400}',
            b'{"meta": {"deep": [1, -1e400]}}',
            b'[{"meta": 1}, {"trigger_ms": 1E+999}]',
            b'{"trigger_ms": 1e400}',
            b'{"meta": NaN}',
            b'{"meta": Infinity}',
            b'[-Infinity]',
        ]:
            for raw in (META, frozenset()):
                with self.assertRaises(BadJSON, msg=data):
                    decode_json(data, raw)

    def test_an_integer_literal_too_long_to_convert_is_refused(self):
        long_literal = b"9" * 5000
        for data in [
            b'{"meta": ' + long_literal + b"}",
            b'{"trigger_ms": -' + long_literal + b"}",
            b'[{"meta": [' + long_literal + b"]}]",
        ]:
            with self.assertRaises(BadJSON) as caught:
                decode_json(data, META)
            self.assertIn("too long", caught.exception.message)
        body = decode_json(b'{"meta": ' + b"9" * 300 + b"}", META)
        self.assertEqual(body["meta"].text, "9" * 300)

    def test_malformed_bodies(self):
        for data in [
            b"",
            b" \n ",
            b"\xff{}",
            b"\xef\xbb\xbf{}",
            b'{"a" 1}',
            b'{"a": 1,}',
            b'{a: 1}',
            b"[1,]",
            b"[1 2]",
            b'{"meta": 1} x',
            b'{"meta": }',
            b'{"meta": "\\ud800"}',
            b'[{"meta": ["\\udc00"]}]',
            b'{"meta": "tab\there"}',
            b"[" * 100_000,
            b'{"meta": ' + b"[" * 100_000,
        ]:
            for raw in (META, frozenset()):
                with self.assertRaises(BadJSON, msg=data):
                    decode_json(data, raw)

    def test_a_surrogate_pair_is_fine(self):
        body = decode_json(b'{"meta": "\\ud83d\\ude00"}', META)
        self.assertEqual(body["meta"].text, '"\\ud83d\\ude00"')
