"""Fault injection: every call from the compiled core into Python code, made to raise.

The core calls Python at a few places: the listener's handler (and the body iterator it may
return), the balancer (``pick``) and its peers (``succeeded``, ``failed``), timer and
deferred callbacks; around it, plain Python keeps a worker going (the metrics publisher, the
health checker thread, the resolver thread). For each, a stand-in or a monkeypatch raises
at a chosen call, and the test checks what the brief of the fault handling promises:

(a) the client concerned gets the right answer: 500 for a handler fault (then a close), 502
    for a proxied request whose head was not sent yet, the whole response when the fault was
    only in bookkeeping, a cut connection when the head was already on its way;
(b) exactly one ``[error]`` line, naming the context, and no traceback;
(c) the loop goes on: the next client gets a normal answer;
(d) no descriptor is left open (the test's own sockets aside).
"""
from __future__ import annotations

import os
import re
import socket
import threading

import pytest

from expserver import metrics, proxy
from expserver.balancer import Balancer, Peer
from expserver.config import HealthCheckConfig, UpstreamConfig
from expserver.response import FileRange
from tests.rig import (
    ProxyRig,
    Refusing,
    Rig,
    Upstream,
    leaked,
    open_fds,
    parse_response,
    split_responses,
)

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


# ---------------------------------------------------------------------------- helpers
class Boom(Exception):
    """The injected fault (a type no real code raises)."""


def raises_at(call, real=None, exc=None):
    """A stand-in for a callable that raises ``Boom`` at its ``call``-th call (1-based;
    0: every call) and otherwise calls ``real`` (or returns None)."""
    count = 0

    def stand_in(*args, **kwargs):
        nonlocal count
        count += 1
        if call == 0 or count == call:
            raise exc or Boom(f"injected at call {count}")
        return real(*args, **kwargs) if real is not None else None

    stand_in.calls = lambda: count
    return stand_in


def faults(err):
    """The [error] lines of faults: without an upstream's own failures (a refused
    connection, a reset), which the error log reports too."""
    return [line for line in err.splitlines()
            if "[error]" in line and not re.search(r"\[error\] \d+: upstream ", line)]


def one_error(capsys, *context):
    """The single fault logged since the last check; it must name ``context``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = faults(err)
    assert len(lines) == 1, err
    for part in context:
        assert part in lines[0], lines[0]
    return lines[0]


def no_error(capsys):
    err = capsys.readouterr().err
    assert not faults(err) and "Traceback" not in err, err


def served(rig, request=GET):
    """A new client's answer (the loop still serves)."""
    client, _ = rig.connect()
    client.send(request)
    answer = client.take()
    client.close()
    return answer


def closed_upstream_side(rig, *upstreams):
    """Close the stand-ins' connections so pooled ones close too; run the loop."""
    for up in upstreams:
        for c in up.conns:
            c.close()
    rig.step()


@pytest.fixture
def closing():
    things = []
    yield things
    for thing in reversed(things):
        thing.close()


# ---------------------------------------------------------------------------- the handler
def ok(req):
    return 200, b"", b"fine"


@pytest.mark.parametrize("answer, context", [
    (Boom("handler broke"), "the handler of the connection from"),
    (None, "the handler of the connection from"),
    ((200, b""), "the handler of the connection from"),
    ((200, b"", b"x", b"extra"), "the handler of the connection from"),
    ((0, b"", b"not a Deferred"), "the handler of the connection from"),
    (("200", b"", b"x"), "the handler of the connection from"),
    ((200, "Text: str\r\n", b"x"), "internal error on the connection from"),
    ((200, b"", 12345), "internal error on the connection from"),
    ((1000, b"", b"x"), "the handler of the connection from"),
    ({"status": 200}, "the handler of the connection from"),
], ids=["raises", "returns-None", "2-tuple", "4-tuple", "status-0",
        "str-status", "str-headers", "body-not-iterable", "status-1000", "a-dict"])
