"""Connection churn: clients that connect and reset at once leave nothing behind.

Each closed connection used to stay referenced by the loop's timer heap until its keep-alive
deadline (75 s), so a few seconds of churn grew the worker by tens of MiB (about 800 bytes per
connection); bench/churn.py measures the same over a minute, side by side with nginx.
"""
from __future__ import annotations

import socket
import struct
import time

from .conftest import request

LINGER_0 = struct.pack("ii", 1, 0)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def churn(port: int, seconds: float, payload: bytes) -> int:
    end = time.monotonic() + seconds
    made = 0
    while time.monotonic() < end:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_0)
        try:
            s.connect(("127.0.0.1", port))
            if payload:
                s.send(payload)
        except OSError:
            pass
        s.close()
        made += 1
    return made


def test_connections_reset_at_once_leave_the_worker_as_it_was(start):
    served = start()
    (served.root / "p.txt").write_bytes(b"p" * 1024)
    assert request(served, b"GET /p.txt HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    before = rss_kib(served.server.worker_pid)
    made = churn(served.port, 2.0, b"")
    made += churn(served.port, 2.0, b"GET /p.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)     # the last resets reach the worker
    grown = rss_kib(served.server.worker_pid) - before
    assert made > 5000, made
    # before the fix: ~0.8 KiB per connection, i.e. more than 4 MiB for 5,000
    assert grown < 4096, f"{grown} KiB more after {made} connections"
    assert request(served, b"GET /p.txt HTTP/1.1\r\nHost: x\r\n\r\n")[:3:2] == (200, b"p" * 1024)
