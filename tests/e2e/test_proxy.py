"""The reverse proxy end to end: the real server in front of small Python upstreams.

What a user of a proxy notices: the upstream's answer arrives unchanged (hop-by-hop fields
aside) and the upstream sees the client's request unchanged (plus X-Forwarded-*); every
framing works both ways; a broken, slow or dead upstream gets the right status and never
a made-up answer; load is shared as configured and dead peers are avoided; a huge reply to a
slow client costs bounded memory. Upstreams live in tests/e2e/upstreams.py.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest

from .conftest import Reader, Served, recv_until_close
from .upstreams import (
    DATE,
    UpConn,
    UpRequest,
    Upstream,
    chunked,
    dead_address,
    generated,
    http,
    named,
    response,
    scripted,
    silent,
)

MiB = 1 << 20


# ---------------------------------------------------------------------------- helpers

class Resp(NamedTuple):
    status: int
    reason: bytes
    fields: list[tuple[str, str]]     # lower-case names, wire order, repeats kept
    body: bytes

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.fields if n == name]

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.all(name)
        return values[0] if values else default

    @property
    def names(self) -> set[str]:
        return {n for n, _ in self.fields}


def read_response(r: Reader, head_only: bool = False) -> Resp:
    """One response off ``r``, with every field line kept (Reader.response keeps the last)."""
    if not r.buf and not r._fill():
        raise EOFError("connection closed before a response")
    line = r._line()
    parts = line.split(b" ", 2)
    assert parts[0] == b"HTTP/1.1", line
    status, reason = int(parts[1]), parts[2] if len(parts) > 2 else b""
    fields = []
    while line := r._line():
        name, _, value = line.partition(b":")
        fields.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
    resp = Resp(status, reason, fields, b"")
    if head_only or status in (204, 304) or status < 200:
        return resp
    if resp.get("content-length") is not None:
        return resp._replace(body=r._exactly(int(resp.get("content-length"))))
    if resp.get("transfer-encoding") == "chunked":
        body = []
        while size := int(r._line().split(b";")[0], 16):
            body.append(r._exactly(size))
            assert r._line() == b""
        while r._line():
            pass
        return resp._replace(body=b"".join(body))
    while r._fill():
        pass
    body, r.buf = r.buf, b""
    return resp._replace(body=body)


class Client:
    """One client connection to the proxy (optionally from another 127.x.y.z address)."""

    def __init__(self, served: Served, timeout: float = 5.0, source: str | None = None) -> None:
        self.sock = socket.create_connection(
            served.addr, timeout=timeout, source_address=(source, 0) if source else None)
        self.reader = Reader(self.sock, timeout)

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def read(self, head_only: bool = False) -> Resp:
        return read_response(self.reader, head_only)

    def get(self, path: str, extra: bytes = b"", method: str = "GET") -> Resp:
        self.send(b"%s %s HTTP/1.1\r\nHost: proxy.test\r\n%s\r\n"
                  % (method.encode(), path.encode(), extra))
        return self.read(head_only=method == "HEAD")

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection (with no further bytes) within timeout."""
        try:
            return self.reader.closed(timeout)
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get(served: Served, path: str, extra: bytes = b"", method: str = "GET") -> Resp:
    with Client(served) as c:
        return c.get(path, extra, method)


