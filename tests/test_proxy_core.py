"""Reverse proxy exchanges (ext/expserver/_proxy.pyx) against in-test upstreams, on the rig.

Each test plays the upstream by hand (tests.rig.Upstream: accept, read, answer byte for
byte) and checks what the client gets, what the upstream gets, whether the upstream
connection is pooled or closed, and how the Exchange ended (``outcome_name``, reachable
through the rig's handler wrapper). Covered, by the Exchange states of the module
docstring:

* AWAIT -> RELAY -> DONE (complete): relaying exactly (hop-by-hop fields dropped), every
  body framing, 1xx skipped, the pool (returned, reused, forgotten when the upstream closes
  or the idle timeout passes), pipelined requests behind a proxied answer;
* AWAIT -> AWAIT (retry) / DONE (answered): refused connects, empty replies, cut or invalid
  heads, the read timeout (504), stale pooled connections, bodies over the route's limit;
* RELAY -> DONE (cut): an upstream that breaks off inside a framed body;
* any -> DONE (aborted): the client going away, a malformed chunked request body;
* TUNNEL after a 101;
* backpressure both ways: a request body faster than the upstream reads, a response body
  faster than the client reads.
"""
from __future__ import annotations

import socket

import pytest

from tests.rig import ProxyRig, Refusing, Upstream, leaked, open_fds, parse_response, send_some

OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


# ---------------------------------------------------------------------------- helpers
@pytest.fixture
def closing():
    """Things to close after the test (upstream stand-ins, rigs), in reverse order."""
    things = []
    yield things
    for thing in reversed(things):
        thing.close()


@pytest.fixture
def upstream(closing):
    up = Upstream()
    closing.append(up)
    return up


def proxy(closing, upstreams, settings=None, **route):
    rig = ProxyRig(upstreams, settings, **route)
    closing.insert(0, rig)          # closed last: the upstreams close first
    return rig


def get(path=b"/", *fields):
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(f + b"\r\n" for f in fields) \
        + b"\r\n"


def post(body, path=b"/"):
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) \
        + body


