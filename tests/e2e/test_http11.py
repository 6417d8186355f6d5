"""HTTP/1.1 connection behaviour seen from the wire: keep-alive, pipelining, HTTP/1.0,
``Connection: close``, HEAD, methods a static route does not allow, ``Expect``, the
request-target forms, and the ``Server``/``Date`` fields on every response."""
from __future__ import annotations

import email.utils
import re
import socket
import time

import pytest

from .conftest import Reader, request

HELLO = b"hello\n"
BIG = bytes(range(256)) * 1200          # 300 KiB: more than one pipe's worth per response


def raw_head(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bytes]:
    """Read up to the end of one response head: (head without the blank line, extra bytes)."""
    sock.settimeout(timeout)
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise EOFError(f"closed after {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def fields(head: bytes) -> list[tuple[str, str]]:
    """The field lines of a raw head as (lower-case name, value), in order."""
    out = []
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        out.append((name.lower(), value.strip()))
    return out


IMF_FIXDATE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-3][0-9] "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-2][0-9]:[0-5][0-9]:[0-6][0-9] GMT")


def assert_server_and_date(headers: dict[str, str]) -> None:
    assert headers.get("server") == "eXpServer"
    date = headers.get("date", "")
    assert IMF_FIXDATE.fullmatch(date), f"Date is not an IMF-fixdate: {date!r}"
    when = email.utils.parsedate_to_datetime(date).timestamp()
    assert abs(when - time.time()) < 60


@pytest.fixture(scope="module")
def served(module_served):
    """Every test here uses its own connections, so they share one server."""
    s = module_served
    (s.root / "a.txt").write_bytes(HELLO)
    (s.root / "b.html").write_bytes(b"<p>b</p>\n")
    (s.root / "big.bin").write_bytes(BIG)
    return s


GET_A = b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"


def test_keep_alive_serves_many_requests_on_one_connection(served):
    with served.connect() as sock:
        r = Reader(sock)
        for i in range(20):
            path = (b"/a.txt", b"/b.html", b"/nope")[i % 3]
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
            status, headers, body = r.response()
            assert status == (200, 200, 404)[i % 3]
            assert "connection" not in headers     # HTTP/1.1 keeps alive without saying so
            if i % 3 == 0:
                assert body == HELLO
        # the client closes: the server then closes its side too
        sock.shutdown(socket.SHUT_WR)
        assert r.closed()


def test_pipelined_mix_answered_in_order(served):
    with served.connect() as sock:
        sock.sendall(
            b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /missing HTTP/1.1\r\nHost: x\r\n\r\n"
            b"HEAD /b.html HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /b.html HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        r = Reader(sock)
        assert r.response()[::2] == (200, HELLO)
        status, headers, _ = r.response()
        assert status == 404 and headers["content-type"] == "text/html"
        status, headers, _ = r.response(head_only=True)
        assert status == 200 and headers["content-length"] == "9"
        assert r.response()[::2] == (200, b"<p>b</p>\n")
        assert r.response()[::2] == (200, BIG)
        # nothing more: five requests, five responses, and the connection stays open
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)
        sock.sendall(GET_A)
        assert Reader(sock).response()[::2] == (200, HELLO)


def test_pipelined_responses_larger_than_the_pipe(served):
    """Requests queued behind a full pipe are answered once the client reads."""
    n = 40                                  # 40 x 300 KiB, far beyond one pipe
    with served.connect(timeout=10) as sock:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n" * (n - 1)
                     + b"GET /a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        time.sleep(0.3)                     # let the server fill the pipe and stop
        r = Reader(sock, timeout=10)
        for _ in range(n - 1):
            assert r.response()[::2] == (200, BIG)
        status, headers, body = r.response()
        assert (status, body, headers["connection"]) == (200, HELLO, "close")
        assert r.closed()


def test_http10_closes_by_default(served):
    with served.connect() as sock:
        sock.sendall(b"GET /a.txt HTTP/1.0\r\n\r\n")
        r = Reader(sock)
        status, headers, body = r.response()
        assert (status, body) == (200, HELLO)
        assert headers.get("connection", "close").lower() == "close"
        assert r.closed()


