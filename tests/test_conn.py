"""Connection states and deadlines, driven over real sockets on a frozen clock (tests/rig.py).

The examples at the top show the rig; below them, the transition table of
ext/expserver/_conn.pyx row by row: IDLE and HEAD (heads in pieces, the total header
deadline), BODY (Content-Length and chunked bodies read and discarded, the idle body
deadline, Expect: 100-continue), CLOSING and LINGER (Connection: close, HTTP/1.0, the
lingering close), pipelining (in order, stopped while the pipe is full), the send deadline
while blocked, limits and malformed requests (one error answer, then a close), the client
leaving, and the graceful drain. The WAIT and TUNNEL rows need a deferred answer: they are
in tests/test_proxy_core.py.
"""
from __future__ import annotations

import os
import socket
import struct

import pytest

from expserver._conn import Settings
from expserver.response import FileRange
from tests.rig import T0, Rig, open_fds, parse_response, split_responses

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def hello(req):
    return 200, b"Content-Type: text/plain\r\n", b"hello"


@pytest.fixture
def rig():
    r = Rig(hello, keepalive_timeout=75.0, header_timeout=10.0)
    yield r
    r.close()


def test_a_keep_alive_request_leaves_the_connection_idle_without_a_buffer(rig):
    client, conn = rig.connect()
    assert conn.state_name == "IDLE"
    client.send(GET)
    status, headers, body = parse_response(client.take())
    assert (status, body) == (200, b"hello")
    assert conn.state_name == "IDLE"
    assert not conn.holds_buffer
    assert conn.when == pytest.approx(T0 + 75.0)


def test_a_closed_connection_leaves_nothing_in_the_timer_heap(rig):
    before = rig.loop.timer_count
    clients = [rig.connect() for _ in range(50)]
    assert rig.loop.timer_count == before + 50
    for client, _ in clients:
        client.close()
    assert all(conn.state_name == "CLOSED" for _, conn in clients)
    assert rig.loop.timer_count == before
    assert not any(conn.in_heap for _, conn in clients)


def test_idle_connection_closes_at_its_keepalive_deadline(rig):
    client, conn = rig.connect()
    rig.advance(74.9)
    assert conn.state_name == "IDLE"
    rig.advance(0.2)
    assert conn.state_name == "CLOSED"
    assert client.closed()


def test_keepalive_deadline_moves_with_each_request(rig):
    client, conn = rig.connect()
    rig.advance(70)
    client.send(GET)
    client.take()
    rig.advance(70)             # 140 s after the connection, 70 s after its last request
    assert conn.state_name == "IDLE"
    rig.advance(6)
    assert conn.state_name == "CLOSED"


def test_half_a_head_is_answered_408_at_the_header_deadline_then_lingers(rig):
    client, conn = rig.connect()
    client.send(b"GET / HTTP/1.1\r\nHo")
    assert conn.state_name == "HEAD"
    rig.advance(9.9)
    assert conn.state_name == "HEAD"
    rig.advance(0.2)
    status, headers, _ = parse_response(client.take())
    assert status == 408 and headers["connection"] == "close"
    assert conn.state_name == "LINGER"
    client.close()
    assert conn.state_name == "CLOSED"


def test_no_descriptor_is_left_behind(rig):
    before = open_fds()
    for _ in range(20):
        client, conn = rig.connect()
        client.send(GET)
        client.take()
        client.close()
    assert open_fds() <= before | {c.sock.fileno() for c in rig.clients if c.sock.fileno() >= 0}


def test_settings_defaults_match_the_config_declarations():
    """The core's own defaults (used only by tests and embedders) are the config's."""
    from expserver import config
    s = Settings()
    shared = [f for f in config.ROOT.fields if hasattr(s, f.name)]
    assert {f.name for f in shared} >= {"keepalive_timeout", "header_timeout", "send_timeout",
                                       "body_timeout", "max_body_size", "max_connections"}
    for field in shared:
        assert getattr(s, field.name) == config.ROOT.defaults[field.name], field.name


# ============================================================ the transition table, row by row
# An app whose answers a test can choose by path; it records what it was asked.
BIG = bytes(range(256)) * 1024          # 256 KiB: more than a small socket and pipe hold