def test_a_handler_fault_is_answered_500_then_closed(capsys, closing, answer, context):
    def handler(req):
        if req.path == b"/fault":
            if isinstance(answer, Exception):
                raise answer
            return answer
        return ok(req)

    rig = Rig(handler)
    closing.append(rig)
    before = open_fds()
    client, conn = rig.connect()
    client.send(b"GET /fault HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
    raw = client.pump()
    assert raw.count(b"HTTP/1.1 ") == 1                 # no answer to the pipelined GET
    status, headers, _ = parse_response(raw)
    assert (status, headers["connection"]) == (500, "close")
    assert client.closed()
    one_error(capsys, context, "(GET /fault)")
    assert parse_response(served(rig))[0] == 200
    no_error(capsys)
    client.close()
    assert leaked(before) == set()


def test_a_file_range_with_a_negative_length_is_answered_500_and_its_file_closed(
        capsys, closing, tmp_path):
    (tmp_path / "f").write_bytes(b"abc")

    def handler(req):
        return 200, b"", FileRange(os.open(tmp_path / "f", os.O_RDONLY), 0, -5)

    rig = Rig(handler)
    closing.append(rig)
    before = open_fds()
    client, _ = rig.connect()
    client.send(GET)
    status, headers, _ = parse_response(client.pump())
    assert (status, headers["connection"]) == (500, "close")
    one_error(capsys, "is not a part of a file")
    client.close()
    assert leaked(before) == set()


@pytest.mark.parametrize("status, headers, context", [
    (1000, b"", "the handler of the connection from"),
    (0, b"", "the handler of the connection from"),
    ("200", b"", "the handler of the connection from"),
    (200, "Text: str\r\n", "internal error on the connection from"),
], ids=["status-1000", "status-0", "str-status", "str-headers"])
def test_a_refused_answer_with_a_file_range_is_answered_500_and_its_file_closed(
        capsys, closing, tmp_path, status, headers, context):
    (tmp_path / "f").write_bytes(b"abc")

    def handler(req):
        return status, headers, FileRange(os.open(tmp_path / "f", os.O_RDONLY), 0, 3)

    rig = Rig(handler)
    closing.append(rig)
    before = open_fds()
    client, _ = rig.connect()
    client.send(GET)
    status_, headers_, _ = parse_response(client.pump())
    assert (status_, headers_["connection"]) == (500, "close")
    one_error(capsys, context)
    client.close()
    assert leaked(before) == set()


def test_a_handler_fault_behind_a_stalled_answer_is_answered_500(capsys, closing):
    """The pipelined request is dispatched later, when the pipe has room again (a deferred
    call, not an event): its fault must still be answered."""
    big = b"x" * 300000

    def handler(req):
        if req.path == b"/big":
            return 200, b"", big
        if req.path == b"/fault":
            return 200, "not bytes", b"x"           # raises in the connection's code
        return ok(req)

    rig = Rig(handler, pipe_threshold=16384)
    closing.append(rig)
    client, conn = rig.small_pair()
    client.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /fault HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(2000):
        client.pump()
        if client.eof or len(split_responses(client.received)[0]) == 2:
            break
    responses = split_responses(client.received)[0]
    assert [status for status, _, _ in responses] == [200, 500]
    assert responses[0][2] == big
    assert responses[1][1]["connection"] == "close"
    assert client.closed()
    one_error(capsys, "(GET /fault)")
    assert parse_response(served(rig))[0] == 200


# ---------------------------------------------------------------------------- body iterators
def chunks(*parts):
    for part in parts:
        if isinstance(part, Exception):
            raise part
        yield part


@pytest.mark.parametrize("body, relayed", [
    (lambda: chunks(Boom("first next")), b""),
    (lambda: chunks(b"one", Boom("second next")), b"3\r\none\r\n"),
    (lambda: chunks(b"one", b"two", Boom("third next")), b"3\r\none\r\n3\r\ntwo\r\n"),
    (lambda: iter(["text"]), b""),
    (lambda: iter([b"one", "text"]), b"3\r\none\r\n"),
], ids=["raises-at-first-next", "raises-at-second-next", "raises-at-third-next",
        "yields-str-first", "yields-str-later"])
def test_a_body_iterator_fault_cuts_the_connection_after_what_was_sent(capsys, closing, body,
                                                                        relayed):
    def handler(req):
        return (200, b"", body()) if req.path == b"/stream" else ok(req)

    rig = Rig(handler)
    closing.append(rig)
    before = open_fds()
    client, conn = rig.connect()
    client.send(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n" + GET)
    raw = client.pump()
    status, headers, rest = parse_response(raw)
    # the head went out before the first chunk was pulled: too late for a 500
    assert (status, headers["transfer-encoding"]) == (200, "chunked")
    assert rest == relayed                  # never the last chunk: the client sees the cut
    assert raw.count(b"HTTP/1.1 ") == 1
    assert client.closed()
    one_error(capsys, "connection from")
    assert parse_response(served(rig))[0] == 200
    client.close()
    assert leaked(before) == set()


def test_a_body_iterator_fault_behind_a_stalled_answer_cuts_the_connection(capsys, closing):
    big = b"x" * 300000

    def handler(req):
        if req.path == b"/big":
            return 200, b"", big
        return 200, b"", chunks(b"one", Boom("later"))

    rig = Rig(handler, pipe_threshold=16384)
    closing.append(rig)
    client, conn = rig.small_pair()
    client.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    for _ in range(2000):
        client.pump()
        if client.eof:
            break
    assert client.eof, "the connection was never cut"
    (status, _, body), = split_responses(client.received)[0]
    assert (status, body) == (200, big)
    assert client.received.endswith(b"\r\n\r\n3\r\none\r\n")
    one_error(capsys, "connection from")
    assert conn.state_name == "CLOSED"


# ---------------------------------------------------------------------------- the balancer
def proxy_rig(closing, upstreams, **route):
    rig = ProxyRig(upstreams, **route)
    closing.insert(0, rig)
    return rig


@pytest.fixture
def upstream(closing):
    up = Upstream()
    closing.append(up)
    return up


def answer_once(rig, upstream, response=OK5):
    conn = upstream.accept(rig)
    upstream.read(conn, rig)
    conn.sendall(response)
    rig.step()
    return conn


def test_balancer_pick_raising_is_502(capsys, closing, upstream, monkeypatch):
    rig = proxy_rig(closing, [upstream])
    balancer = rig.route.balancer
    monkeypatch.setattr(balancer, "pick", raises_at(1, balancer.pick))
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET)
    status, headers, _ = parse_response(client.take())
    assert status == 502
    assert not upstream.pending()
    assert rig.exchanges[0].outcome_name == "answered"
    one_error(capsys, "the balancer of the exchange for GET /", "Boom")
    client.send(GET)                        # the same connection goes on
    answer_once(rig, upstream)
    assert client.take() == OK5
    no_error(capsys)
    client.close()
    closed_upstream_side(rig, upstream)
    assert leaked(before, *upstream.conns) == set()


def test_balancer_pick_raising_on_the_retry_is_502(capsys, closing, monkeypatch):
    refusing, second = Refusing(), Upstream()
    closing += [refusing, second]
    rig = proxy_rig(closing, [refusing, second])
    balancer = rig.route.balancer
    monkeypatch.setattr(balancer, "pick", raises_at(2, balancer.pick))
    client, conn = rig.connect()
    client.send(GET)
    assert parse_response(client.take())[0] == 502
    assert not second.pending()
    one_error(capsys, "the balancer of the exchange for GET /")
    client.send(GET)
    answer_once(rig, second)
    assert client.take() == OK5


@pytest.mark.parametrize("stranger", [
    lambda: "not a peer",
    lambda: Peer("127.0.0.1", 1),
    lambda: ["unhashable"],
], ids=["a-str", "a-peer-of-no-route", "a-list"])
def test_a_balancer_picking_something_not_its_peer_is_502(capsys, closing, upstream, stranger,
                                                         monkeypatch):
    rig = proxy_rig(closing, [upstream])
    balancer = rig.route.balancer
    picks = iter([stranger()])
    monkeypatch.setattr(balancer, "pick", lambda *args: next(picks, balancer.peers[0]))
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET)
    assert parse_response(client.take())[0] == 502
    assert not upstream.pending()
    one_error(capsys, "the balancer of the exchange for GET / from 127.0.0.1")
    client.send(GET)                        # the next pick is the real peer
    answer_once(rig, upstream)
    assert client.take() == OK5
    client.close()
    closed_upstream_side(rig, upstream)
    assert leaked(before, *upstream.conns) == set()


@pytest.mark.parametrize("stranger", [lambda: "not a peer", lambda: Peer("127.0.0.1", 1)],
                         ids=["a-str", "a-peer-of-no-route"])
def test_a_balancer_picking_something_not_its_peer_on_the_retry_is_502(capsys, closing,
                                                                       stranger, monkeypatch):
    refusing, second = Refusing(), Upstream()
    closing += [refusing, second]
    rig = proxy_rig(closing, [refusing, second])
    balancer = rig.route.balancer
    picks = iter([balancer.peers[0], stranger()])
    monkeypatch.setattr(balancer, "pick", lambda *args: next(picks, balancer.peers[1]))
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET)
    assert parse_response(client.take())[0] == 502
    assert not second.pending()
    one_error(capsys, "the balancer of the exchange for GET / from 127.0.0.1")
    client.send(GET)
    answer_once(rig, second)
    assert client.take() == OK5
    client.close()
    closed_upstream_side(rig, second)
    assert leaked(before, *second.conns) == set()


@pytest.mark.parametrize("fault, context", [
    (Boom("handler broke"), "the handler of the connection from"),
    ((200, "Text: str\r\n", b"x"), "internal error on the connection from"),
], ids=["handler-raises", "answer-unusable"])
def test_a_fault_answering_a_request_pipelined_behind_a_proxied_one_is_500(
        capsys, closing, upstream, fault, context):
    """The proxied answer completes from the upstream's event, and the connection goes on
    with the next request from there: its fault is still the connection's."""
    rig = proxy_rig(closing, [upstream])

    def handler(req):
        if req.path != b"/fault":
            return rig.handle(req)
        if isinstance(fault, Exception):
            raise fault
        return fault

    rig.listener.handler = handler
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET + b"GET /fault HTTP/1.1\r\nHost: x\r\n\r\n")
    up = answer_once(rig, upstream)
    responses = client.responses()
    assert [(s, b) for s, _, b in responses] == [(200, b"hello"), (500, responses[1][2])]
    assert responses[1][1]["connection"] == "close"
    assert client.closed()
    one_error(capsys, context, "(GET /fault)")
    assert rig.route.idle_count() == 1 and not upstream.closed(up, rig)   # not its fault
    other, _ = rig.connect()
    other.send(GET)
    assert upstream.read(up, rig).startswith(b"GET / ")       # the pooled connection
    up.sendall(OK5)
    assert other.take() == OK5
    other.close()
    client.close()
    closed_upstream_side(rig, upstream)
    assert leaked(before, *upstream.conns) == set()


# ---------------------------------------------------------------------------- the peers
def test_peer_succeeded_raising_still_relays_the_whole_response(capsys, closing, upstream,
                                                                 monkeypatch):
    monkeypatch.setattr(Peer, "succeeded", raises_at(1))
    rig = proxy_rig(closing, [upstream])
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET)
    answer_once(rig, upstream, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                               b"5\r\nhello\r\n0\r\n\r\n")
    assert client.take() == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n0\r\n\r\n")
    assert rig.exchanges[0].outcome_name == "complete"
    assert rig.route.idle_count() == 1
    one_error(capsys, "recording a success of upstream <Peer 127.0.0.1:")
    client.send(GET)
    assert upstream.read(upstream.conns[0], rig).startswith(b"GET / HTTP/1.1")
    upstream.conns[0].sendall(OK5)
    assert client.take() == OK5
    no_error(capsys)
    client.close()
    closed_upstream_side(rig, upstream)
    assert leaked(before, *upstream.conns) == set()


def test_peer_failed_raising_on_a_refused_connection_is_502(capsys, closing, monkeypatch):
    refusing = Refusing()
    closing.append(refusing)
    monkeypatch.setattr(Peer, "failed", raises_at(0))
    rig = proxy_rig(closing, [refusing])
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET)
    assert parse_response(client.take())[0] == 502
    one_error(capsys, "recording a failure of upstream <Peer 127.0.0.1:")
    client.close()
    assert leaked(before) == set()