def test_http10_keep_alive_when_asked(served):
    with served.connect() as sock:
        r = Reader(sock)
        for _ in range(3):
            sock.sendall(b"GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = r.response()
            assert (status, body) == (200, HELLO)
            assert headers["connection"].lower() == "keep-alive"
        # and a 404 keeps it alive too
        sock.sendall(b"GET /nope HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
        status, headers, _ = r.response()
        assert status == 404 and headers["connection"].lower() == "keep-alive"
        sock.sendall(b"GET /a.txt HTTP/1.0\r\n\r\n")
        assert r.response()[::2] == (200, HELLO)
        assert r.closed()


def test_connection_close_in_http11(served):
    with served.connect() as sock:
        # the second request must never be answered: the first asked to close
        sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" + GET_A)
        r = Reader(sock)
        status, headers, body = r.response()
        assert (status, body) == (200, HELLO)
        assert headers["connection"] == "close"
        assert r.closed()


def test_connection_close_is_a_token_in_a_list(served):
    with served.connect() as sock:
        sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nConnection: TE, Close\r\n\r\n")
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 200 and headers["connection"] == "close"
        assert r.closed()


@pytest.mark.parametrize("path", [b"/a.txt", b"/big.bin", b"/", b"/nope"])
def test_head_has_the_headers_of_get_and_no_body(served, path):
    with served.connect() as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
        get_head, rest = raw_head(sock)
        get_fields = fields(get_head)
        length = int(dict(get_fields)["content-length"])
        while len(rest) < length:
            rest += sock.recv(65536)
        assert len(rest) == length
        sock.sendall(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % path + GET_A)
        head_head, rest = raw_head(sock)
        assert head_head.split(b"\r\n")[0] == get_head.split(b"\r\n")[0]
        assert [f for f in fields(head_head) if f[0] != "date"] == \
            [f for f in get_fields if f[0] != "date"]
        # no body: the next bytes are the next response
        while len(rest) < 12:
            rest += sock.recv(65536)
        assert rest.startswith(b"HTTP/1.1 200")


def test_post_to_static_route_is_405_and_keeps_the_connection(served):
    with served.connect() as sock:
        r = Reader(sock)
        sock.sendall(b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello=world")
        status, headers, _ = r.response()
        assert status == 405
        assert headers["allow"] == "GET, HEAD"
        assert_server_and_date(headers)
        sock.sendall(GET_A)
        assert r.response()[::2] == (200, HELLO)


def test_405_then_body_arriving_later_is_discarded(served):
    """The 405 is sent before the body arrives; the body must not be read as a request."""
    with served.connect() as sock:
        r = Reader(sock)
        body = b"GET /b.html HTTP/1.1\r\nHost: x\r\n\r\n"      # a body shaped like a request
        sock.sendall(b"PUT /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert r.response()[0] == 405
        time.sleep(0.1)
        sock.sendall(body)
        sock.sendall(GET_A)
        assert r.response()[::2] == (200, HELLO)


def test_405_with_chunked_body_then_pipelined_request(served):
    with served.connect() as sock:
        sock.sendall(b"POST /a.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5;ext=1\r\nhello\r\n10\r\nGET /b.html HTTP\r\n0\r\nTrailer: x\r\n\r\n"
                     + GET_A)
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert r.response()[::2] == (200, HELLO)
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            sock.recv(1)


def test_405_with_content_length_body_pipelined(served):
    with served.connect() as sock:
        sock.sendall(b"DELETE /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde"
                     + GET_A)
        r = Reader(sock)
        assert r.response()[0] == 405
        assert r.response()[::2] == (200, HELLO)


def test_expect_100_continue_on_static_route_gets_a_final_response(served):
    """Observed behaviour: the route does not want the body, so the server answers at once
    with the final 405 (no ``100 Continue``), says ``Connection: close`` and closes, since it
    cannot know whether the client will send the body anyway (RFC 9110 10.1.1 allows both
    closing and discarding). The client reads the whole answer, even if it then sends the
    body, and nothing after it is taken as a request."""
    with served.connect() as sock:
        sock.sendall(b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 35\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        t0 = time.monotonic()
        r = Reader(sock)
        status, headers, body = r.response()
        assert time.monotonic() - t0 < 2       # no waiting for a body
        assert status == 405 and headers["allow"] == "GET, HEAD"
        assert headers["connection"] == "close"
        assert b"405" in body
        try:
            sock.sendall(GET_A + GET_A[:3])    # the "body", shaped like a request
        except OSError:
            pass
        assert r.closed()


def test_expect_100_continue_on_get_for_a_file(served):
    with served.connect() as sock:
        sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        status, _, body = Reader(sock).response()
        assert (status, body) == (200, HELLO)       # a final response, never a bare 100


def test_unknown_method_is_501(served):
    with served.connect() as sock:
        r = Reader(sock)
        sock.sendall(b"FOO /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = r.response()
        assert status == 501
        assert_server_and_date(headers)
        sock.sendall(GET_A)                         # a framable request: still usable
        assert r.response()[::2] == (200, HELLO)


def test_lower_case_method_is_not_get(served):
    status, _, _ = request(served, b"get /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status in (405, 501)


@pytest.mark.parametrize("raw", [
    GET_A,
    b"HEAD /a.txt HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /a.txt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
    b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /a.txt HTTP/1.0\r\n\r\n",
    b"GET /a.txt HTTP/1.1\r\n\r\n",                          # 400: no Host
    b"GET /a.txt HTTP/2.0\r\nHost: x\r\n\r\n",               # 505
    b"GET /a.txt HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",   # 501
], ids=["get", "head", "404", "listing", "405", "501", "http10", "400", "505", "501-te"])
def test_every_response_has_server_and_date(served, raw):
    status, headers, _ = request(served, raw, head_only=raw.startswith(b"HEAD"))
    assert 200 <= status < 600
    assert_server_and_date(headers)


def test_if_none_match_304_has_server_and_date_and_no_body(served):
    status, headers, _ = request(served, GET_A)
    etag = headers["etag"]
    with served.connect() as sock:
        sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nIf-None-Match: %s\r\n\r\n"
                     % etag.encode() + GET_A)
        r = Reader(sock)
        status, headers, body = r.response()
        assert (status, body) == (304, b"")
        assert_server_and_date(headers)
        assert r.response()[::2] == (200, HELLO)   # no stray body bytes in between


def test_absolute_form_target(served):
    status, _, body = request(served, b"GET http://x/a.txt HTTP/1.1\r\nHost: y\r\n\r\n")
    assert (status, body) == (200, HELLO)
    status, _, body = request(served, b"GET http://x:8080/a.txt?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (200, HELLO)


def test_absolute_form_authority_selects_the_server(start, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f.txt").write_bytes(b"from a\n")
    (b / "f.txt").write_bytes(b"from b\n")
    served = start(servers=[
        {"hostnames": ["a.test"], "routes": [
            {"req_path": "/", "type": "file_serve", "dir_path": str(a)}]},
        {"hostnames": ["b.test"], "routes": [
            {"req_path": "/", "type": "file_serve", "dir_path": str(b)}]},
    ])
    # RFC 9112 3.2.2: the target's authority wins over Host
    status, _, body = request(served, b"GET http://a.test/f.txt HTTP/1.1\r\nHost: b.test\r\n\r\n")
    assert (status, body) == (200, b"from a\n")
    status, _, body = request(served, b"GET /f.txt HTTP/1.1\r\nHost: B.Test:80\r\n\r\n")
    assert (status, body) == (200, b"from b\n")
    status, _, _ = request(served, b"GET /f.txt HTTP/1.1\r\nHost: c.test\r\n\r\n")
    assert status == 404


def test_options_asterisk(served):
    """``OPTIONS *`` is valid HTTP (RFC 9112 3.2.4): it must get one well-formed answer that
    is neither a 400 nor a 5xx and does not cost the connection. Observed: 404 (no route
    matches "*"); Go's server and Apache answer 200 with ``Allow``, nginx 400."""
    with served.connect() as sock:
        r = Reader(sock)
        sock.sendall(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, _ = r.response()
        assert status not in (400,) and status < 500
        assert_server_and_date(headers)
        sock.sendall(GET_A)
        assert r.response()[::2] == (200, HELLO)


def test_asterisk_only_with_options(served):
    status, _, _ = request(served, b"GET * HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 400


def test_http_client_keep_alive(served):
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("GET", "/a.txt")
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, HELLO)
        sock = conn.sock
        conn.request("HEAD", "/big.bin")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == str(len(BIG))
        assert resp.read() == b""
        conn.request("GET", "/big.bin")
        resp = conn.getresponse()
        assert resp.read() == BIG
        assert conn.sock is sock                  # one connection throughout
    finally:
        conn.close()


def test_curl_reuses_the_connection(served):
    import shutil
    import subprocess
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(
        [curl, "-sS", "-v", served.url("/a.txt"), served.url("/b.html"), served.url("/a.txt")],
        capture_output=True, timeout=20, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout == HELLO + b"<p>b</p>\n" + HELLO
    err = out.stderr.decode()
    assert err.count("Re-using existing connection") + err.count("Reusing existing") >= 2 \
        or err.count("Connected to") == 1, err