def route(*peers: Upstream | str | dict, path: str = "/", **keys: Any) -> dict:
    ups = [p.address if isinstance(p, Upstream) else p for p in peers]
    return {"req_path": path, "type": "reverse_proxy", "upstreams": ups, **keys}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def wait_for(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def up() -> Iterator[Callable[..., Upstream]]:
    """``up(serve, name)`` starts an upstream; all are stopped at the end of the test."""
    made: list[Upstream] = []

    def make(serve: Callable[[UpConn], None], name: str = "up") -> Upstream:
        u = Upstream(serve, name)
        made.append(u)
        return u

    yield make
    for u in made:
        u.stop()


@pytest.fixture
def proxy(start: Callable[..., Served]) -> Callable[..., Served]:
    """``proxy(*peers, **route_keys)``: a server whose ``/`` route proxies to ``peers``."""
    def make(*peers: Upstream | str | dict, **keys: Any) -> Served:
        return start(routes=[route(*peers, **keys)])
    return make


def echo_target(req: UpRequest, conn: UpConn) -> bytes:
    return response(200, req.target, [(b"Content-Type", b"text/plain")])


# ---------------------------------------------------------------------------- transparency

ODD_BODY = bytes(range(256)) * 64 + b"\r\n\r\nHTTP/1.1 200 OK\r\n0\r\n\r\n"
ODD_REPLY = response(201, ODD_BODY, [
    (b"Content-Type", b"application/x-odd; charset=koi8-r"),
    (b"Set-Cookie", b"a=1; Path=/"),
    (b"Set-Cookie", b"b=2; HttpOnly"),
    (b"X-Empty", b""),
    (b"Cache-Control", b"private, max-age=5"),
    (b"ETag", b'"v1"'),
    (b"X-Tab", b"a\tb"),
    (b"Location", b"/made/1"),
], reason=b"Made It Just Now")


def test_response_is_relayed_unchanged(proxy, up):
    """Status line, every field (repeats, order, the upstream's own Server and Date) and the
    body byte for byte, as a direct request to the upstream gets them."""
    u = up(http(lambda req, conn: ODD_REPLY))
    served = proxy(u)
    raw = b"GET /thing HTTP/1.1\r\nHost: proxy.test\r\n\r\n"
    with socket.create_connection(("127.0.0.1", u.port), timeout=5) as sock:
        sock.sendall(raw)
        direct = read_response(Reader(sock))
    via = get(served, "/thing")
    assert (via.status, via.reason) == (direct.status, direct.reason) == (201, b"Made It Just Now")
    assert via.body == direct.body == ODD_BODY
    framing = {"content-length", "connection"}
    assert [f for f in via.fields if f[0] not in framing] == \
        [f for f in direct.fields if f[0] not in framing]
    assert via.all("content-length") == [str(len(ODD_BODY))]
    assert via.all("server") == ["test-upstream/1.0"]          # ours is not added
    assert via.all("date") == [DATE.decode()]


HOP_REPLY = (b"HTTP/1.1 200 OK\r\nServer: test-upstream/1.0\r\nDate: " + DATE + b"\r\n"
             b"Connection: X-Secret, keep-alive\r\nX-Secret: s\r\n"
             b"Keep-Alive: timeout=5, max=100\r\nProxy-Connection: keep-alive\r\n"
             b"TE: trailers\r\nTrailer: X-Checksum\r\nUpgrade: h2c\r\nX-Kept: yes\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n"
             + chunked([b"hop ", b"by ", b"hop"], b"X-Checksum: 123\r\n"))


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_hop_by_hop_response_fields_are_removed(proxy, up, version):
    served = proxy(up(http(lambda req, conn: HOP_REPLY)))
    with Client(served) as c:
        c.send(b"GET /hop HTTP/%s\r\nHost: proxy.test\r\n\r\n" % version.encode())
        resp = c.read()
    assert resp.status == 200
    assert resp.body == b"hop by hop"
    assert resp.get("x-kept") == "yes"
    assert not resp.names & {"x-secret", "keep-alive", "proxy-connection", "te", "trailer",
                             "upgrade", "x-checksum"}
    assert all("secret" not in v.lower() for v in resp.all("connection"))
    if version == "1.1":
        assert resp.all("transfer-encoding") == ["chunked"]       # our framing, not theirs
    else:
        assert "transfer-encoding" not in resp.names              # 1.0: delimited by close


def test_relayed_head_is_the_upstreams_bytes_less_hop_by_hop_lines(proxy, up):
    """The head a client gets is the upstream's own lines, spelling and order kept; a field
    named by any of its Connection fields goes, wherever it stands and however it is cased."""
    reply = (b"HTTP/1.0 299 Odd  Reason \r\nx-LOWER: as Sent \r\nX-Named: a\r\n"
             b"connection: keep-alive\r\nCONNECTION: x-named, X-Other\r\nx-other: b\r\n"
             b"content-length: 3\r\nkeep-alive: timeout=5\r\nSet-Cookie: c=1\r\n\r\nabc")
    served = proxy(up(http(lambda req, conn: reply)))
    with Client(served) as c:
        c.send(b"GET /h HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        lines = iter(c.reader._line, b"")
        head = b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        assert c.reader._exactly(3) == b"abc"
    assert head == (b"HTTP/1.1 299 Odd  Reason \r\nx-LOWER: as Sent \r\n"
                    b"content-length: 3\r\nSet-Cookie: c=1\r\n\r\n")


def test_hop_by_hop_request_fields_are_removed_and_forwarded_fields_added(proxy, up):
    u = up(http(echo_target))
    served = proxy(u)
    with Client(served) as c:
        c.send(b"GET /hop HTTP/1.1\r\nHost: front.example\r\n"
               b"Connection: X-Drop, keep-alive\r\nX-Drop: d\r\nKeep-Alive: 300\r\n"
               b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
               b"Upgrade: h2c\r\nX-Kept: 1\r\n"
               b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\n"
               b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\r\n")
        assert c.read().status == 200
    (req,) = u.requests
    assert not req.names & {b"x-drop", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                            b"upgrade"}
    assert all(b"x-drop" not in v.lower() for v in req.all(b"connection"))
    assert req.all(b"x-kept") == [b"1"]
    assert req.all(b"x-forwarded-for") == [b"203.0.113.7, 198.51.100.1, 127.0.0.1"]
    assert req.all(b"x-forwarded-proto") == [b"http"]
    assert req.all(b"x-forwarded-host") == [b"front.example"]
    assert req.all(b"host") == [b"front.example"]


@pytest.mark.parametrize("setting, expected", [
    (None, b"front.example:8443"),
    ("client", b"front.example:8443"),
    ("upstream", "{address}"),
    ("backend.internal", b"backend.internal"),
])
def test_host_header(proxy, up, setting, expected):
    u = up(http(echo_target))
    served = proxy(u, **({} if setting is None else {"proxy_host_header": setting}))
    with Client(served) as c:
        c.send(b"GET /h HTTP/1.1\r\nHost: front.example:8443\r\n\r\n")
        assert c.read().status == 200
    (req,) = u.requests
    if isinstance(expected, str):
        expected = expected.format(address=u.address).encode()
    assert req.all(b"host") == [expected]
    assert req.all(b"x-forwarded-host") == [b"front.example:8443"]


def test_http10_request_without_host_gets_one_upstream(proxy, up):
    """HTTP/1.1 upstreams need a Host: with none from the client, the peer's address."""
    u = up(http(echo_target))
    served = proxy(u)
    with Client(served) as c:
        c.send(b"GET /old HTTP/1.0\r\n\r\n")
        resp = c.read()
    assert resp.status == 200
    (req,) = u.requests
    assert req.version == b"HTTP/1.1"
    assert req.all(b"host") == [u.address.encode()]


@pytest.mark.parametrize("method, target, body", [
    (b"GET", b"/a%20b/c.txt?x=1&y=%2F&z", b""),
    (b"GET", b"//double//slash/./x/../y", b""),
    (b"GET", b"/caf%C3%A9/%7Euser?q=a+b&&", b""),
    (b"GET", b"/x?", b""),
    (b"DELETE", b"/items/7?force=1", b""),
    (b"OPTIONS", b"/cors", b""),
    (b"PUT", b"/items/7", b"new value"),
    (b"PATCH", b"/items/7?v=2", b'{"a": 1}'),
])
def test_request_line_reaches_upstream_exactly(proxy, up, method, target, body):
    u = up(http(echo_target))
    served = proxy(u)
    with Client(served) as c:
        c.send(b"%s %s HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: %d\r\n\r\n%s"
               % (method, target, len(body), body))
        assert c.read().status == 200
    (req,) = u.requests
    assert (req.method, req.target, req.version) == (method, target, b"HTTP/1.1")
    assert req.body == body


@pytest.mark.parametrize("target, origin_form", [
    (b"http://a.example:81/p/q?x=1", b"/p/q?x=1"),
    (b"http://a.example:81?x=1", b"/?x=1"),
    (b"http://a.example:81", b"/"),
    (b"http://a.example:81/p?", b"/p?"),
])
def test_absolute_form_goes_upstream_in_origin_form_with_its_authority(proxy, up, target,
                                                                        origin_form):
    """RFC 9112 3.2.2: a proxy makes the Host from an absolute-form target, not from the
    client's Host field."""
    u = up(http(echo_target))
    served = proxy(u)
    with Client(served) as c:
        c.send(b"GET %s HTTP/1.1\r\nHost: other.example\r\n\r\n" % target)
        assert c.read().status == 200
    (req,) = u.requests
    assert req.target == origin_form
    assert req.all(b"host") == [b"a.example:81"]
    assert req.all(b"x-forwarded-host") == [b"a.example:81"]


def test_status_line_without_a_reason_keeps_its_space(proxy, up):
    """RFC 9112 4: status-line = HTTP-version SP status-code SP [reason-phrase]."""
    served = proxy(up(http(lambda req, conn: b"HTTP/1.1 299\r\nContent-Length: 2\r\n\r\nok")))
    with Client(served) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        assert c.reader._line() == b"HTTP/1.1 299 "
        assert list(iter(c.reader._line, b"")) == [b"Content-Length: 2"]
        assert c.reader._exactly(2) == b"ok"


# ---------------------------------------------------------------------------- framing

BIG_PARTS = [bytes([65 + i % 26]) * (1000 + 7919 * i % 30000) for i in range(20)]
BIG = b"".join(BIG_PARTS)


def framed(req: UpRequest, conn: UpConn) -> bytes | None:
    """/cl: Content-Length; /chunked: chunks with extensions and trailers; /close: delimited
    by closing (the connection ends after it); anything else: its target."""
    path = req.target.split(b"?")[0]
    if path == b"/cl":
        return response(200, BIG)
    if path == b"/chunked":
        return (response(200, headers=[(b"Transfer-Encoding", b"chunked")], length=False)
                + chunked(BIG_PARTS, b"X-Sum: 42\r\nX-More: yes\r\n", b";name=value;flag"))
    if path == b"/close":
        conn.send(response(200, headers=[(b"X-Framing", b"close")], length=False))
        for part in BIG_PARTS:
            conn.send(part)
        return None             # closes the connection: the end of the body
    return response(200, req.target)


def test_framings_to_an_http11_client_on_one_connection(proxy, up):
    served = proxy(up(http(framed)))
    with Client(served) as c:
        for path in ["/cl", "/chunked", "/close", "/cl", "/close", "/chunked", "/last"]:
            resp = c.get(path)
            assert resp.status == 200, path
            if path == "/last":
                assert resp.body == b"/last"
                continue
            assert resp.body == BIG, path
            if path == "/cl":
                assert resp.get("content-length") == str(len(BIG))
            else:
                assert resp.get("transfer-encoding") == "chunked", path   # re-chunked
                assert "content-length" not in resp.names
        assert not c.closed(0.3)        # still open: keep-alive survived every framing


@pytest.mark.parametrize("path", ["/cl", "/chunked", "/close"])
def test_framings_to_an_http10_client(proxy, up, path):
    served = proxy(up(http(framed)))
    with Client(served) as c:
        c.send(b"GET %s HTTP/1.0\r\nHost: proxy.test\r\n\r\n" % path.encode())
        raw = recv_until_close(c.sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"transfer-encoding" not in head.lower()
    assert body == BIG                  # close-delimited (or Content-Length for /cl)


def test_http10_keep_alive_client_through_proxy(proxy, up):
    served = proxy(up(http(framed)))
    with Client(served) as c:
        c.send(b"GET /cl HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = c.read()
        assert resp.body == BIG
        assert resp.get("connection", "").lower() == "keep-alive"
        c.send(b"GET /again HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert c.read().body == b"/again"


def sha_reply(req: UpRequest, conn: UpConn) -> bytes:
    digest = hashlib.sha256(req.body).hexdigest().encode()
    te = req.get(b"transfer-encoding") or b"-"
    return response(200, b"%s %d %s" % (digest, len(req.body), te))


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_3mib_upload_reaches_upstream_intact(proxy, up, framing):
    u = up(http(sha_reply))
    served = proxy(u, max_body_size=8 * MiB)
    data = hashlib.shake_256(b"upload").digest(3 * MiB)
    with Client(served, timeout=10) as c:
        if framing == "content-length":
            c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: %d\r\n\r\n"
                   % len(data) + data)
        else:
            pieces, i, n = [], 0, 1
            while i < len(data):
                size = (n * 7919) % 70000 + 1
                pieces.append(b"%x;ext=1\r\n%s\r\n" % (len(data[i:i + size]), data[i:i + size]))
                i, n = i + size, n + 1
            c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"".join(pieces) + b"0\r\nX-Trailer: t\r\n\r\n")
        resp = c.read()
        assert resp.status == 200
        digest, size, _ = resp.body.split()
        assert int(size) == len(data)
        assert digest.decode() == hashlib.sha256(data).hexdigest()
        assert c.get("/after").status == 200     # the connection goes on after the upload


def no_body_replies(req: UpRequest, conn: UpConn) -> bytes:
    if req.method == b"HEAD":
        return (b"HTTP/1.1 200 OK\r\nServer: test-upstream/1.0\r\nContent-Length: 1234\r\n"
                b"Content-Type: text/plain\r\n\r\n")
    if req.target == b"/204":
        return b"HTTP/1.1 204 No Content\r\nServer: test-upstream/1.0\r\nX-A: 1\r\n\r\n"
    if req.target == b"/304":
        return b"HTTP/1.1 304 Not Modified\r\nServer: test-upstream/1.0\r\nETag: \"v1\"\r\n\r\n"
    return response(200, b"after:" + req.target)


def test_head_204_304_then_more_requests_on_both_connections(proxy, up):
    u = up(http(no_body_replies))
    served = proxy(u)
    with Client(served) as c:
        head = c.get("/file", method="HEAD")
        assert head.status == 200
        assert head.get("content-length") == "1234"
        assert c.get("/a").body == b"after:/a"
        resp = c.get("/204")
        assert resp.status == 204 and resp.get("x-a") == "1"
        assert "transfer-encoding" not in resp.names
        assert c.get("/b").body == b"after:/b"
        resp = c.get("/304", b'If-None-Match: "v1"\r\n')
        assert resp.status == 304 and resp.get("etag") == '"v1"'
        assert "transfer-encoding" not in resp.names
        assert c.get("/c").body == b"after:/c"
        assert c.reader.buf == b""          # no stray body bytes in the stream
    assert u.accepted == 1                  # and the upstream connection was reused


def test_pipelined_requests_answered_in_order(proxy, up):
    u = up(http(framed))
    served = proxy(u)
    reqs = [b"GET /p1 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /cl HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /p3 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n",
            b"HEAD /p5 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"POST /p6 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"GET /close HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /p8 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]
    with Client(served) as c:
        c.send(b"".join(reqs))
        bodies = [c.read(head_only=i == 4).body for i in range(len(reqs))]
        assert c.closed()
    assert bodies == [b"/p1", BIG, b"/p3", BIG, b"", b"/p6", BIG, b"/p8"]
    assert [r.target for r in u.requests] == [b"/p1", b"/cl", b"/p3", b"/chunked", b"/p5",
                                              b"/p6", b"/close", b"/p8"]


def test_upstream_connection_is_reused(proxy, up):
    u = up(http(echo_target))
    served = proxy(u)
    with Client(served) as c:
        for i in range(10):
            assert c.get(f"/ka{i}").body == f"/ka{i}".encode()
    for i in range(10):
        assert get(served, f"/new{i}").body == f"/new{i}".encode()
    assert len(u.requests) == 20
    assert u.accepted == 1


# ---------------------------------------------------------------------------- failures

HELD = 4.0     # how long a misbehaving upstream keeps its connection open after replying

BAD_REPLIES = {
    "empty": (b"", "close"),
    "reset": (b"", "reset"),
    "garbage-text": (b"SSH-2.0-OpenSSH_9.6\r\n", "hold"),
    "garbage-binary": (bytes(range(256)) * 4, "hold"),
    "http09-style": (b"<html>hello</html>\r\n\r\n", "hold"),
    "duplicate-cl": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
                     "hold"),
    "duplicate-cl-same": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n"
                          b"hello", "hold"),
    "cl-plus": (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", "hold"),
    "cl-negative": (b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\nhello", "hold"),
    "bare-lf-status": (b"HTTP/1.1 200 OK\nContent-Length: 2\r\n\r\nok", "hold"),
    "bare-lf-field": (b"HTTP/1.1 200 OK\r\nX-A: 1\nContent-Length: 2\r\n\r\nok", "hold"),
    "bare-lf-everywhere": (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "hold"),
    "obs-fold": (b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok", "hold"),
    "cl-and-te": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"2\r\nok\r\n0\r\n\r\n", "hold"),
    "te-gzip": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nok", "hold"),
    "te-twice": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked"
                 b"\r\n\r\n2\r\nok\r\n0\r\n\r\n", "hold"),
    "cl-empty": (b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nok", "hold"),
    "cl-19-digits": (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000000\r\n\r\nok", "hold"),
    "space-before-colon": (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "hold"),
    "nul-in-field": (b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok", "hold"),
    "bad-status-code": (b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nok", "hold"),
    "huge-head": (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok",
                  "hold"),
    "head-cut-short": (b"HTTP/1.1 200 OK\r\nContent-Le", "close"),
}


def bad_routes(up: Callable[..., Upstream], names: list[str]) -> tuple[list[dict], dict]:
    """A route per misbehaving upstream (``/<name>``) and a good one (``/ok``)."""
    ups = {name: up(scripted(*BAD_REPLIES[name], HELD), name) for name in names}
    ups["ok"] = up(http(echo_target), "ok")
    return [route(u, path=f"/{name}") for name, u in ups.items()], ups


@pytest.mark.parametrize("name", list(BAD_REPLIES))
def test_bad_upstream_reply_is_502(start, up, name):
    routes, ups = bad_routes(up, [name])
    served = start(routes=routes)
    with Client(served) as c:
        resp = c.get(f"/{name}/x")
        assert resp.status == 502, resp
        assert resp.get("server") == "eXpServer"        # our answer, not a relayed one
        # the client connection is still good, and nothing leaked into it
        assert c.get("/ok/after").body == b"/ok/after"
        assert c.reader.buf == b""
    # the proxy never keeps a connection that spoke nonsense
    u = ups[name]
    assert wait_for(lambda: len(u.closed_conns) == u.accepted, 2.0), \
        f"{name}: {u.accepted} accepted, {len(u.closed_conns)} closed"


def test_server_survives_every_bad_upstream_at_once(start, up):
    routes, _ = bad_routes(up, list(BAD_REPLIES))
    served = start(routes=routes)
    results: list[tuple[str, int]] = []

    def hit(name: str) -> None:
        try:
            results.append((name, get(served, f"/{name}/again").status))
        except (OSError, EOFError):
            results.append((name, -1))
    threads = [threading.Thread(target=hit, args=(n,)) for n in BAD_REPLIES for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [r for r in results if r[1] != 502] == []
    assert get(served, "/ok/still").body == b"/ok/still"
    assert served.server.proc.poll() is None


def test_refused_is_502(proxy):
    served = proxy(dead_address())
    assert get(served, "/").status == 502
    assert get(served, "/", b"Content-Length: 2\r\n\r\nhi", method="POST").status == 502


def test_all_peers_down_is_502(proxy):
    served = proxy(dead_address(), dead_address(), dead_address())
    with Client(served) as c:
        for _ in range(3):
            assert c.get("/").status == 502
        assert not c.closed(0.2)


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_refused_peer_is_retried_on_a_live_one(proxy, up, method):
    """Nothing was sent to a peer that refused: any method goes to the next peer."""
    live = up(http(named(b"live")), "live")
    served = proxy(dead_address(), live, dead_address())
    extra = b"Content-Length: 4\r\n\r\nbody" if method == "POST" else b""
    with Client(served, timeout=2) as c:
        for i in range(6):
            resp = c.get(f"/r{i}", extra, method)
            assert (resp.status, resp.body) == (200, b"live")
    assert len(live.requests) == 6


def test_stale_pooled_connection_is_retried_for_get(proxy, up):
    """An upstream closes an idle keep-alive connection just as the proxy reuses it (the
    usual race with a short upstream keep-alive timeout): simulated by an upstream that
    answers the first request of each connection and closes on the second. A GET must
    not turn into a 502, even with a single peer: a fresh connection is tried."""
    def one_per_connection(conn: UpConn) -> None:
        req = conn.read_request()
        if req is not None:
            conn.send(response(200, b"fresh:" + req.target))
            conn.read_request()       # then close without answering
    u = up(one_per_connection, "short-keepalive")
    served = proxy(u)
    for i in range(4):
        resp = get(served, f"/s{i}")
        assert (resp.status, resp.body) == (200, b"fresh:/s%d" % i)


def test_http10_upstream_connection_is_not_reused(proxy, up):
    def old(conn: UpConn) -> None:
        if conn.read_request() is not None:
            conn.send(b"HTTP/1.0 200 OK\r\nServer: old/1.0\r\nContent-Length: 2\r\n\r\nok")
            time.sleep(0.2)           # closes a moment later, as HTTP/1.0 says it will
    u = up(old, "http10")
    served = proxy(u)
    with Client(served) as c:
        for _ in range(3):
            resp = c.get("/")
            assert (resp.status, resp.body) == (200, b"ok")
            time.sleep(0.3)
    assert u.accepted == 3


def test_interim_responses_are_skipped(proxy, up):
    u = up(http(lambda req, conn: b"HTTP/1.1 100 Continue\r\n\r\n"
                b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n"
                + response(200, b"final")))
    with Client(proxy(u)) as c:
        resp = c.get("/")
        assert (resp.status, resp.body) == (200, b"final")
        assert c.get("/again").body == b"final"


def test_early_upstream_answer_during_upload(proxy, up):
    """The upstream refuses an upload before reading it (413, then closes): the client gets
    that answer, not a 502."""
    def refuse(conn: UpConn) -> None:
        if conn.read_head() is not None:
            conn.send(response(413, b"too big for me", [(b"Connection", b"close")]))
            time.sleep(0.2)
            conn.reset()
    served = proxy(up(refuse, "refuse"), max_body_size=16 * MiB)
    c = Client(served)
    body = b"u" * (8 * MiB)

    def upload() -> None:
        try:
            c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: %d\r\n\r\n"
                   % len(body) + body)
        except OSError:
            pass
    threading.Thread(target=upload, daemon=True).start()
    try:
        resp = c.read()
    finally:
        c.close()
    assert (resp.status, resp.body) == (413, b"too big for me")


def test_idle_upstream_pool_follows_the_peak(proxy, up):
    """The pool keeps as many idle connections as requests were in flight at once (at least
    upstream_keepalive): a second burst of the same size connects nothing new."""
    def slow(req: UpRequest, conn: UpConn) -> bytes:
        time.sleep(0.3)
        return response(200, b"ok")
    u = up(http(slow), "slow")
    served = proxy(u, upstream_keepalive=2)
    for _burst in range(2):
        threads = [threading.Thread(target=get, args=(served, f"/{i}")) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(5)
    assert u.accepted == 5
    assert u.closed_conns == []


def test_upstream_keepalive_zero_closes_each_connection(proxy, up):
    u = up(http(named(b"x")), "no-pool")
    served = proxy(u, upstream_keepalive=0)
    for i in range(3):
        assert get(served, f"/{i}").status == 200
    assert u.accepted == 3
    assert wait_for(lambda: len(u.closed_conns) == 3, 2.0), u.closed_conns


def test_upstream_read_timeout_is_504(proxy, up):
    u = up(silent(5.0), "silent")
    served = proxy(u, upstream_read_timeout=0.5)
    t0 = time.monotonic()
    resp = get(served, "/slow")
    elapsed = time.monotonic() - t0
    assert resp.status == 504
    assert 0.4 <= elapsed < 2.5, elapsed
    assert wait_for(lambda: u.closed_conns == [1], 1.0)    # and it dropped the upstream


def test_upstream_read_timeout_is_between_reads(proxy, up):
    """A reply that trickles in for longer than the read timeout is fine: the timeout is
    the longest silence, not a total."""
    def trickle(conn: UpConn) -> None:
        if conn.read_head() is None:
            return
        conn.send(response(200, length=False).replace(
            b"\r\n\r\n", b"\r\nContent-Length: 15\r\n\r\n", 1))
        for _ in range(15):
            time.sleep(0.1)
            conn.send(b"t")
        conn.wait_closed(2)
    served = proxy(up(trickle, "trickle"), upstream_read_timeout=0.5)
    t0 = time.monotonic()
    resp = get(served, "/")
    assert (resp.status, resp.body) == (200, b"t" * 15)
    assert time.monotonic() - t0 >= 1.4


def test_upstream_stalling_mid_body_is_cut_at_the_read_timeout(proxy, up):
    served = proxy(up(cut_reply(CUT_REPLIES["cl-close"][0], "hold"), "stall"),
                   upstream_read_timeout=0.5)
    with Client(served) as c:
        c.send(b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        t0 = time.monotonic()
        raw = recv_until_close(c.sock, timeout=5)
        elapsed = time.monotonic() - t0
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and len(body) == 50_000
    assert 0.4 <= elapsed < 2.0, elapsed     # the body stalls at once: cut after 0.5 s


def test_connect_timeout_is_504(proxy):
    """A peer whose accept queue is full drops SYNs: the connect hangs until the timeout."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    fillers = []
    try:
        for _ in range(4):          # fill the accept queue (never accepted)
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(lsock.getsockname())
            fillers.append(s)
        time.sleep(0.1)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(lsock.getsockname())
            pytest.skip("this kernel completes connects to a full accept queue")
        except (TimeoutError, OSError):
            pass
        finally:
            probe.close()
        served = proxy(f"127.0.0.1:{lsock.getsockname()[1]}", connect_timeout=0.5)
        t0 = time.monotonic()
        resp = get(served, "/")
        elapsed = time.monotonic() - t0
        assert resp.status == 504
        assert 0.4 <= elapsed < 2.5, elapsed
    finally:
        for s in fillers:
            s.close()
        lsock.close()


def reset_after_request(conn: UpConn) -> None:
    if conn.read_request() is not None:
        conn.reset()


def close_after_request(conn: UpConn) -> None:
    conn.read_request()


@pytest.mark.parametrize("failure", [reset_after_request, close_after_request],
                         ids=["reset", "empty-reply"])
def test_get_is_retried_on_the_next_peer(proxy, up, failure):
    bad, good = up(failure, "bad"), up(http(named(b"good")), "good")
    served = proxy(bad, good)
    with Client(served) as c:
        for i in range(6):
            resp = c.get(f"/g{i}")
            assert (resp.status, resp.body) == (200, b"good")
    assert len(bad.requests) >= 1           # the request did reach the bad peer first
    assert len(good.requests) == 6


@pytest.mark.parametrize("failure", [reset_after_request, close_after_request],
                         ids=["reset", "empty-reply"])
def test_post_is_not_retried_once_sent(proxy, up, failure):
    bad, good = up(failure, "bad"), up(http(echo_target), "good")
    served = proxy(bad, good)
    status = {}
    for i in range(6):
        status[f"/p{i}".encode()] = get(served, f"/p{i}",
                                        b"Content-Length: 5\r\n\r\nhello", "POST").status
    failed = {t for t, s in status.items() if s == 502}
    assert failed, status                   # the bad peer got at least one
    assert set(status.values()) == {200, 502}
    assert {r.target for r in bad.requests} == failed
    assert {r.target for r in good.requests} == set(status) - failed   # never a replay


CHUNKED_HEAD = response(200, headers=[(b"Transfer-Encoding", b"chunked")], length=False)
# Replies that go wrong after their head: (bytes, then what the upstream does)
CUT_REPLIES = {
    "cl-close": (response(200, b"x" * 50_000, length=False).replace(
        b"\r\n\r\n", b"\r\nContent-Length: 100000\r\n\r\n", 1), "close"),
    "cl-reset": (response(200, b"x" * 50_000, length=False).replace(
        b"\r\n\r\n", b"\r\nContent-Length: 100000\r\n\r\n", 1), "reset"),
    "chunked-mid-chunk": (CHUNKED_HEAD + b"4000\r\n" + b"y" * 8000, "close"),
    "chunked-between-chunks": (CHUNKED_HEAD + b"5\r\nhello\r\n", "close"),
    "chunked-invalid-size": (CHUNKED_HEAD + b"5\r\nhello\r\nzz\r\nok\r\n0\r\n\r\n", "hold"),
    "chunked-no-crlf-after-data": (CHUNKED_HEAD + b"5\r\nhelloXX0\r\n\r\n", "hold"),
}


def cut_reply(data: bytes, then: str) -> Callable[[UpConn], None]:
    def serve(conn: UpConn) -> None:
        if conn.read_head() is None:
            return
        conn.send(data)
        time.sleep(0.3)
        if then == "reset":
            conn.reset()
        elif then == "hold":
            conn.wait_closed(HELD)
    return serve


@pytest.mark.parametrize("kind", list(CUT_REPLIES))
def test_reply_cut_short_is_never_completed(start, up, kind):
    """Once the head went out, a failure can only close the client connection: the body is
    short of its Content-Length, or the chunked stream has no last chunk."""
    served = start(routes=[route(up(cut_reply(*CUT_REPLIES[kind]), kind)),
                           route(up(http(echo_target), "ok"), path="/ok")])
    with Client(served) as c:
        c.send(b"GET /cut HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        t0 = time.monotonic()
        raw = recv_until_close(c.sock, timeout=5)
        assert time.monotonic() - t0 < 3, "the client connection was not closed"
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), raw[:200]
    if kind.startswith("cl"):
        assert b"content-length: 100000" in head.lower()
        assert len(body) < 100_000
    else:
        assert b"transfer-encoding: chunked" in head.lower()
        assert not body.endswith(b"0\r\n\r\n")     # no made-up last chunk
    assert get(served, "/ok/next").body == b"/ok/next"  # and the server goes on


def test_client_leaving_closes_the_upstream_exchange(proxy, up):
    waiting = up(silent(10.0), "silent")
    served = proxy(waiting)
    c = Client(served)
    c.send(b"GET /wait HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert wait_for(lambda: len(waiting.requests) == 1, 2.0)
    c.close()
    assert wait_for(lambda: waiting.closed_conns == [1], 2.0), "the upstream was left open"


def test_client_leaving_mid_body_closes_the_upstream(proxy, up):
    ended = threading.Event()

    def endless(conn: UpConn) -> None:
        if conn.read_head() is None:
            return
        conn.send(response(200, length=False).replace(
            b"\r\n\r\n", b"\r\nContent-Length: 1000000000\r\n\r\n", 1))
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            if not conn.send(b"z" * 1024):
                ended.set()
                return
            time.sleep(0.01)
    served = proxy(up(endless, "endless"))
    c = Client(served)
    c.send(b"GET /stream HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    c.sock.recv(1000)
    time.sleep(0.2)
    c.close()
    assert ended.wait(3.0), "the upstream kept streaming to nobody"


def test_client_leaving_mid_upload_closes_the_upstream(proxy, up):
    outcome: list[bool] = []

    def reader(conn: UpConn) -> None:
        req = conn.read_head()
        if req is not None:
            outcome.append(conn.read_body(req))
    served = proxy(up(reader, "reader"), max_body_size=4 * MiB)
    c = Client(served)
    c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1000000\r\n\r\n"
           + b"u" * 100_000)
    time.sleep(0.3)
    c.close()
    assert wait_for(lambda: outcome == [False], 3.0), outcome


@pytest.mark.parametrize("level", ["top", "route"])
def test_body_timeout_closes_client_and_upstream(start, up, level):
    outcome: list[bool] = []

    def reader(conn: UpConn) -> None:
        req = conn.read_head()
        if req is not None:
            outcome.append(conn.read_body(req))
    u = up(reader, "reader")
    if level == "top":
        served = start(routes=[route(u)], body_timeout=0.5)
    else:
        served = start(routes=[route(u, body_timeout=0.5)])
    with Client(served) as c:
        c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: 1000\r\n\r\n" + b"u" * 10)
        t0 = time.monotonic()
        recv_until_close(c.sock, timeout=4)
        assert time.monotonic() - t0 < 3
    assert wait_for(lambda: outcome == [False], 2.0), outcome


def test_upstream_send_timeout_is_504(proxy, up):
    """An upstream that never reads the upload: the proxy gives up after send_timeout."""
    def deaf(conn: UpConn) -> None:
        if conn.read_head() is not None:
            time.sleep(8.0)             # never reads the body
    served = proxy(up(deaf, "deaf"), max_body_size=64 * MiB, upstream_send_timeout=0.5)
    c = Client(served, timeout=8)
    body = b"s" * (48 * MiB)

    def upload() -> None:
        try:
            c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: %d\r\n\r\n"
                   % len(body) + body)
        except OSError:
            pass
    t = threading.Thread(target=upload, daemon=True)
    t.start()
    t0 = time.monotonic()
    try:
        resp = c.read()
    finally:
        c.close()
    assert resp.status == 504
    assert time.monotonic() - t0 < 5


def test_max_body_size_is_enforced_before_the_upstream(proxy, up):
    u = up(http(sha_reply))
    served = proxy(u, max_body_size=1000)
    assert get(served, "/big", b"Content-Length: 2000\r\n\r\n" + b"b" * 2000, "POST").status == 413
    assert u.requests == []
    body = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(12)) + b"0\r\n\r\n"
    resp = get(served, "/big", b"Transfer-Encoding: chunked\r\n\r\n" + body, "POST")
    assert resp.status == 413
    assert all(r.body == b"" for r in u.requests)       # never a complete over-limit body
    assert get(served, "/small", b"Content-Length: 10\r\n\r\n" + b"s" * 10, "POST").status == 200


def test_a_proxy_route_streams_a_3mib_upload_with_no_limit_set(start, up, tmp_path):
    """eXpServer configs set no body limit: a proxy route takes any size (it streams), while
    a file route of the same server keeps nginx's 1 MiB and refuses more with 413, then
    closes."""
    u = up(http(sha_reply))
    (tmp_path / "files").mkdir()
    served = start(routes=[route(u, path="/up"),
                           {"req_path": "/", "type": "file_serve",
                            "dir_path": str(tmp_path / "files")}])
    data = hashlib.shake_256(b"upload").digest(3 * MiB)
    with Client(served, timeout=10) as c:
        resp = c.get("/up", b"Content-Length: %d\r\n\r\n" % len(data) + data, "POST")
    assert resp.status == 200
    assert resp.body.split()[:2] == [hashlib.sha256(data).hexdigest().encode(), b"3145728"]
    with served.connect() as sock:
        sock.sendall(b"POST /f HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (2 * MiB))
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 413 and headers["connection"] == "close"
        assert r.closed()


def test_concurrent_clients_get_their_own_answers(proxy, up):
    def slow_echo(req: UpRequest, conn: UpConn) -> bytes:
        time.sleep(int(req.target.rsplit(b"-", 1)[1]) % 3 * 0.005)
        return response(200, req.target * 50)
    served = proxy(up(http(slow_echo), "a"), up(http(slow_echo), "b"))
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            with Client(served) as c:
                for i in range(10):
                    path = f"/c{n}-{i}"
                    resp = c.get(path)
                    if resp.body != path.encode() * 50:
                        errors.append(f"{path}: {resp.status} {resp.body[:40]!r}")
        except (OSError, EOFError) as e:
            errors.append(f"client {n}: {e!r}")
    threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert errors == []


def websocket_echo(conn: UpConn) -> None:
    req = conn.read_head()
    if req is None or (req.get(b"upgrade") or b"").lower() != b"websocket":
        conn.send(response(400, b"no upgrade"))
        return
    conn.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
    while True:
        try:
            data = conn.sock.recv(65536)
        except OSError:
            return
        if not data or not conn.send(data):
            return


def test_websocket_upgrade_is_tunnelled(proxy, up):
    u = up(websocket_echo, "ws")
    served = proxy(u)
    c = Client(served)
    c.send(b"GET /chat HTTP/1.1\r\nHost: proxy.test\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")
    resp = c.read(head_only=True)
    assert resp.status == 101
    assert resp.get("upgrade") == "websocket"
    assert "upgrade" in resp.get("connection", "").lower()
    assert resp.get("sec-websocket-accept") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    payload = hashlib.shake_256(b"ws").digest(2 * MiB)
    got = bytearray(c.reader.buf)
    sender = threading.Thread(target=c.send, args=(payload,), daemon=True)
    sender.start()
    while len(got) < len(payload):
        data = c.sock.recv(65536)
        assert data, "tunnel closed early"
        got += data
    assert bytes(got) == payload
    c.close()
    assert wait_for(lambda: u.closed_conns == [1], 2.0), "upstream side of the tunnel left open"


# ---------------------------------------------------------------------------- balancing

def shares(served: Served, n: int, path: str = "/s") -> dict[bytes, int]:
    counts: dict[bytes, int] = {}
    with Client(served) as c:
        for i in range(n):
            resp = c.get(f"{path}{i}")
            assert resp.status == 200
            counts[resp.body] = counts.get(resp.body, 0) + 1
    return counts


def test_weighted_round_robin_shares(proxy, up):
    a, b, c = (up(http(named(n)), n.decode()) for n in (b"a", b"b", b"c"))
    served = proxy({"address": a.address, "weight": 3}, b, {"address": c.address, "weight": 2})
    counts = shares(served, 300)
    assert abs(counts[b"a"] - 150) <= 6, counts
    assert abs(counts[b"b"] - 50) <= 6, counts
    assert abs(counts[b"c"] - 100) <= 6, counts


def test_round_robin_default_equal_shares(proxy, up):
    a, b = up(http(named(b"a")), "a"), up(http(named(b"b")), "b")
    counts = shares(proxy(a, b), 100)
    assert counts == {b"a": 50, b"b": 50}


def test_random_two_uses_every_peer(proxy, up):
    peers = [up(http(named(n)), n.decode()) for n in (b"a", b"b", b"c")]
    counts = shares(proxy(*peers, lb_method="random_two"), 90)
    assert set(counts) == {b"a", b"b", b"c"}, counts
    assert min(counts.values()) >= 10, counts


def test_backup_peer_serves_only_when_primaries_are_down(proxy, up):
    a, spare = up(http(named(b"a")), "a"), up(http(named(b"spare")), "spare")
    served = proxy(a, {"address": spare.address, "backup": True})
    assert shares(served, 10) == {b"a": 10}
    a.stop()
    assert shares(served, 10) == {b"spare": 10}


def test_hostname_upstream(proxy, up):
    u = up(http(named(b"named")), "named")
    served = proxy(f"localhost:{u.port}")
    assert get(served, "/").body == b"named"


def test_least_conn_avoids_the_busy_peer(proxy, up):
    def respond(name: bytes) -> Callable[[UpRequest, UpConn], bytes]:
        def r(req: UpRequest, conn: UpConn) -> bytes:
            if req.target == b"/slow":
                time.sleep(1.5)
            return response(200, name)
        return r
    a, b = up(http(respond(b"a")), "a"), up(http(respond(b"b")), "b")
    served = proxy(a, b, lb_method="least_conn")
    slow = Client(served)
    slow.send(b"GET /slow HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
    assert wait_for(lambda: len(a.requests) + len(b.requests) == 1, 2.0)
    busy = b"a" if a.requests else b"b"
    counts = shares(served, 10, "/fast")
    assert busy not in counts and sum(counts.values()) == 10, counts
    assert slow.read().body == busy
    slow.close()


def test_ip_hash_is_stable_per_client(proxy, up):
    peers = [up(http(named(n)), n.decode()) for n in (b"a", b"b", b"c")]
    served = proxy(*peers, lb_method="ip_hash")
    seen: dict[str, set[bytes]] = {}
    for host in range(2, 22):
        source = f"127.0.0.{host}"
        with Client(served, source=source) as c:
            seen[source] = {c.get(f"/ip{i}").body for i in range(4)}
        with Client(served, source=source) as c:     # a new connection, same client
            seen[source] |= {c.get("/again").body}
    assert all(len(v) == 1 for v in seen.values()), seen       # each client sticks
    assert len(set().union(*seen.values())) >= 2, seen          # and clients are spread
    # XFF carries the real client address the hash used
    assert {r.get(b"x-forwarded-for") for p in peers for r in p.requests} == \
        {s.encode() for s in seen}


def test_ip_hash_adding_a_peer_moves_few_clients(start, up):
    """Consistent hashing: with a fourth peer, only clients that now belong to it move."""
    peers = [up(http(named(n)), n.decode()) for n in (b"a", b"b", b"c", b"d")]
    sources = [f"127.0.0.{i}" for i in range(2, 62)]

    def placement(served: Served) -> dict[str, bytes]:
        out = {}
        for source in sources:
            with Client(served, source=source) as c:
                out[source] = c.get("/").body
        return out
    before = placement(start(routes=[route(*peers[:3], lb_method="ip_hash")]))
    after = placement(start(routes=[route(*peers, lb_method="ip_hash")]))
    moved = [s for s in sources if before[s] != after[s]]
    assert all(after[s] == b"d" for s in moved), {s: (before[s], after[s]) for s in moved}
    assert 0 < len(moved) <= 0.45 * len(sources), len(moved)


def test_failover_when_a_peer_dies(proxy, up):
    a, b = up(http(named(b"a")), "a"), up(http(named(b"b")), "b")
    served = proxy(a, b)
    assert shares(served, 10) == {b"a": 5, b"b": 5}
    a.stop()
    counts = shares(served, 20)     # pooled connections to a are gone, a refuses: all to b
    assert counts == {b"b": 20}


def test_passive_health_skips_a_dead_peer(proxy, up):
    """A peer that resets every connection is tried once, then left alone for fail_timeout."""
    dying = up(reset_after_request, "dying")
    b = up(http(named(b"b")), "b")
    served = proxy(dying, b)
    counts = shares(served, 30)
    assert counts == {b"b": 30}
    assert dying.accepted <= 2, dying.accepted


def test_passive_health_peer_comes_back_after_fail_timeout(proxy, up):
    broken = threading.Event()
    broken.set()

    def flaky(conn: UpConn) -> None:
        if broken.is_set():
            reset_after_request(conn)
        else:
            http(named(b"a"))(conn)
    a, b = up(flaky, "a"), up(http(named(b"b")), "b")
    served = proxy({"address": a.address, "max_fails": 1, "fail_timeout": 0.5}, b)
    assert shares(served, 10) == {b"b": 10}
    broken.clear()
    time.sleep(0.7)
    counts = shares(served, 10)
    assert counts.get(b"a", 0) >= 3, counts


def test_active_health_check_takes_a_peer_out_and_back(proxy, up):
    healthy = {b"a": False, b"b": True}

    def respond(name: bytes) -> Callable[[UpRequest, UpConn], bytes]:
        def r(req: UpRequest, conn: UpConn) -> bytes:
            if req.target == b"/health":
                return response(200 if healthy[name] else 500, b"h")
            return response(200, name)
        return r
    a, b = up(http(respond(b"a")), "a"), up(http(respond(b"b")), "b")
    check = {"path": "/health", "interval": 0.2, "timeout": 0.5, "expect_status": 200,
             "passes": 1, "fails": 1}
    served = proxy(a, b, health_check=check)
    assert wait_for(lambda: b"/health" in a.paths(), 2.0)    # probes are sent
    time.sleep(0.3)
    assert shares(served, 20) == {b"b": 20}                   # a answers 500: out
    healthy[b"a"] = True
    probes = len([p for p in a.paths() if p == b"/health"])
    assert wait_for(lambda: len([p for p in a.paths() if p == b"/health"]) >= probes + 2, 2.0)
    counts = shares(served, 20)
    assert counts.get(b"a", 0) >= 8, counts                   # back in the rotation
    healthy[b"b"] = False
    time.sleep(0.6)
    assert shares(served, 10) == {b"a": 10}


# ---------------------------------------------------------------------------- memory

def test_memory_bounded_for_a_big_upload_to_a_slow_upstream(proxy, up):
    total = 96 * MiB
    got = hashlib.blake2b()
    received = [0]

    def slow_reader(conn: UpConn) -> None:
        req = conn.read_head()
        if req is None:
            return
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(1.0)                         # does not read at all for a while
        left = int(req.get(b"content-length"))
        got.update(conn.buf)
        left -= len(conn.buf)
        received[0] += len(conn.buf)
        while left:
            data = conn.sock.recv(min(left, MiB))
            if not data:
                return
            got.update(data)
            left -= len(data)
            received[0] += len(data)
        conn.send(response(200, b"stored"))
    served = proxy(up(slow_reader, "slow"), max_body_size=128 * MiB)
    pid = served.server.worker_pid
    before = rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_kib(pid))
    threading.Thread(target=sample, daemon=True).start()
    expected = hashlib.blake2b()
    c = Client(served, timeout=15)
    try:
        c.send(b"POST /up HTTP/1.1\r\nHost: proxy.test\r\nContent-Length: %d\r\n\r\n" % total)
        for piece in generated(total, MiB):
            expected.update(piece)
            c.send(piece)
        resp = c.read()
    finally:
        done.set()
        c.close()
    assert (resp.status, resp.body) == (200, b"stored")
    assert received[0] == total and got.digest() == expected.digest()
    growth = (peak[0] - before) * 1024
    assert growth < 32 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"


def test_memory_bounded_for_a_huge_reply_to_a_slow_client(proxy, up):
    total = 256 * MiB

    def serve(conn: UpConn) -> None:
        while (req := conn.read_request()) is not None:
            if req.target != b"/huge":
                conn.send(response(200, b"warm"))
                continue
            conn.send(response(200, length=False).replace(
                b"\r\n\r\n", b"\r\nContent-Length: %d\r\n\r\n" % total, 1))
            for piece in generated(total):
                if not conn.send(piece):
                    return
    served = proxy(up(serve, "huge"))
    pid = served.server.worker_pid
    assert get(served, "/warm").body == b"warm"
    before = rss_kib(pid)
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], rss_kib(pid))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.settimeout(10)
    sock.connect(served.addr)
    try:
        sock.sendall(b"GET /huge HTTP/1.1\r\nHost: proxy.test\r\n\r\n")
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += sock.recv(65536)
        head, _, rest = buf.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert b"content-length: %d" % total in head.lower()
        time.sleep(1.0)                 # a client that does not read at all for a while
        h = hashlib.blake2b(rest)
        got = len(rest)
        view = memoryview(bytearray(MiB))
        next_pause = 32 * MiB
        while got < total:
            n = sock.recv_into(view, min(len(view), total - got))
            assert n, f"closed after {got} bytes"
            h.update(view[:n])
            got += n
            if got >= next_pause:       # and then reads in bursts with pauses
                next_pause += 32 * MiB
                time.sleep(0.2)
    finally:
        done.set()
        sampler.join()
        sock.close()
    expected = hashlib.blake2b()
    for piece in generated(total):
        expected.update(piece)
    assert h.digest() == expected.digest()
    growth = (peak[0] - before) * 1024
    assert growth < 64 * MiB, f"RSS grew by {growth / MiB:.1f} MiB"
