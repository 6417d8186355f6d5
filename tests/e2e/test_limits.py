"""Limits: request bodies (max_body_size: 413 from Content-Length, chunked bodies cut) and
connections (max_connections, and running out of descriptors: accepting pauses, never spins).
"""
import select
import socket
import time

from .conftest import Reader, start_with_fd_limit
from .test_robustness import cpu_ticks, open_fds

GET = b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"


def answered(sock: socket.socket, within: float) -> bool:
    return bool(select.select([sock], [], [], within)[0])


def test_content_length_over_the_limit_is_413_and_closes(start):
    served = start(max_body_size=1000)
    with served.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n")
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 413
        assert headers["connection"] == "close"
        assert r.closed()


def test_chunked_body_over_the_limit_is_not_read_to_the_end(start):
    served = start(max_body_size=4096)
    chunk = b"1000\r\n" + b"a" * 4096 + b"\r\n"
    with served.connect() as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        r = Reader(sock)
        status, headers, _ = r.response()
        assert status == 405            # the static route's answer went out first
        sent = 0
        try:
            for _ in range(256):        # 1 MiB more: the server stops reading long before
                sock.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert r.closed(timeout=6)


def test_body_under_the_limit_keeps_the_connection(start):
    served = start(max_body_size=1000)
    with served.connect() as sock:
        r = Reader(sock)
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000)
        assert r.response()[0] == 405
        sock.sendall(b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        assert r.response()[0] == 404


def test_max_connections_pauses_accepting_until_one_closes(start):
    served = start(max_connections=3)
    (served.root / "a.txt").write_bytes(b"a")
    held = [served.connect() for _ in range(3)]
    for sock in held:
        sock.sendall(GET)
        assert Reader(sock).response()[0] == 200       # three idle keep-alive connections
    waiting = served.connect()                         # queued by the kernel, not accepted
    try:
        waiting.sendall(GET)
        ticks = cpu_ticks(served.server.worker_pid)
        assert not answered(waiting, 1.0)
        assert cpu_ticks(served.server.worker_pid) - ticks < 20, "the paused listener spun"
        held.pop().close()
        assert answered(waiting, 3.0)
        assert Reader(waiting).response()[::2] == (200, b"a")
    finally:
        waiting.close()
        for sock in held:
            sock.close()


def test_out_of_descriptors_pauses_accepting_without_spinning(start):
    """At RLIMIT_NOFILE, accept fails with EMFILE: the listener waits instead of retrying
    at once, and serves the queued clients as soon as descriptors are free again."""
    served = start_with_fd_limit(start, 64)
    (served.root / "a.txt").write_bytes(b"a")
    socks = [served.connect() for _ in range(80)]      # more than the server can hold
    try:
        time.sleep(0.5)
        assert open_fds(served.server.worker_pid) >= 60       # it is at its limit
        ticks = cpu_ticks(served.server.worker_pid)
        time.sleep(1.0)
        assert cpu_ticks(served.server.worker_pid) - ticks < 20, "accept spun on EMFILE"
        for sock in socks[:40]:
            sock.close()
        late = socks[-1]                               # among those the kernel queued
        late.sendall(GET)
        assert answered(late, 3.0)
        assert Reader(late).response()[::2] == (200, b"a")
    finally:
        for sock in socks:
            sock.close()
