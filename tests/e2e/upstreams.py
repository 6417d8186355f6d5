"""Small upstream servers for the reverse-proxy end-to-end tests.

Every upstream is a TCP listener on 127.0.0.1 (a free port) with one thread per accepted
connection, running a ``serve(conn)`` function the test chooses. ``UpConn`` reads requests
off the raw socket (head kept byte for byte, body de-framed, raw body bytes kept too), so a
test can check exactly what the proxy sent, and write exactly the bytes it wants back:
a scripted reply, garbage, a reset, half a body, nothing at all.

An upstream counts the connections it accepted and logs every request it read, so tests
can tell keep-alive reuse, retries and health-check probes apart.
"""
from __future__ import annotations

import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

DATE = b"Mon, 01 Jan 2001 00:00:00 GMT"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_address() -> str:
    """A 127.0.0.1 port nobody listens on: connecting is refused."""
    return f"127.0.0.1:{free_port()}"


@dataclass
class UpRequest:
    """One request as the upstream read it."""

    method: bytes
    target: bytes
    version: bytes
    head: bytes                       # the request line and field lines, CRLFs included
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""                 # de-framed
    raw_body: bytes = b""             # as it came on the wire
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    conn: int = 0                     # which accepted connection (1, 2, ...)

    def all(self, name: bytes) -> list[bytes]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def get(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None

    @property
    def names(self) -> set[bytes]:
        return {n.lower() for n, _ in self.headers}


class UpConn:
    """One accepted connection, read with a buffer."""

    def __init__(self, sock: socket.socket, number: int, upstream: Upstream) -> None:
        self.sock = sock
        self.number = number
        self.upstream = upstream
        self.buf = b""

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except OSError:
            return False
        self.buf += data
        return bool(data)

    def _until(self, mark: bytes) -> bytes | None:
        while mark not in self.buf:
            if not self._fill():
                return None
        out, _, self.buf = self.buf.partition(mark)
        return out + mark

    def _exactly(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_head(self) -> UpRequest | None:
        """The next request head (its body is left unread), or None at EOF."""
        head = self._until(b"\r\n\r\n")
        if head is None:
            return None
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].split(b" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name, value.strip(b" \t")))
        req = UpRequest(method, target, version, head, headers, conn=self.number)
        self.upstream.log(req)
        return req

    def read_body(self, req: UpRequest) -> bool:
        """De-frame the body of ``req`` (Content-Length or chunked); False at a early EOF."""
        te = req.get(b"transfer-encoding")
        if te is not None and te.lower() == b"chunked":
            raw, parts = [], []
            while True:
                line = self._until(b"\r\n")
                if line is None:
                    return False
                raw.append(line)
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    break
                data = self._exactly(size + 2)
                if data is None:
                    return False
                raw.append(data)
                parts.append(data[:-2])
            while True:
                line = self._until(b"\r\n")
                if line is None:
                    return False
                raw.append(line)
                if line == b"\r\n":
                    break
                name, _, value = line[:-2].partition(b":")
                req.trailers.append((name, value.strip()))
            req.body, req.raw_body = b"".join(parts), b"".join(raw)
            return True
        length = int(req.get(b"content-length") or 0)
        data = self._exactly(length)
        if data is None:
            return False
        req.body = req.raw_body = data
        return True

    def read_request(self) -> UpRequest | None:
        req = self.read_head()
        if req is None or not self.read_body(req):
            return None
        return req

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0)."""
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.sock.close()

    def wait_closed(self, timeout: float) -> bool:
        """Whether the peer (the proxy) closes this connection within ``timeout``; bytes it
        sends meanwhile are discarded."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False


Serve = Callable[[UpConn], None]


class Upstream:
    """A listener on 127.0.0.1 running ``serve`` in a thread per connection."""

    def __init__(self, serve: Serve, name: str = "up", backlog: int = 128,
                 tls: ssl.SSLContext | None = None) -> None:
        self.serve = serve
        self.name = name
        self.tls = tls          # an https:// upstream: each connection does a TLS handshake
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(backlog)
        self.port = self.lsock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self.accepted = 0
        self.requests: list[UpRequest] = []
        self.closed_conns: list[int] = []     # connections that ended (proxy closed or we did)
        self.conns: list[UpConn] = []
        self.lock = threading.Lock()
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True, name=f"upstream-{name}")
        self.thread.start()

    def log(self, req: UpRequest) -> None:
        with self.lock:
            self.requests.append(req)

    def paths(self, exclude: bytes | None = None) -> list[bytes]:
        with self.lock:
            return [r.target for r in self.requests if exclude is None or r.target != exclude]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                if self.stopped:
                    sock.close()
                    return
                self.accepted += 1
                conn = UpConn(sock, self.accepted, self)
                self.conns.append(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: UpConn) -> None:
        try:
            if self.tls is not None:
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
            self.serve(conn)
        except OSError:
            pass
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass
            with self.lock:
                self.closed_conns.append(conn.number)

    def stop(self) -> None:
        """Stop listening (new connections are refused) and close every open connection."""
        with self.lock:
            self.stopped = True
            conns = list(self.conns)
        try:
            self.lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.lsock.close()
        for conn in conns:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<Upstream {self.name} {self.address}>"


# ------------------------------------------------------------------ responses and servers

def response(status: int = 200, body: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None,
             reason: bytes = b"OK", length: bool = True) -> bytes:
    """A complete HTTP/1.1 response with the upstream's own Server and Date."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason), b"Server: test-upstream/1.0",
             b"Date: " + DATE]
    lines += [n + b": " + v for n, v in headers or []]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(parts: list[bytes], trailers: bytes = b"", ext: bytes = b"") -> bytes:
    """A chunked body: one chunk per part (each with extension ``ext``), then trailers."""
    out = [b"%x%s\r\n%s\r\n" % (len(p), ext, p) for p in parts if p]
    return b"".join(out) + b"0\r\n" + trailers + b"\r\n"


Respond = Callable[[UpRequest, UpConn], "bytes | None"]


def http(respond: Respond, read_body: bool = True) -> Serve:
    """A keep-alive HTTP/1.1 server: ``respond(req, conn)`` gives the whole reply's bytes
    (None: close without answering). The connection closes when the request or the reply
    says ``Connection: close``."""
    def serve(conn: UpConn) -> None:
        while True:
            req = conn.read_request() if read_body else conn.read_head()
            if req is None:
                return
            reply = respond(req, conn)
            if reply is None or not conn.send(reply):
                return
            head = reply.partition(b"\r\n\r\n")[0].lower()
            if (req.get(b"connection") or b"").lower() == b"close" \
                    or b"\r\nconnection: close" in head:
                return
    return serve


def named(name: bytes) -> Respond:
    """Answers every request with 200 and ``name`` as the body."""
    def respond(req: UpRequest, conn: UpConn) -> bytes:
        return response(200, name, [(b"Content-Type", b"text/plain")])
    return respond


def scripted(data: bytes, then: str = "hold", hold: float = 5.0) -> Serve:
    """Reads one request head, writes ``data``, then: "hold" the connection open (until the
    proxy closes it or ``hold`` seconds pass), "close" it, or "reset" it."""
    def serve(conn: UpConn) -> None:
        if conn.read_head() is None:
            return
        if data:
            conn.send(data)
        if then == "reset":
            conn.reset()
        elif then == "hold":
            conn.wait_closed(hold)
    return serve


def silent(hold: float = 10.0) -> Serve:
    """Reads the request head and never answers (until the proxy closes or ``hold`` ends)."""
    return scripted(b"", "hold", hold)


def generated(total: int, block: int = 65536) -> Iterator[bytes]:
    """``total`` bytes of a pattern that changes per block, made block by block."""
    sent = 0
    base = bytes(range(256)) * (block // 256)
    n = 0
    while sent < total:
        piece = (b"%016d" % n + base)[:min(block, total - sent)]
        yield piece
        sent += len(piece)
        n += 1
