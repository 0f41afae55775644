"""Route URLs are parsed completely when a route is built from a client's request."""

from twisted.trial import unittest

from timemachine.domain.errors import InvalidField
from timemachine.domain.routes import RedisAddress, Route


def http(url):
    return Route("r", "http", webhook_url=url)


def redis(url):
    return Route("r", "redis", redis_url=url, key="k")


class WebhookURLTests(unittest.TestCase):
    def test_good_urls(self):
        for url in [
            "http://127.0.0.1:4000/callback",
            "https://hooks.example.com/a/b?x=1#f",
            "http://[::1]:8080/",
            "http://user:pw@host/",
            "http://host:65535",
            "HTTP://Host.Example/",
            "http://host/caf\u00e9",
        ]:
            self.assertEqual(http(url).webhook_url, url)

    def test_bad_urls_name_the_field(self):
        for url in [
            "http://host:0/",
            "http://host:65536/",
            "http://host:99999/",
            "http://host:80a/",
            "http://host:-1/",
            "http://ho\nst/",
            "http://host/\tpath",
            "http://host/a\x00b",
            "http://host/a b",
            "http://host/\x7f",
            "http://host/\x85",
            "http:///path",
            "http://",
            "ftp://host/",
            "host:80/",
            "http://[::1/",
            "http://[zz::1]/",
            "http://ho^st/",
            "",
            None,
            42,
        ]:
            with self.assertRaises(InvalidField, msg=repr(url)) as caught:
                http(url)
            self.assertEqual(caught.exception.field, "webhook_url")


class RedisURLTests(unittest.TestCase):
    def test_good_urls(self):
        self.assertEqual(
            RedisAddress.parse("redis://127.0.0.1:6380/3"),
            RedisAddress("127.0.0.1", 6380, 3, None, None),
        )
        self.assertEqual(
            RedisAddress.parse("redis://:p%40ss@cache"),
            RedisAddress("cache", 6379, 0, None, "p@ss"),
        )
        self.assertEqual(
            RedisAddress.parse("redis://me:pw@cache:1/"),
            RedisAddress("cache", 1, 0, "me", "pw"),
        )
        self.assertEqual(redis("redis://h:1/15").redis_url, "redis://h:1/15")

    def test_bad_urls_name_the_field(self):
        for url in [
            "redis://h:1/zero",
            "redis://h:1/1x",
            "redis://h:1/\u0663",  # an Arabic-Indic digit is not a database number
            "redis://h:1/0/1",
            "redis://h:0/0",
            "redis://h:70000/0",
            "redis://h:port/0",
            "redis://h:1/0?db=2",
            "redis://h\r\n:1/0",
            "redis://h:1/ 0",
            "redis:///0",
            "rediss://h/0",
            "http://h/0",
            None,
        ]:
            with self.assertRaises(InvalidField, msg=repr(url)) as caught:
                redis(url)
            self.assertEqual(caught.exception.field, "redis_url")
