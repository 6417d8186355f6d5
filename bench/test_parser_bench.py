"""HTTP/1.1 request parsing: expserver's parser against httptools (llhttp) and h11.

    pytest bench/test_parser_bench.py --benchmark-only

Not part of the default test run (the project's testpaths is tests/ only). Each
benchmark does the same work for every parser: parse one complete request from bytes,
build a request object (method, target, version, lowercase header names, body) and
read every header, so that a parser which defers work cannot look cheaper than one
which does it up front. Every result is checked after timing.

Groups (compare rows within one group; the "Min"/"Median" columns are per request):
  get-chrome-540B     fresh parser per request, ~540-byte Chrome navigation GET, 10 headers
  post-20B-body       fresh parser per request, small POST with Content-Length and a body
  get-chrome-reused   one parser per connection fed request after request (keep-alive);
                      h11 is left out: it needs a response written before the next request
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

httptools = pytest.importorskip("httptools")
h11 = pytest.importorskip("h11")

# --------------------------------------------------------------------------- requests

CHROME_HEADERS = [
    (b"Host", b"www.example.com"),
    (b"Connection", b"keep-alive"),
    (b"Upgrade-Insecure-Requests", b"1"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 "
                    b"(KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36"),
    (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,"
                b"image/webp,image/apng,*/*;q=0.8"),
    (b"Sec-Fetch-Mode", b"navigate"),
    (b"Referer", b"https://www.example.com/"),
    (b"Accept-Encoding", b"gzip, deflate, br"),
    (b"Accept-Language", b"en-US,en;q=0.9"),
    (b"Cookie", b"_ga=GA1.2.1234567890.1700000000; session=8f14e45fceea167a5a36"),
]
POST_BODY = b'{"name":"x","id":42}'


def build_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes = b"") -> bytes:
    head = b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
    return b"%s %s HTTP/1.1\r\n%s\r\n%s" % (method, target, head, body)


def chrome_get() -> bytes:
    data = build_request(b"GET", b"/docs/index.html?lang=en", CHROME_HEADERS)
    assert len(CHROME_HEADERS) == 10
    assert 535 <= len(data) <= 545, len(data)  # ~540 bytes
    return data


def small_post() -> bytes:
    headers = [(b"Host", b"api.example.com"), (b"Content-Type", b"application/json"),
               (b"Content-Length", b"%d" % len(POST_BODY))]
    assert len(POST_BODY) == 20
    return build_request(b"POST", b"/api/items", headers, POST_BODY)


GET = chrome_get()
POST = small_post()

# --------------------------------------------------------------------------- adapters
# Each adapter: parse(data) -> list of request-like objects with .method .target .version
# .headers [(lowercase name bytes, value bytes)] .body.


class Req:
    """What httptools and h11 build per request: the equivalent of expserver's Request."""

    __slots__ = ("method", "target", "version", "headers", "body")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""


class _HttptoolsProtocol:
    """Callbacks from llhttp collecting into Req objects (url may come in pieces)."""

    def __init__(self) -> None:
        self.parser: httptools.HttpRequestParser | None = None
        self.done: list[Req] = []
        self.current = Req()
        self.url = b""
        self.body_parts: list[bytes] = []

    def on_message_begin(self) -> None:
        self.current = Req()
        self.url = b""
        self.body_parts = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req = self.current
        req.method = self.parser.get_method()
        req.version = self.parser.get_http_version()
        req.target = self.url

    def on_body(self, body: bytes) -> None:
        self.body_parts.append(body)

    def on_message_complete(self) -> None:
        self.current.body = b"".join(self.body_parts)
        self.done.append(self.current)


class HttptoolsParser:
    def __init__(self) -> None:
        self.protocol = _HttptoolsProtocol()
        self.parser = httptools.HttpRequestParser(self.protocol)
        self.protocol.parser = self.parser

    def feed(self, data: bytes) -> list[Req]:
        self.parser.feed_data(data)
        done = self.protocol.done
        self.protocol.done = []
        return done


def parse_httptools(data: bytes) -> list[Req]:
    return HttptoolsParser().feed(data)


def parse_h11(data: bytes) -> list[Req]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    done: list[Req] = []
    req = Req()
    body_parts: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA or event is h11.PAUSED:
            return done
        if isinstance(event, h11.Request):
            req = Req()
            body_parts = []
            req.method = event.method
            req.target = event.target
            req.version = event.http_version.decode()
            req.headers = list(event.headers)  # h11 lowercases names already
        elif isinstance(event, h11.Data):
            body_parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            req.body = b"".join(body_parts)
            done.append(req)


def _expserver_parser_class() -> type:
    try:
        from expserver._http import RequestParser
    except ImportError as exc:
        pytest.skip(f"expserver._http not importable (extension not built?): {exc}")
    return RequestParser


def make_parse_expserver() -> Callable[[bytes], list[Any]]:
    request_parser = _expserver_parser_class()

    def parse_expserver(data: bytes) -> list[Any]:
        return request_parser().feed(data)

    return parse_expserver


# --------------------------------------------------------------------------- work per round


def consume(requests: list[Any]) -> int:
    """Read what a server reads from each request: method, path, every header, body."""
    n = 0
    for req in requests:
        n += len(req.method) + len(req.target) + len(req.body)
        for name, value in req.headers:
            n += len(name) + len(value)
    return n


def check(requests: list[Any], method: bytes, n_headers: int, body: bytes) -> None:
    assert len(requests) == 1, requests
    req = requests[0]
    assert bytes(req.method) == method
    assert len(req.headers) == n_headers
    assert all(bytes(name) == bytes(name).lower() for name, _ in req.headers)
    assert bytes(req.body) == body
    # Each library spells the version its own way: 11, "1.1", b"1.1".
    assert req.version in (11, (1, 1), "1.1", b"1.1", "HTTP/1.1", b"HTTP/1.1"), req.version


IMPLS = ["expserver", "httptools", "h11"]


@pytest.fixture
def parse(request: pytest.FixtureRequest) -> Callable[[bytes], list[Any]]:
    if request.param == "expserver":
        return make_parse_expserver()
    return {"httptools": parse_httptools, "h11": parse_h11}[request.param]


@pytest.mark.parametrize("parse", IMPLS, indirect=True)
def test_get_chrome(benchmark, parse) -> None:
    benchmark.group = "get-chrome-540B"
    benchmark.extra_info["request_bytes"] = len(GET)

    def once() -> list[Any]:
        reqs = parse(GET)
        consume(reqs)
        return reqs

    check(benchmark(once), b"GET", 10, b"")


@pytest.mark.parametrize("parse", IMPLS, indirect=True)
def test_post_small_body(benchmark, parse) -> None:
    benchmark.group = "post-20B-body"
    benchmark.extra_info["request_bytes"] = len(POST)

    def once() -> list[Any]:
        reqs = parse(POST)
        consume(reqs)
        return reqs

    check(benchmark(once), b"POST", 3, POST_BODY)


@pytest.mark.parametrize("impl", ["expserver", "httptools"])
def test_get_chrome_reused_parser(benchmark, impl: str) -> None:
    benchmark.group = "get-chrome-reused"
    parser = _expserver_parser_class()() if impl == "expserver" else HttptoolsParser()

    def once() -> list[Any]:
        reqs = parser.feed(GET)
        consume(reqs)
        return reqs

    check(benchmark(once), b"GET", 10, b"")
