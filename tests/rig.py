"""A test rig for the compiled core: a Loop on a frozen clock, stepped by hand.

No subprocess, no sleeping: the rig owns a Loop whose time moves only by ``advance``, a Core,
and a Listener on 127.0.0.1; clients are plain sockets of the test (or socketpair ends
adopted by the listener), upstreams are listening sockets the test accepts on and answers
byte by byte. ``step`` runs loop iterations until nothing is left to do; the client side
reads without blocking. So every interleaving a test wants is spelled out in the test.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from expserver._conn import Core, Listener, Settings
from expserver._loop import Loop

T0 = 1000.0


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


class Client:
    """One client socket; reads whatever the server has sent so far, never blocking."""

    def __init__(self, rig: Rig, sock: socket.socket) -> None:
        self.rig = rig
        self.sock = sock
        sock.setblocking(False)
        self.received = b""
        self.eof = False
        self.reset = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.rig.step()

    def pump(self) -> bytes:
        """Run the loop, then take what arrived (also notes EOF and resets)."""
        self.rig.step()
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                self.reset = True
                break
            if not data:
                self.eof = True
                break
            self.received += data
        return self.received

    def take(self) -> bytes:
        self.pump()
        out, self.received = self.received, b""
        return out

    def closed(self) -> bool:
        self.pump()
        return self.eof or self.reset

    def close(self) -> None:
        self.sock.close()
        self.rig.step()


class Rig:
    def __init__(self, handler: Callable[[Any], tuple[int, bytes, object]],
                 **settings: Any) -> None:
        self.loop = Loop()
        self.loop.freeze_time(T0)
        self.core = Core(self.loop)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.settings = Settings(**settings)
        self.listener = Listener(self.core, self.lsock, handler, self.settings)
        self.listener.start()
        self.port = self.lsock.getsockname()[1]
        self.clients: list[Client] = []

    def step(self, rounds: int = 4) -> None:
        """Run loop iterations until a few in a row find nothing to do (events, timers)."""
        idle = 0
        for _ in range(10000):
            before = (len(self.core.connections), self.core.stats.send_bytes,
                      self.core.stats.recv_bytes, self.loop.timer_count)
            self.loop.run_once(0)
            after = (len(self.core.connections), self.core.stats.send_bytes,
                     self.core.stats.recv_bytes, self.loop.timer_count)
            idle = idle + 1 if after == before else 0
            if idle >= rounds:
                return
        raise AssertionError("the loop never settles")

    def advance(self, seconds: float) -> None:
        self.loop.advance(seconds)
        self.step()

    def connect(self) -> tuple[Client, Any]:
        """A TCP client and the server's Connection object for it."""
        known = set(self.core.connections)
        sock = socket.create_connection(("127.0.0.1", self.port))
        self.step()
        new = set(self.core.connections) - known
        assert len(new) == 1, "the listener did not accept"
        client = Client(self, sock)
        self.clients.append(client)
        return client, new.pop()

    def pair(self, sndbuf: int | None = None) -> tuple[Client, Any]:
        """A socketpair client: the server end adopted as a connection (small buffers
        available, so backpressure shows after a few KiB)."""
        a, b = socket.socketpair()
        if sndbuf is not None:
            b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
        conn = self.listener.adopt(b.detach(), "peer")
        client = Client(self, a)
        self.clients.append(client)
        return client, conn

    def close(self) -> None:
        for c in self.clients:
            c.sock.close()
        self.core.close_all()
        self.listener.stop()
        self.step()


class Upstream:
    """A listening socket standing in for an upstream server; the test answers by hand."""

    def __init__(self) -> None:
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.lsock.setblocking(False)
        self.port = self.lsock.getsockname()[1]
        self.conns: list[socket.socket] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def accept(self, rig: Rig) -> socket.socket:
        rig.step()
        conn, _ = self.lsock.accept()
        conn.setblocking(False)
        self.conns.append(conn)
        return conn

    def read(self, conn: socket.socket, rig: Rig) -> bytes:
        rig.step()
        out = b""
        while True:
            try:
                data = conn.recv(1 << 20)
            except BlockingIOError:
                break
            except ConnectionResetError:
                break
            if not data:
                break
            out += data
        return out

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.lsock.close()


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """(status, lower-cased headers, rest) of one response's head at the start of raw."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest
