"""A test rig for the compiled core: a Loop on a frozen clock, stepped by hand.

No subprocess, no sleeping: the rig owns a Loop whose time moves only by ``advance``, a Core,
and a Listener on 127.0.0.1; clients are plain sockets of the test (or socketpair ends
adopted by the listener), upstreams are listening sockets the test accepts on and answers
byte by byte. ``step`` runs loop iterations until nothing is left to do; the client side
reads without blocking. So every interleaving a test wants is spelled out in the test.
"""
from __future__ import annotations

import os
import select
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
        if sock.family != socket.AF_UNIX:
            # no Nagle: a small send goes out at once, not after the server's delayed ACK,
            # so what a test sent is there when the loop runs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    def send_some(self, data: bytes) -> int:
        """Send what the socket takes without blocking (then run the loop); how much."""
        sent = send_some(self.sock, data)
        self.rig.step()
        return sent

    def shut(self) -> None:
        """Shut the sending side (the server reads EOF); reading goes on."""
        self.sock.shutdown(socket.SHUT_WR)
        self.rig.step()

    def responses(self) -> list[Response]:
        """The complete responses received so far (see split_responses)."""
        return split_responses(self.pump())[0]


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
        b.setblocking(False)        # as accept4 makes them: a full socket must not block
        conn = self.listener.adopt(b.detach(), "peer")
        client = Client(self, a)
        self.clients.append(client)
        return client, conn

    def small_pair(self, size: int = 4096) -> tuple[Client, Any]:
        """A socketpair client whose buffers are small both ways: a few KiB fill them."""
        a, b = socket.socketpair()
        for sock in (a, b):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
        b.setblocking(False)
        conn = self.listener.adopt(b.detach(), "peer")
        client = Client(self, a)
        self.clients.append(client)
        return client, conn

    def spins(self, rounds: int = 50) -> int:
        """Events handed to handles over ``rounds`` iterations with nothing new happening:
        0 unless something is readable-but-ignored (or writable-but-idle), i.e. the loop
        would spin."""
        before = self.loop.dispatched
        for _ in range(rounds):
            self.loop.run_once(0)
        return self.loop.dispatched - before

    def close(self) -> None:
        for c in self.clients:
            c.sock.close()
        self.core.close_all()
        self.listener.stop()
        self.step()


class ProxyRig(Rig):
    """A Rig whose handler is a reverse_proxy route (expserver.proxy.make_route) to the
    given upstream stand-ins, in order; ``route`` takes RouteConfig keywords. Every Exchange
    the route makes is kept in ``exchanges``: its ``state_name`` and ``outcome_name`` are
    what a test can check beside what the client saw."""

    def __init__(self, upstreams: list[Any], settings: dict[str, Any] | None = None,
                 **route: Any) -> None:
        from expserver.config import RouteConfig, UpstreamConfig
        from expserver.proxy import make_route
        super().__init__(self.handle, **(settings or {}))
        self.exchanges: list[Any] = []
        config = RouteConfig(req_path="/", type="reverse_proxy", upstreams=tuple(
            UpstreamConfig("127.0.0.1", u.port) for u in upstreams), **route)
        self.route = make_route(config, self.loop)

    def handle(self, req: Any) -> tuple[int, bytes, object]:
        exchange = self.route(req)
        self.exchanges.append(exchange)
        return exchange


class Refusing:
    """A bound port nobody listens on: connections to it are refused. The socket is kept
    until ``close`` so no one else takes the port meanwhile."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class Upstream:
    """A listening socket standing in for an upstream server; the test answers by hand.
    ``rcvbuf``: a small receive buffer (set before listening, so accepted sockets get it
    and advertise a small window), for backpressure towards the proxy."""

    def __init__(self, rcvbuf: int | None = None) -> None:
        self.lsock = socket.socket()
        if rcvbuf is not None:
            self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
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
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)   # see Client
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

    def pending(self) -> bool:
        """Whether a connection waits to be accepted (nothing is accepted)."""
        return bool(select.select([self.lsock], [], [], 0)[0])

    def closed(self, conn: socket.socket, rig: Rig) -> bool:
        """Whether the proxy closed ``conn`` (EOF or reset; pending bytes are read away)."""
        rig.step()
        while True:
            try:
                data = conn.recv(1 << 20)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True

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


Response = tuple[int, dict[str, str], bytes]


def split_responses(raw: bytes) -> tuple[list[Response], bytes]:
    """The complete responses at the start of ``raw`` (bodies framed by Content-Length or
    chunked, decoded; none for 1xx/204/304) and the bytes after the last one."""
    out: list[Response] = []
    while b"\r\n\r\n" in raw:
        status, headers, rest = parse_response(raw)
        if status < 200 or status in (204, 304):
            body = b""
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                line, sep, after = rest.partition(b"\r\n")
                if not sep:
                    return out, raw
                size = int(line.split(b";")[0], 16)
                if size == 0:               # the last chunk, then trailers, then CRLF
                    if after.startswith(b"\r\n"):
                        rest = after[2:]
                        break
                    _, sep, rest = after.partition(b"\r\n\r\n")
                    if not sep:
                        return out, raw
                    break
                if len(after) < size + 2:
                    return out, raw
                body += after[:size]
                rest = after[size + 2:]
        elif "content-length" in headers:
            n = int(headers["content-length"])
            if len(rest) < n:
                return out, raw
            body, rest = rest[:n], rest[n:]
        else:
            return out, raw                 # delimited by the close: not complete here
        out.append((status, headers, body))
        raw = rest
    return out, raw


def send_some(sock: socket.socket, data: bytes) -> int:
    """Send what a non-blocking socket takes now; how much."""
    sent = 0
    while sent < len(data):
        try:
            sent += sock.send(data[sent:])
        except BlockingIOError:
            break
    return sent


def leaked(before: set[int], *keep: socket.socket) -> set[int]:
    """Descriptors open now that were not open at ``before``, but for the test's own
    sockets ``keep`` (clients, upstream stand-ins) still open."""
    mine = {s.fileno() for s in keep if s.fileno() >= 0}
    return open_fds() - before - mine
