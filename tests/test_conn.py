"""Connection states and deadlines, driven over real sockets on a frozen clock (tests/rig.py)."""
from __future__ import annotations

import pytest

from expserver._conn import Settings
from tests.rig import T0, Rig, open_fds, parse_response

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