def test_peer_failed_raising_still_retries_the_next_peer(capsys, closing, monkeypatch):
    refusing, second = Refusing(), Upstream()
    closing += [refusing, second]
    monkeypatch.setattr(Peer, "failed", raises_at(0))
    rig = proxy_rig(closing, [refusing, second])
    client, conn = rig.connect()
    client.send(GET)
    answer_once(rig, second)
    assert client.take() == OK5
    one_error(capsys, "recording a failure of upstream")


def test_peer_failed_raising_after_a_cut_body_still_cuts_cleanly(capsys, closing, upstream,
                                                               monkeypatch):
    monkeypatch.setattr(Peer, "failed", raises_at(0))
    rig = proxy_rig(closing, [upstream])
    before = open_fds()
    client, conn = rig.connect()
    client.send(GET)
    up = answer_once(rig, upstream, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    up.close()
    assert client.pump() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"
    assert client.closed()
    assert rig.exchanges[0].outcome_name == "cut"
    one_error(capsys, "recording a failure of upstream")
    other, _ = rig.connect()
    other.send(GET)
    answer_once(rig, upstream)
    assert other.take() == OK5
    other.close()
    client.close()
    closed_upstream_side(rig, upstream)
    assert leaked(before, *upstream.conns) == set()


# ---------------------------------------------------------------------------- loop callbacks
def test_a_raising_timer_callback_is_logged_and_the_loop_serves_on(capsys, closing):
    rig = Rig(ok)
    closing.append(rig)
    fired = []
    rig.loop.call_later(1.0, raises_at(0))
    rig.loop.call_later(1.0, lambda: fired.append("next"))
    rig.advance(1.0)
    assert fired == ["next"]
    one_error(capsys, "timer callback", "Boom")
    assert parse_response(served(rig))[0] == 200


def test_a_raising_deferred_callback_is_logged_and_the_loop_serves_on(capsys, closing):
    rig = Rig(ok)
    closing.append(rig)
    rig.loop.call_soon(raises_at(0))
    rig.step()
    one_error(capsys, "deferred callback", "Boom")
    assert parse_response(served(rig))[0] == 200


# ---------------------------------------------------------------------------- metrics
@pytest.fixture
def worker(closing):
    """A rig and the WorkerMetrics of its core on a one-slot board (its /proc descriptor
    closed after the test)."""
    rig = Rig(ok)
    closing.append(rig)
    board = metrics.Board(1)
    w = metrics.WorkerMetrics(rig.core.stats, board, board.take())
    yield rig, w
    os.close(w._statm)


def test_a_raising_metrics_publisher_does_not_stop_the_next_tick(capsys, worker, monkeypatch):
    rig, w = worker
    real = metrics.WorkerMetrics.publish
    publish = raises_at(1, lambda: real(w))
    monkeypatch.setattr(w, "publish", publish)
    w.start(rig.loop)                       # the first tick's publish raises, in start()
    assert publish.calls() == 1
    one_error(capsys, "publishing this worker's metrics", "Boom")
    assert w.board.slot(w.slot)["pid"] == 0
    rig.advance(metrics.PUBLISH_EVERY)
    assert publish.calls() == 2             # the next tick still ran ...
    assert w.board.slot(w.slot)["pid"] == os.getpid()     # ... and published
    rig.advance(metrics.PUBLISH_EVERY)
    assert publish.calls() == 3
    no_error(capsys)
    assert parse_response(served(rig))[0] == 200


def test_a_metrics_publisher_raising_later_does_not_stop_the_ticks(capsys, worker,
                                                                   monkeypatch):
    rig, w = worker
    publish = raises_at(2)
    monkeypatch.setattr(w, "publish", publish)
    w.start(rig.loop)
    rig.advance(metrics.PUBLISH_EVERY)
    one_error(capsys, "publishing this worker's metrics", "Boom")
    rig.advance(metrics.PUBLISH_EVERY)
    assert publish.calls() == 3
    assert parse_response(served(rig))[0] == 200


# ---------------------------------------------------------------------------- health checks
def health_probe(upstream_port, **check):
    balancer = Balancer([UpstreamConfig("127.0.0.1", upstream_port)])
    peer = balancer.peers[0]
    addrs = {peer: (socket.AF_INET, ("127.0.0.1", upstream_port))}
    return proxy.HealthProbe(HealthCheckConfig(**check), balancer.peers, addrs), peer


@pytest.mark.parametrize("healthy", [True, False], ids=["healthy", "unhealthy"])
def test_a_raising_probe_is_logged_and_the_peer_keeps_its_health(capsys, monkeypatch, healthy):
    probe, peer = health_probe(1)
    peer.healthy = healthy
    monkeypatch.setattr(probe, "probe", raises_at(0))
    probe.check_peer(peer)                  # returns: the thread would go on
    assert peer.healthy is healthy
    one_error(capsys, "health check of upstream 127.0.0.1:1", "Boom")


def test_a_timeout_too_large_for_the_socket_is_logged_and_the_peer_keeps_its_health(
        capsys, closing):
    upstream = Upstream()
    closing.append(upstream)
    probe, peer = health_probe(upstream.port, timeout=1e300)
    before = open_fds()
    probe.check_peer(peer)
    assert peer.healthy
    one_error(capsys, f"health check of upstream 127.0.0.1:{upstream.port}")
    assert leaked(before) == set()


def test_a_recording_fault_is_logged_and_the_peer_keeps_its_health(capsys, monkeypatch):
    probe, peer = health_probe(1)
    monkeypatch.setattr(probe.checker, "record", raises_at(0))
    probe.check_peer(peer)
    assert peer.healthy
    one_error(capsys, "health check of upstream")


def test_a_healthy_probe_still_works(capsys, closing):
    """The same probe, without a fault, against an upstream stand-in that answers."""
    upstream = Upstream()
    closing.append(upstream)
    upstream.lsock.settimeout(5.0)
    probe, peer = health_probe(upstream.port, timeout=5.0, fails=1)
    peer.healthy = False

    def answer():
        conn, _ = upstream.lsock.accept()
        conn.recv(1000)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    probe.check_peer(peer)
    t.join()
    assert peer.healthy
    no_error(capsys)


# ---------------------------------------------------------------------------- re-resolution
class RecordingRoute:
    def __init__(self):
        self.addresses = {}

    def set_address(self, peer, addr):
        self.addresses[peer] = addr


def test_a_resolver_fault_is_logged_and_the_other_peers_still_resolve(capsys, monkeypatch):
    peers = [Peer("localhost", 8001), Peer("localhost", 8002)]
    route = RecordingRoute()
    resolver = proxy.Resolver(route, peers)
    monkeypatch.setattr(socket, "getaddrinfo", raises_at(1, socket.getaddrinfo,
                                                         RuntimeError("resolver broke")))
    resolver.resolve_all()
    assert list(route.addresses) == [peers[1]]
    assert route.addresses[peers[1]][1][1] == 8002
    one_error(capsys, "re-resolving upstream localhost:8001", "RuntimeError: resolver broke")
    resolver.resolve_all()                  # the next round resolves both
    assert set(route.addresses) == set(peers)
    no_error(capsys)


def test_a_name_that_stops_resolving_keeps_its_last_address_quietly(capsys, monkeypatch):
    peers = [Peer("localhost", 8001)]
    route = RecordingRoute()
    resolver = proxy.Resolver(route, peers)
    resolver.resolve_all()
    known = route.addresses[peers[0]]
    monkeypatch.setattr(socket, "getaddrinfo",
                        raises_at(0, exc=socket.gaierror(-2, "Name or service not known")))
    resolver.resolve_all()
    assert route.addresses[peers[0]] == known
    no_error(capsys)