def forwarded(method=b"GET", path=b"/", extra=b""):
    """The head the proxy sends upstream for a request from the rig's client."""
    return (method + b" " + path + b" HTTP/1.1\r\n" + extra +
            b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: x\r\nHost: x\r\n\r\n")


def outcome(rig):
    (ex,) = rig.exchanges
    return ex.state_name, ex.outcome_name


def serve_one(rig, up, response, request=None):
    """Accept the proxy's connection, check the request, answer ``response``."""
    conn = up.accept(rig)
    got = up.read(conn, rig)
    if request is not None:
        assert got == request
    conn.sendall(response)
    rig.step()
    return conn


# ---------------------------------------------------------------------------- relaying
def test_a_get_is_relayed_exactly_and_the_upstream_connection_pooled(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(b"GET /x?y HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-drop\r\n"
                b"X-Drop: 1\r\nX-Keep: 2\r\nTE: trailers\r\nKeep-Alive: 5\r\n\r\n")
    assert conn.state_name == "WAIT"
    up = upstream.accept(rig)
    # hop-by-hop fields, and the ones the client's Connection names, stay behind
    assert upstream.read(up, rig) == forwarded(path=b"/x?y", extra=b"x-keep: 2\r\n")
    up.sendall(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: keep-alive, x-b\r\nX-B: drop\r\n"
               b"Keep-Alive: timeout=5\r\nProxy-Connection: x\r\nContent-Length: 5\r\n"
               b"X-Z: last\r\n\r\nhello")
    assert client.take() == (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nContent-Length: 5\r\n"
                             b"X-Z: last\r\n\r\nhello")
    assert outcome(rig) == ("DONE", "complete")
    assert conn.state_name == "IDLE"
    assert rig.route.idle_count() == 1


@pytest.mark.parametrize("response, relayed, pooled", [
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", True),
    (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
     b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n", True),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
     b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n", True),
    (b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",
     b"HTTP/1.1 200 \r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n" + OK5,
     OK5, True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
     b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
    (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
     b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", True),
], ids=["chunked-rechunked", "204", "304", "no-reason", "1xx-skipped", "http-1.0",
        "http-1.0-keep-alive", "upstream-close", "404"])
def test_response_framings_are_relayed(closing, upstream, response, relayed, pooled):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    serve_one(rig, upstream, response, forwarded())
    assert client.take() == relayed
    assert outcome(rig) == ("DONE", "complete")
    assert conn.state_name == "IDLE"
    assert rig.route.idle_count() == (1 if pooled else 0)


def test_a_close_delimited_body_is_rechunked_for_a_1_1_client(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\n\r\nhel")
    up.sendall(b"lo")
    rig.step()
    up.close()
    assert client.take() == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n")
    assert outcome(rig) == ("DONE", "complete")
    assert conn.state_name == "IDLE" and rig.route.idle_count() == 0


def test_a_chunked_body_goes_close_delimited_to_a_1_0_client(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(b"GET / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
    serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\n\r\n")
    assert client.take() == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nhello"
    assert client.closed()
    assert rig.route.idle_count() == 1      # the upstream's connection is still good


def test_a_head_request_gets_the_length_and_no_body(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\n\r\n" + get(b"/next"))
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
                   forwarded(b"HEAD"))
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    assert upstream.read(up, rig) == forwarded(path=b"/next")   # the same connection
    up.sendall(OK5)
    assert client.take() == OK5


def test_a_client_connection_close_ends_the_client_connection_not_the_upstream_one(
        closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get(b"/", b"Connection: close"))
    serve_one(rig, upstream, OK5)
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    assert conn.state_name == "LINGER"      # WAIT -> CLOSING -> LINGER
    assert client.closed()
    assert rig.route.idle_count() == 1


# ---------------------------------------------------------------------------- the pool
def test_a_pooled_connection_is_reused_by_the_next_request(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get(b"/1"))
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"2\r\n#1\r\n0\r\n\r\n")
    assert client.responses()[0][2] == b"#1"
    assert rig.route.idle_count() == 1
    client.send(get(b"/2"))
    assert not upstream.pending()           # no new connection
    assert upstream.read(up, rig) == forwarded(path=b"/2")
    assert rig.route.idle_count() == 0      # taken
    up.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n#2")
    assert [b for _, _, b in client.responses()] == [b"#1", b"#2"]
    assert rig.route.idle_count() == 1


def test_a_pooled_connection_the_upstream_closes_is_forgotten(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, OK5)
    client.take()
    assert rig.route.idle_count() == 1
    up.close()
    rig.step()
    assert rig.route.idle_count() == 0
    client.send(get(b"/again"))
    serve_one(rig, upstream, OK5, forwarded(path=b"/again"))    # a new connection
    assert client.take() == OK5


def test_a_pooled_connection_closes_after_the_idle_timeout(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, OK5)
    client.take()
    rig.advance(59.9)
    assert rig.route.idle_count() == 1 and not upstream.closed(up, rig)
    rig.advance(0.2)
    assert rig.route.idle_count() == 0 and upstream.closed(up, rig)
    assert conn.state_name == "IDLE"        # the client's keep-alive is its own


def test_a_stale_pooled_connection_is_retried_on_a_new_one_to_the_same_peer(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, OK5)
    client.take()
    client.send(get(b"/2"))
    assert upstream.read(up, rig) == forwarded(path=b"/2")
    up.close()                              # it had decided to close: no answer
    serve_one(rig, upstream, OK5, forwarded(path=b"/2"))
    assert client.take() == OK5


# ---------------------------------------------------------------------------- pipelining
def test_a_pipelined_request_behind_a_proxied_answer_is_answered_after_it(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get(b"/a") + get(b"/b"))
    up = upstream.accept(rig)
    assert upstream.read(up, rig) == forwarded(path=b"/a")     # /b waits its turn
    assert conn.state_name == "WAIT" and conn.buffered == len(get(b"/b"))
    assert rig.spins() == 0
    up.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n#a")
    rig.step()
    assert upstream.read(up, rig) == forwarded(path=b"/b")
    up.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n#b")
    assert [b for _, _, b in client.responses()] == [b"#a", b"#b"]
    assert [ex.outcome_name for ex in rig.exchanges] == ["complete", "complete"]


# ---------------------------------------------------------------------------- failures
def test_an_empty_reply_is_retried_on_the_next_peer_for_a_get(closing):
    first, second = Upstream(), Upstream()
    closing += [first, second]
    rig = proxy(closing, [first, second])
    client, conn = rig.connect()
    client.send(get())
    up = first.accept(rig)
    assert first.read(up, rig) == forwarded()
    up.close()                              # before any response byte
    serve_one(rig, second, OK5, forwarded())
    assert client.take() == OK5
    assert outcome(rig) == ("DONE", "complete")


def test_an_empty_reply_from_the_only_peer_is_502(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = upstream.accept(rig)
    upstream.read(up, rig)
    up.close()
    status, headers, _ = parse_response(client.take())
    assert status == 502
    assert outcome(rig) == ("DONE", "answered")
    assert conn.state_name == "IDLE"        # the request was read whole: keep-alive


def test_an_empty_reply_to_a_post_with_a_body_is_502_and_not_retried(closing):
    first, second = Upstream(), Upstream()
    closing += [first, second]
    rig = proxy(closing, [first, second])
    client, conn = rig.connect()
    client.send(post(b"data"))
    up = first.accept(rig)
    assert first.read(up, rig) == forwarded(b"POST").replace(
        b"Host: x\r\n\r\n", b"Content-Length: 4\r\nHost: x\r\n\r\ndata")
    up.close()
    rig.step()
    assert parse_response(client.take())[0] == 502
    assert not second.pending()             # it may have had an effect: not sent again


def test_a_refused_connection_is_retried_on_the_next_peer_even_for_a_post(closing):
    refusing, second = Refusing(), Upstream()
    closing += [refusing, second]
    rig = proxy(closing, [refusing, second])
    client, conn = rig.connect()
    client.send(post(b"0123456789"))
    up = second.accept(rig)                 # nothing reached the first: the whole request
    assert second.read(up, rig) == forwarded(b"POST").replace(
        b"Host: x\r\n\r\n", b"Content-Length: 10\r\nHost: x\r\n\r\n0123456789")
    up.sendall(OK5)
    assert client.take() == OK5


def test_every_peer_refusing_is_502(closing):
    a, b = Refusing(), Refusing()
    closing += [a, b]
    rig = proxy(closing, [a, b])
    client, conn = rig.connect()
    client.send(get())
    assert parse_response(client.take())[0] == 502
    assert outcome(rig) == ("DONE", "answered")


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\r\nContent-Le",
    b"HTTP/1.1 200 O",
    b"HTTP/1.1 200 OK\r\n",
], ids=["in-a-field", "in-the-status-line", "before-the-empty-line"])
def test_an_upstream_closing_in_the_middle_of_the_head_is_502(closing, upstream, response):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, response)
    up.close()
    status, _, _ = parse_response(client.take())
    assert status == 502
    assert outcome(rig) == ("DONE", "answered")


@pytest.mark.parametrize("response", [
    b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nBad Field\r\n\r\n",
], ids=["bare-LF", "bad-status", "http-2", "length-and-chunked", "gzip-coding",
        "two-lengths", "negative-length", "unasked-101", "field-without-colon"])
def test_an_invalid_response_head_is_502_and_the_upstream_connection_closed(
        closing, upstream, response):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, response)
    assert parse_response(client.take())[0] == 502
    assert upstream.closed(up, rig)
    assert rig.route.idle_count() == 0


def test_an_upstream_closing_inside_a_content_length_body_cuts_the_client(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert client.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    up.close()
    assert client.closed()                  # no fake end: the client sees 5 of 10 bytes
    assert client.received == b""
    assert outcome(rig) == ("DONE", "cut")
    assert conn.state_name == "CLOSED"


def test_an_upstream_closing_inside_a_chunked_body_cuts_the_client(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n")
    up.close()
    raw = client.pump()
    assert raw == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    assert client.closed()                  # and never the last chunk
    assert outcome(rig) == ("DONE", "cut")


def test_invalid_chunk_framing_from_the_upstream_cuts_the_client(closing, upstream):
    rig = proxy(closing, [upstream])
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"5\r\nhello\r\n")
    up.sendall(b"zz\r\n")
    assert client.pump() == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    assert client.closed()                  # never the last chunk
    assert outcome(rig) == ("DONE", "cut")


def test_the_read_timeout_answers_504_after_exactly_its_seconds(closing, upstream):
    rig = proxy(closing, [upstream], upstream_read_timeout=7.0)
    client, conn = rig.connect()
    client.send(get())
    up = upstream.accept(rig)
    upstream.read(up, rig)
    rig.advance(6.9)
    assert client.take() == b""
    rig.advance(0.2)
    status, _, _ = parse_response(client.take())
    assert status == 504
    assert outcome(rig) == ("DONE", "answered")
    assert upstream.closed(up, rig)
    assert conn.state_name == "IDLE"


def test_a_body_over_the_routes_limit_is_413(closing, upstream):
    rig = proxy(closing, [upstream], max_body_size=10)
    client, conn = rig.connect()
    client.send(post(b"x" * 11))
    status, headers, _ = parse_response(client.take())
    assert (status, headers["connection"]) == (413, "close")
    assert not upstream.pending()


def test_a_chunked_body_over_the_routes_limit_is_413(closing, upstream):
    rig = proxy(closing, [upstream], max_body_size=10)
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"6\r\nabcdef\r\n")
    client.send(b"6\r\nghijkl\r\n")
    status, headers, _ = parse_response(client.take())
    assert (status, headers["connection"]) == (413, "close")
    assert client.closed()


@pytest.mark.parametrize("body", [b"0x5\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX\r\n",
                                  b"5\nhello\r\n0\r\n\r\n", b"fffffffffffffffff\r\n"],
                         ids=["0x-prefix", "data-longer-than-size", "bare-LF", "huge-size"])
def test_a_malformed_chunked_request_body_is_400_and_a_close(closing, upstream, body):
    rig = proxy(closing, [upstream])
    before = open_fds()
    client, conn = rig.connect()
    client.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    raw = client.pump()
    assert raw.count(b"HTTP/1.1 ") == 1
    status, headers, _ = parse_response(raw)
    assert (status, headers["connection"]) == (400, "close")
    assert client.closed()
    assert outcome(rig) == ("DONE", "aborted")
    if upstream.pending():
        assert upstream.closed(upstream.accept(rig), rig)
    client.close()
    assert leaked(before, *upstream.conns) == set()


# ---------------------------------------------------------------------------- the client leaves
def test_a_client_leaving_while_the_head_is_awaited_closes_the_upstream_connection(
        closing, upstream):
    rig = proxy(closing, [upstream])
    before = open_fds()
    client, conn = rig.connect()
    client.send(get())
    up = upstream.accept(rig)
    upstream.read(up, rig)
    client.close()
    assert conn.state_name == "CLOSED"
    assert upstream.closed(up, rig)
    assert outcome(rig) == ("DONE", "aborted")
    assert rig.route.idle_count() == 0
    assert leaked(before, up) == set()


def test_a_client_leaving_in_the_middle_of_the_body_closes_the_upstream_connection(
        closing, upstream):
    rig = proxy(closing, [upstream])
    before = open_fds()
    client, conn = rig.connect()
    client.send(get())
    up = serve_one(rig, upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
                                  + b"x" * 1000)
    assert client.take().endswith(b"x" * 1000)
    client.close()
    assert upstream.closed(up, rig)
    assert outcome(rig) == ("DONE", "aborted")
    assert leaked(before, up) == set()
    other, _ = rig.connect()                 # the loop goes on
    other.send(get())
    serve_one(rig, upstream, OK5)
    assert other.take() == OK5


# ---------------------------------------------------------------------------- backpressure
def test_a_request_body_faster_than_the_upstream_is_held_back_then_delivered(closing):
    upstream = Upstream(rcvbuf=4096)
    closing.append(upstream)
    rig = proxy(closing, [upstream], {"max_body_size": 0}, max_body_size=0)
    body = bytes(range(256)) * 8192            # 2 MiB
    client, conn = rig.small_pair()
    request = post(body)
    sent = client.send_some(request)
    up = upstream.accept(rig)
    for _ in range(50):                         # the upstream reads nothing: fill up
        sent += client.send_some(request[sent:])
    assert sent < len(request) // 2             # the client is held back ...
    assert conn.state_name == "BODY"
    # ... by not reading, not by spinning (TCP may open the upstream's window by a segment
    # on its own meanwhile: an event or two, never one per iteration)
    assert rig.spins() <= 2
    got = b""
    for _ in range(100000):                     # now the upstream reads
        got += upstream.read(up, rig)
        sent += client.send_some(request[sent:])
        if len(got) >= len(forwarded(b"POST")) + len(body) + 20:
            got += upstream.read(up, rig)
            break
    head, _, rest = got.partition(b"\r\n\r\n")
    assert rest == body
    assert b"Content-Length: %d" % len(body) in head
    assert conn.state_name == "WAIT"
    up.sendall(OK5)
    assert client.responses()[0][2] == b"hello"


def test_a_response_body_faster_than_the_client_is_held_back_then_delivered(closing, upstream):
    rig = proxy(closing, [upstream], {"pipe_threshold": 16384})
    body = bytes(range(256)) * 4096            # 1 MiB
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    client, conn = rig.small_pair()
    client.send(get())
    up = upstream.accept(rig)
    up.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    upstream.read(up, rig)
    sent = send_some(up, response)
    for _ in range(50):
        rig.step()
        sent += send_some(up, response[sent:])
    assert sent < len(response)                 # the proxy stopped reading the upstream
    assert rig.spins() == 0
    for _ in range(100000):
        client.pump()
        sent += send_some(up, response[sent:])
        if len(client.received) >= len(response):
            break
    assert client.take() == response
    assert outcome(rig) == ("DONE", "complete")
    assert rig.route.idle_count() == 1


# ---------------------------------------------------------------------------- tunnel
def test_a_101_tunnels_bytes_both_ways_until_one_side_closes(closing, upstream):
    rig = proxy(closing, [upstream], body_timeout=30.0)
    client, conn = rig.connect()
    client.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"\r\n")
    up = upstream.accept(rig)
    request = upstream.read(up, rig)
    assert b"Connection: upgrade\r\nUpgrade: websocket\r\n" in request
    up.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
               b"Connection: Upgrade\r\nX-A: 1\r\n\r\nfrom-up")
    assert client.take() == (b"HTTP/1.1 101 Switching Protocols\r\nX-A: 1\r\n"
                             b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\nfrom-up")
    assert conn.state_name == "TUNNEL"
    client.send(b"from-client")
    assert upstream.read(up, rig) == b"from-client"
    up.sendall(b"more")
    assert client.take() == b"more"
    up.close()
    assert client.closed()                  # the upstream's close ends the tunnel
    assert conn.state_name == "LINGER"
    client.close()
    assert conn.state_name == "CLOSED"


def test_a_tunnel_ends_when_the_client_closes(closing, upstream):
    rig = proxy(closing, [upstream])
    before = open_fds()
    client, conn = rig.connect()
    client.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                b"\r\n")
    up = serve_one(rig, upstream, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Connection: upgrade\r\n\r\n")
    client.take()
    client.close()
    assert conn.state_name == "CLOSED"
    assert upstream.closed(up, rig)
    assert leaked(before, up) == set()


def test_an_idle_tunnel_closes_at_the_body_timeout(closing, upstream):
    rig = proxy(closing, [upstream], body_timeout=30.0)
    client, conn = rig.connect()
    client.send(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
                b"\r\n")
    up = serve_one(rig, upstream, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  b"Connection: upgrade\r\n\r\n")
    client.take()
    rig.advance(20)
    client.send(b"ping")                        # activity moves the deadline
    assert upstream.read(up, rig) == b"ping"
    rig.advance(29.9)
    assert conn.state_name == "TUNNEL"
    rig.advance(0.2)
    assert conn.state_name == "CLOSED"
    assert client.closed()
    assert upstream.closed(up, rig)