class App:
    def __init__(self):
        self.calls = []

    def __call__(self, req):
        self.calls.append(req.path)
        if req.path == b"/big":
            return 200, b"", BIG
        if req.path == b"/stream":
            return 200, b"", iter([b"part1", b"part2"])
        return 200, b"Content-Type: text/plain\r\n", b"echo " + req.path


@pytest.fixture
def app():
    return App()


@pytest.fixture
def make_rig(app):
    """A rig around ``app`` with chosen settings; closed after the test."""
    made = []

    def make(**settings):
        settings.setdefault("keepalive_timeout", 75.0)
        settings.setdefault("header_timeout", 10.0)
        made.append(Rig(app, **settings))
        return made[-1]

    yield make
    for r in made:
        r.close()


def get(path=b"/", *fields):
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(f + b"\r\n" for f in fields) \
        + b"\r\n"


def bodies(responses):
    return [body for _, _, body in responses]


def read_all(client, rounds=10000):
    """Read until the server has nothing more to send: a turn of the loop after the client
    made room brings nothing new."""
    size = -1
    for _ in range(rounds):
        if len(client.pump()) == size:
            return client.received
        size = len(client.received)
    raise AssertionError("the server never stopped sending")


# --------------------------------------------------------------------------- IDLE, HEAD
def test_idle_head_idle_a_head_in_pieces(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    rig.advance(5)
    client.send(b"GET /a HTTP/1.1\r\n")
    assert conn.state_name == "HEAD"
    assert conn.when == T0 + 5 + 10            # header_timeout from the head's first byte
    rig.advance(3)
    client.send(b"Host: x\r\n\r\n")
    assert bodies(client.responses()) == [b"echo /a"]
    assert conn.state_name == "IDLE"
    assert conn.when == T0 + 8 + 75
    assert not conn.holds_buffer


def test_header_deadline_is_total_not_reset_by_each_byte(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    for piece in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"X-A: 1\r\n"):
        client.send(piece)
        rig.advance(3)
    assert conn.state_name == "HEAD"        # 9 s after the first byte
    client.send(b"X-B: 2\r\n")
    rig.advance(1.1)
    status, headers, _ = parse_response(client.take())
    assert status == 408 and headers["connection"] == "close"


def test_a_head_byte_by_byte_is_answered_once(make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    for b in get(b"/slow"):
        client.send(bytes([b]))
    assert bodies(client.responses()) == [b"echo /slow"]
    assert app.calls == [b"/slow"]
    assert conn.state_name == "IDLE"


# --------------------------------------------------------------------------- BODY
def test_head_body_idle_a_content_length_body_is_discarded_then_the_next_request(make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"POST /form HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123")
    assert bodies(client.responses()) == [b"echo /form"]   # answered before the body is read
    assert conn.state_name == "BODY"
    client.send(b"456789" + get(b"/next"))
    assert bodies(client.responses()) == [b"echo /form", b"echo /next"]
    assert app.calls == [b"/form", b"/next"]
    assert conn.state_name == "IDLE"


@pytest.mark.parametrize("piece", [1, 7, 1000], ids=["byte-by-byte", "7-byte-pieces", "whole"])
def test_a_chunked_body_is_discarded_then_the_next_request(make_rig, app, piece):
    rig = make_rig()
    client, conn = rig.connect()
    data = (b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n3;name=value\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n" + get(b"/after"))
    for i in range(0, len(data), piece):
        client.send(data[i:i + piece])
    assert bodies(client.responses()) == [b"echo /up", b"echo /after"]
    assert app.calls == [b"/up", b"/after"]
    assert conn.state_name == "IDLE"


def test_a_malformed_chunked_body_after_the_answer_closes_without_a_second_answer(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"0x5\r\nhello\r\n0\r\n\r\n" + get(b"/after"))
    raw = client.pump()
    assert raw.count(b"HTTP/1.1 ") == 1
    assert bodies(client.responses()) == [b"echo /"]
    assert client.closed()
    assert conn.state_name in ("LINGER", "CLOSED")


def test_body_timeout_is_idle_time_and_closes(make_rig):
    rig = make_rig(body_timeout=20.0)
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
    assert conn.state_name == "BODY" and conn.when == T0 + 20
    rig.advance(19.9)
    client.send(b"x" * 10)                  # progress: the deadline moves
    assert conn.when == pytest.approx(T0 + 19.9 + 20)
    rig.advance(19.9)
    assert conn.state_name == "BODY"
    rig.advance(0.2)
    assert conn.state_name == "CLOSED"
    assert bodies(client.responses()) == [b"echo /"]
    assert client.closed()


def test_expect_100_continue_on_a_handler_that_reads_no_body_is_answered_then_closed(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    raw = client.pump()
    assert b"100 Continue" not in raw
    (status, headers, body), = client.responses()
    assert (status, body, headers["connection"]) == (200, b"echo /", "close")
    assert conn.state_name == "LINGER"
    assert client.closed()                  # our side is shut: EOF
    client.close()
    assert conn.state_name == "CLOSED"


# --------------------------------------------------------------------------- CLOSING, LINGER
def test_connection_close_goes_closing_linger_closed(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(get(b"/", b"Connection: close"))
    (status, headers, body), = client.responses()
    assert (status, body, headers["connection"]) == (200, b"echo /", "close")
    assert conn.state_name == "LINGER"
    assert conn.when == T0 + 5.0
    assert not conn.holds_buffer
    assert client.closed()
    client.close()
    assert conn.state_name == "CLOSED"


def test_a_lingering_connection_discards_what_the_client_sends_and_closes_after_5_s(
        make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(get(b"/", b"Connection: close"))
    client.take()
    client.send(get(b"/ignored"))
    assert client.take() == b""
    assert app.calls == [b"/"]
    assert rig.spins() == 0
    rig.advance(4.9)
    assert conn.state_name == "LINGER"
    rig.advance(0.2)
    assert conn.state_name == "CLOSED"


def test_closing_lasts_while_the_last_answer_is_blocked(make_rig):
    rig = make_rig()
    client, conn = rig.small_pair()
    client.send(get(b"/big", b"Connection: close"))
    assert conn.state_name == "CLOSING"     # the answer does not fit the socket
    assert rig.spins() == 0
    raw = read_all(client)
    status, headers, body = parse_response(raw)
    assert (status, headers["connection"], body) == (200, "close", BIG)
    assert conn.state_name == "LINGER"
    assert client.closed()


@pytest.mark.parametrize("request_bytes, closes, connection", [
    (b"GET / HTTP/1.0\r\n\r\n", True, "close"),
    (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", False, "keep-alive"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False, None),
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", True, "close"),
], ids=["1.0", "1.0-keep-alive", "1.1", "1.1-close"])
def test_keep_alive_by_version_and_connection_field(make_rig, request_bytes, closes, connection):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(request_bytes)
    (status, headers, body), = client.responses()
    assert (status, body) == (200, b"echo /")
    assert headers.get("connection") == connection
    assert client.closed() is closes
    assert (conn.state_name == "IDLE") is not closes


def test_a_1_0_stream_is_delimited_by_the_close(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    raw = read_all(client)
    status, headers, body = parse_response(raw)
    assert status == 200 and headers["connection"] == "close"
    assert "content-length" not in headers and "transfer-encoding" not in headers
    assert body == b"part1part2"
    assert client.closed()


def test_a_1_1_stream_is_chunked_and_keeps_the_connection(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(get(b"/stream") + get(b"/after"))
    (s1, h1, b1), (s2, h2, b2) = client.responses()
    assert h1["transfer-encoding"] == "chunked" and b1 == b"part1part2"
    assert b2 == b"echo /after"
    assert conn.state_name == "IDLE"


@pytest.mark.parametrize("status", [204, 304])
def test_a_bodiless_status_with_a_file_sends_the_head_and_closes_the_file(tmp_path, status):
    path = tmp_path / "f"
    path.write_bytes(b"content")
    fds = []

    def handler(req):
        fds.append(os.open(path, os.O_RDONLY))
        return status, b"ETag: \"e\"\r\n", FileRange(fds[-1], 0, 7)

    rig = Rig(handler)
    try:
        client, conn = rig.connect()
        client.send(get() + get())
        responses = client.responses()
        assert [(s, h["etag"], b) for s, h, b in responses] == [(status, '"e"', b"")] * 2
        assert b"content" not in client.received
        assert conn.state_name == "IDLE"
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        rig.close()


def test_a_file_range_is_sent_and_its_file_closed(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"0123456789")
    fds = []

    def handler(req):
        fds.append(os.open(path, os.O_RDONLY))
        return 200, b"", FileRange(fds[-1], 2, 5)

    rig = Rig(handler)
    try:
        client, conn = rig.connect()
        client.send(get() + b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = client.pump()
        (s1, h1, b1), = split_responses(raw)[0][:1]
        assert (s1, h1["content-length"], b1) == (200, "5", b"23456")
        assert raw.endswith(b"Content-Length: 5\r\n\r\n")     # HEAD: the length, no body
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        rig.close()


# --------------------------------------------------------------------------- pipelining
def test_three_pipelined_requests_in_one_send_are_answered_in_order(make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(get(b"/1") + get(b"/2") + get(b"/3"))
    assert bodies(client.responses()) == [b"echo /1", b"echo /2", b"echo /3"]
    assert app.calls == [b"/1", b"/2", b"/3"]
    assert conn.state_name == "IDLE"


def test_pipelining_stops_while_the_pipe_is_full_and_resumes_when_the_client_reads(
        make_rig, app):
    rig = make_rig(pipe_threshold=16384)
    client, conn = rig.small_pair()
    client.send(get(b"/big") + get(b"/a") + get(b"/b"))
    assert app.calls == [b"/big"]           # the rest waits, unparsed
    assert conn.buffered == len(get(b"/a") + get(b"/b"))
    assert rig.spins() == 0                 # and costs no events while it waits
    rig.advance(30)
    assert app.calls == [b"/big"]
    read_all(client)
    assert bodies(client.responses()) == [BIG, b"echo /a", b"echo /b"]
    assert app.calls == [b"/big", b"/a", b"/b"]
    assert conn.state_name == "IDLE"


def test_a_hundred_pipelined_requests_are_all_answered_in_order(make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"".join(get(b"/%d" % i) for i in range(100)))
    assert bodies(client.responses()) == [b"echo /%d" % i for i in range(100)]
    assert conn.state_name == "IDLE"


# --------------------------------------------------------------------------- send deadline
def test_send_timeout_closes_after_no_progress_and_not_before(make_rig):
    rig = make_rig(send_timeout=30.0)
    client, conn = rig.small_pair()
    client.send(get(b"/big"))
    assert conn.when == T0 + 30                 # blocked: the send deadline governs
    rig.advance(29.9)
    assert conn.state_name == "IDLE" and not client.eof
    got = len(client.take())                    # the client reads a little: progress
    assert 0 < got < len(BIG)
    rig.step()
    assert conn.when == pytest.approx(T0 + 29.9 + 30)
    rig.advance(29.9)
    assert conn.state_name == "IDLE"
    rig.advance(0.2)
    assert conn.state_name == "CLOSED"
    assert client.closed()
    assert got + len(client.received) < len(BIG)   # cut: never all of it


def test_a_client_that_keeps_reading_is_never_cut(make_rig):
    rig = make_rig(send_timeout=30.0)
    client, conn = rig.small_pair()
    client.send(get(b"/big"))
    for _ in range(10000):
        rig.advance(20)                         # 20 s between reads: each is progress
        client.pump()
        if len(client.received) > len(BIG):
            break
    assert bodies(client.responses()) == [BIG]
    assert conn.state_name == "IDLE"


# --------------------------------------------------------------------------- limits, errors
def test_a_body_over_max_body_size_is_answered_413_and_closed(make_rig, app):
    rig = make_rig(max_body_size=100)
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"x" * 101)
    (status, headers, _), = client.responses()
    assert status == 413 and headers["connection"] == "close"
    assert app.calls == []
    assert client.closed()


def test_a_body_of_exactly_max_body_size_is_read(make_rig, app):
    rig = make_rig(max_body_size=100)
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 100
                + get(b"/next"))
    assert bodies(client.responses()) == [b"echo /", b"echo /next"]
    assert conn.state_name == "IDLE"


def test_a_chunked_body_over_max_body_size_is_not_read_on(make_rig, app):
    rig = make_rig(max_body_size=100)
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"64\r\n" + b"x" * 100 + b"\r\n1\r\nx\r\n")      # 101 bytes, more to come
    client.send(b"0\r\n\r\n" + get(b"/next"))
    assert bodies(client.responses()) == [b"echo /"]    # its answer was already out
    assert app.calls == [b"/"]
    assert client.closed()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET / HTTP/1.1\nHost: x\n\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: 1\r\n" * 101 + b"\r\n", 431),
], ids=["bare-LF", "space-before-colon", "no-host", "bad-length", "length-and-chunked",
        "unknown-coding", "http-2", "long-target", "too-many-fields"])
def test_a_malformed_request_gets_one_error_answer_then_a_close(make_rig, app, request_bytes,
                                                                 status):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(request_bytes + get(b"/never"))
    raw = client.pump()
    assert raw.count(b"HTTP/1.1 ") == 1         # never a second response
    (got, headers, _), = client.responses()
    assert (got, headers["connection"]) == (status, "close")
    assert app.calls == []
    assert conn.state_name == "LINGER"
    assert client.closed()


def test_a_malformed_request_behind_a_good_one_gets_its_error_after_the_answer(make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(get(b"/ok") + b"BAD\r\n\r\n" + get(b"/never"))
    responses = client.responses()
    assert [s for s, _, _ in responses] == [200, 400]
    assert app.calls == [b"/ok"]
    assert client.closed()


# --------------------------------------------------------------------------- the client leaves
def test_client_eof_after_a_complete_request_is_answered_then_closed(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.sock.sendall(get(b"/1") + get(b"/2"))
    client.shut()
    assert bodies(client.responses()) == [b"echo /1", b"echo /2"]
    assert conn.state_name == "CLOSED"
    assert client.closed()


def test_client_eof_in_the_middle_of_a_head_closes_without_an_answer(make_rig, app):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"GET / HTTP/1.1\r\nHo")
    client.shut()
    assert conn.state_name == "CLOSED"
    assert client.closed() and client.received == b""
    assert app.calls == []


def test_a_client_reset_closes_the_connection_and_the_next_client_is_served(make_rig):
    rig = make_rig()
    client, conn = rig.connect()
    client.send(b"GET / HTTP/1.1\r\n")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()                              # RST
    assert conn.state_name == "CLOSED"
    other, _ = rig.connect()
    other.send(get())
    assert bodies(other.responses()) == [b"echo /"]


# --------------------------------------------------------------------------- drain
def test_drain_closes_an_idle_connection_after_a_grace_second(make_rig):
    """A request already on its way when the drain began is answered, not met by a close."""
    rig = make_rig()
    client, conn = rig.connect()
    client.send(get())
    client.take()
    rig.core.drain()
    assert conn.state_name == "IDLE" and conn.when == pytest.approx(rig.loop.now + 1.0)
    rig.advance(1.01)
    assert conn.state_name == "CLOSED"
    assert client.closed()
    assert not rig.core.connections


def test_drain_lets_a_busy_connection_finish_its_request_with_connection_close(make_rig):
    rig = make_rig()
    idle, idle_conn = rig.connect()
    client, conn = rig.connect()
    client.send(b"GET /last HTTP/1.1\r\nHost: x\r\n")     # half a head
    rig.core.drain()
    rig.advance(1.01)
    assert idle_conn.state_name == "CLOSED"
    assert conn.state_name == "HEAD"
    client.send(b"\r\n" + get(b"/dropped"))
    responses = client.responses()
    assert [(s, h["connection"], b) for s, h, b in responses] == [(200, "close", b"echo /last")]
    assert client.closed()


def test_drain_lets_an_answer_being_sent_finish_then_closes(make_rig):
    rig = make_rig()
    client, conn = rig.small_pair()
    client.send(get(b"/big"))
    rig.core.drain()
    assert conn.state_name == "CLOSING"
    read_all(client)
    assert bodies(client.responses()) == [BIG]
    assert client.closed()


def test_a_connection_accepted_while_draining_gets_one_answer(make_rig):
    rig = make_rig()
    rig.core.drain()
    client, conn = rig.connect()
    client.send(get(b"/1") + get(b"/2"))
    responses = client.responses()
    assert [(h["connection"], b) for _, h, b in responses] == [("close", b"echo /1")]
    assert client.closed()
