"""What a hostile, broken or slow client can and cannot do to the server.

Malformed requests get exactly one error response and a lingering close; timeouts cut
clients that dawdle; clients that vanish do not disturb others; a client that never reads
costs bounded memory and descriptors; an idle server sleeps; many clients at once all get
served."""
from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time

import pytest

from .conftest import Reader, request, start_with_fd_limit

HELLO = b"hello\n"
GET_A = b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n"
MiB = 1 << 20


# ---------------------------------------------------------------------------- helpers

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])     # utime + stime


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashing client or a middlebox would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, str]:
    """All bytes until the peer closes: (data, "eof" | "reset" | "timeout")."""
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return b"".join(chunks), "timeout"
        sock.settimeout(left)
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), "timeout"
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)


def split_response(data: bytes) -> tuple[int, dict[str, str], bytes, bytes]:
    """One Content-Length-framed response off ``data``: (status, headers, body, rest)."""
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data[:200]!r}"
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 "), lines[0]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    n = int(headers["content-length"])
    return int(lines[0].split()[1]), headers, rest[:n], rest[n:]


def send_slowly(sock: socket.socket, data: bytes, piece: int = 1) -> None:
    """Send ``data`` in ``piece``-byte segments; stop quietly once the server is gone."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(0, len(data), piece):
        try:
            sock.sendall(data[i:i + piece])
        except OSError:
            return


@pytest.fixture
def served(start):
    s = start()
    (s.root / "a.txt").write_bytes(HELLO)
    return s


@pytest.fixture(scope="module")
def shared(module_served):
    """One server for the many malformed-request cases (each on its own connection)."""
    (module_served.root / "a.txt").write_bytes(HELLO)
    return module_served


# ---------------------------------------------------------------------------- malformed

POST = b"POST /a.txt HTTP/1.1\r\nHost: x\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"

# (id, raw request, status, whether the response itself says "Connection: close")
MALFORMED = [
    ("cl-and-te", POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", 400, True),
    ("te-and-cl", POST + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n", 400, True),
    ("duplicate-cl", POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, True),
    ("duplicate-cl-same", POST + b"Content-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
     400, True),
    ("cl-list", POST + b"Content-Length: 5, 5\r\n\r\nhello", 400, True),
    ("cl-plus", POST + b"Content-Length: +5\r\n\r\nhello", 400, True),
    ("cl-minus", POST + b"Content-Length: -5\r\n\r\nhello", 400, True),
    ("cl-hex", POST + b"Content-Length: 0x5\r\n\r\nhello", 400, True),
    ("cl-underscore", POST + b"Content-Length: 1_0\r\n\r\nhellohello", 400, True),
    ("cl-letters", POST + b"Content-Length: abc\r\n\r\nhello", 400, True),
    ("cl-unicode-digit", POST + "Content-Length: \u0665\r\n\r\nhello".encode(), 400, True),
    ("cl-empty", POST + b"Content-Length: \r\n\r\n", 400, True),
    ("cl-huge", POST + b"Content-Length: 99999999999999999999999\r\n\r\n", 400, True),
    ("te-gzip", POST + b"Transfer-Encoding: gzip\r\n\r\nhello", 501, True),
    ("te-gzip-chunked", POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, True),
    ("te-chunked-not-last", POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
     400, True),
    ("te-in-http10", b"POST /a.txt HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
     400, True),
    # the head is fine, so the route has already answered when the body turns out bad:
    # that answer is the only one, and the connection closes after it
    ("bad-chunk-size", CHUNKED + b"zz\r\nhello\r\n0\r\n\r\n", 405, False),
    ("chunk-size-overflow", CHUNKED + b"1" * 40 + b"\r\nhello\r\n0\r\n\r\n", 405, False),
    ("chunk-data-too-long", CHUNKED + b"3\r\nhello\r\n0\r\n\r\n", 405, False),
    ("obs-fold", b"GET /a.txt HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  b\r\n\r\n", 400, True),
    ("space-before-colon", b"GET /a.txt HTTP/1.1\r\nHost : x\r\n\r\n", 400, True),
    ("bare-cr", b"GET /a.txt HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400, True),
    ("bare-lf", b"GET /a.txt HTTP/1.1\nHost: x\n\n", 400, True),
    ("nul-in-target", b"GET /a\x00.txt HTTP/1.1\r\nHost: x\r\n\r\n", 400, True),
    ("nul-in-value", b"GET /a.txt HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400, True),
    ("double-space", b"GET  /a.txt HTTP/1.1\r\nHost: x\r\n\r\n", 400, True),
    ("no-host", b"GET /a.txt HTTP/1.1\r\nAccept: */*\r\n\r\n", 400, True),
    ("duplicate-host", b"GET /a.txt HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400, True),
    ("bad-host", b"GET /a.txt HTTP/1.1\r\nHost: a b/c\r\n\r\n", 400, True),
    ("bad-version", b"GET /a.txt HTTP/1.10\r\nHost: x\r\n\r\n", 400, True),
    ("http2", b"GET /a.txt HTTP/2.0\r\nHost: x\r\n\r\n", 505, True),
    ("long-target", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, True),
    ("long-field", b"GET /a.txt HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n",
     431, True),
    ("many-fields", b"GET /a.txt HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n", 431, True),
    ("big-head", b"GET /a.txt HTTP/1.1\r\nHost: x\r\n"
     + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(10)) + b"\r\n", 431, True),
]


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
@pytest.mark.parametrize("raw,status,says_close", [m[1:] for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_request_gets_one_answer_then_close(shared, raw, status, says_close, mode):
    # a valid request right behind the bad one must never be answered
    data = raw + GET_A
    with shared.connect() as sock:
        if mode == "whole":
            sock.sendall(data)
        else:
            send_slowly(sock, data, 1 if len(data) < 20000 else 64)
        got, how = read_to_eof(sock)
    assert how == "eof", f"{how} after {got[:300]!r}"   # lingering close: FIN, not RST
    code, headers, body, rest = split_response(got)
    assert code == status, got[:300]
    assert headers["server"] == "eXpServer"
    if says_close:
        assert headers["connection"] == "close"
    assert str(status).encode() in body
    assert rest == b"", f"a second response from the same bytes: {rest[:200]!r}"


def test_server_still_serves_after_malformed_requests(shared):
    for _, raw, _, _ in MALFORMED:
        with shared.connect() as sock:
            sock.sendall(raw)
            read_to_eof(sock)
    assert request(shared, GET_A)[::2] == (200, HELLO)


def test_lingering_close_lets_a_client_that_keeps_sending_read_the_error(shared):
    """A client still uploading when the error is sent gets the answer, not a reset."""
    with shared.connect() as sock:
        sock.sendall(POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n")
        for _ in range(20):                   # keep sending after the server has answered
            time.sleep(0.005)
            try:
                sock.sendall(b"x" * 16384)
            except OSError:
                break
        got, how = read_to_eof(sock)
    assert how == "eof"
    assert split_response(got)[0] == 400


# ---------------------------------------------------------------------------- timeouts

def test_half_a_head_gets_408_then_close(start):
    served = start(header_timeout=1)
    (served.root / "a.txt").write_bytes(HELLO)
    with served.connect() as sock:
        t0 = time.monotonic()
        sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\nAcc")
        got, how = read_to_eof(sock, timeout=6)
        elapsed = time.monotonic() - t0
    assert how == "eof"
    status, headers, _, rest = split_response(got)
    assert (status, headers["connection"], rest) == (408, "close", b"")
    assert 0.8 <= elapsed <= 3.0, elapsed


def test_slowloris_is_cut_at_the_total_header_deadline(start):
    """One byte every 0.3 s: the deadline counts from the first byte, not the last."""
    served = start(header_timeout=1)
    trickle = b"GET /a.txt HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100
    with served.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        got, first_reply, closed = b"", None, None
        for byte in trickle:                  # at most ~40 s; the server ends it long before
            try:
                sock.send(bytes([byte]))
            except OSError:
                break
            r, _, _ = select.select([sock], [], [], 0.3)
            if r:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if data and first_reply is None:
                    first_reply = time.monotonic() - t0
                got += data
                if not data:
                    closed = time.monotonic() - t0
                    break
            if time.monotonic() - t0 > 6:
                break
    assert first_reply is not None, "no 408 after 6 s of trickling: deadline reset per byte?"
    assert first_reply <= 3.0, first_reply
    assert closed is not None and closed <= 3.5, closed
    assert split_response(got)[0] == 408


def test_idle_keep_alive_connection_is_closed(start):
    served = start(keepalive_timeout=1)
    (served.root / "a.txt").write_bytes(HELLO)
    with served.connect() as sock:
        r = Reader(sock)
        sock.sendall(GET_A)
        assert r.response()[::2] == (200, HELLO)
        t0 = time.monotonic()
        got, how = read_to_eof(sock, timeout=6)
        elapsed = time.monotonic() - t0
    assert (got, how) == (b"", "eof")          # closed silently, no 408 for an idle client
    assert 0.7 <= elapsed <= 3.0, elapsed


def test_connection_that_never_sends_is_closed(start):
    served = start(keepalive_timeout=1)
    with served.connect() as sock:
        t0 = time.monotonic()
        got, how = read_to_eof(sock, timeout=6)
    assert (got, how) == (b"", "eof")
    assert time.monotonic() - t0 <= 3.0


def test_keepalive_timeout_does_not_cut_a_slow_download(start):
    served = start(keepalive_timeout=0.5, send_timeout=5)
    size = 24 * MiB
    with open(served.root / "big.bin", "wb") as f:
        f.truncate(size)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(served.addr)
    with sock:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0
        t0 = time.monotonic()
        sock.settimeout(5)
        while time.monotonic() - t0 < 1.5:     # slow for longer than keepalive_timeout
            data = sock.recv(16384)
            assert data, "closed in the middle of a slow download"
            got += len(data)
            time.sleep(0.002)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            got += len(data)
            if got >= size:
                break
    assert size <= got <= size + 1024, got        # the whole body (and a small head)


def test_body_timeout_closes_a_stalled_upload(start):
    served = start(body_timeout=1)
    with served.connect() as sock:
        sock.sendall(POST + b"Content-Length: 100\r\n\r\n0123456789")
        t0 = time.monotonic()
        got, how = read_to_eof(sock, timeout=6)
    assert how in ("eof", "reset")
    assert split_response(got)[0] == 405       # answered at once; then the body stalls
    assert 0.7 <= time.monotonic() - t0 <= 3.5


def test_send_timeout_closes_a_client_that_stops_reading(start):
    served = start(send_timeout=0.5)
    size = 64 * MiB
    with open(served.root / "big.bin", "wb") as f:
        f.truncate(size)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(served.addr)
    with sock:
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(1.5)                        # never read: the server gives up on us
        got, how = read_to_eof(sock, timeout=5)
    assert how in ("eof", "reset")
    assert len(got) < size


# ---------------------------------------------------------------------------- other clients

class Steady(threading.Thread):
    """A well-behaved client doing keep-alive requests until told to stop."""

    def __init__(self, served, path: bytes = b"/a.txt", body: bytes = HELLO) -> None:
        super().__init__(daemon=True)
        self.served, self.path, self.body = served, path, body
        self.stop = threading.Event()
        self.done = 0
        self.worst = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                with self.served.connect(timeout=5) as sock:
                    r = Reader(sock, timeout=5)
                    for _ in range(20):
                        t0 = time.monotonic()
                        sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % self.path)
                        status, _, body = r.response()
                        self.worst = max(self.worst, time.monotonic() - t0)
                        assert (status, body) == (200, self.body)
                        self.done += 1
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread by finish()
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.join(10)
        if self.error is not None:
            raise self.error
        assert self.done > 0
        assert self.worst < 2.0, f"a request took {self.worst:.2f} s"


def test_vanishing_clients_do_not_disturb_others(served):
    with open(served.root / "big.bin", "wb") as f:
        f.truncate(32 * MiB)
    steady = Steady(served)
    steady.start()
    try:
        for i in range(15):
            # connect and go away
            served.connect().close()
            # half a request, then a clean close / an RST
            s = served.connect()
            s.sendall(b"GET /a.txt HTTP/1.1\r\nHo")
            s.close() if i % 2 else reset(s)
            # a whole request, then an RST before reading the answer
            s = served.connect()
            s.sendall(GET_A * 5)
            reset(s)
            # half a body, then an RST
            s = served.connect()
            s.sendall(POST + b"Content-Length: 1000\r\n\r\nabc")
            reset(s)
            # a download, abandoned in the middle (RST, or a clean close)
            s = served.connect()
            s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
            s.recv(65536)
            s.close() if i % 2 else reset(s)
            time.sleep(0.02)
    finally:
        steady.finish()
    assert request(served, GET_A)[::2] == (200, HELLO)


def test_client_that_never_reads_costs_bounded_memory(served):
    size = 64 * MiB
    with open(served.root / "big.bin", "wb") as f:
        f.truncate(size)
    assert request(served, GET_A)[0] == 200            # warm up before measuring
    pid = served.server.worker_pid
    before = rss_kib(pid)
    hoarder = socket.socket()
    hoarder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hoarder.connect(served.addr)
    req = b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n"
    stream = req * 20000
    sent = 0
    hoarder.setblocking(False)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.5 and sent < len(stream):
        try:
            sent += hoarder.send(stream[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    try:
        requested = (sent // len(req)) * size
        assert requested > 1 << 30
        time.sleep(0.3)
        growth = rss_kib(pid) - before
        assert growth < 64 * 1024, f"RSS grew by {growth} KiB"
        t1 = time.monotonic()
        assert request(served, GET_A)[::2] == (200, HELLO)
        assert time.monotonic() - t1 < 2.0
    finally:
        reset(hoarder)


def test_client_that_never_reads_holds_few_file_descriptors(served):
    """Pipelined file requests behind an unread response must not each hold an open file:
    with the default pipe that is ~1,000 descriptors per such client."""
    with open(served.root / "big.bin", "wb") as f:
        f.truncate(64 * MiB)
    pid = served.server.worker_pid
    before = open_fds(pid)
    hoarder = socket.socket()
    hoarder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hoarder.connect(served.addr)
    hoarder.setblocking(False)
    stream = b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n" * 5000
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0 and sent < len(stream):
        try:
            sent += hoarder.send(stream[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(0.3)
    try:
        held = open_fds(pid) - before
        assert held < 64, f"one client that never reads holds {held} descriptors"
    finally:
        reset(hoarder)


def test_client_that_never_reads_cannot_exhaust_descriptors(start):
    """With a small RLIMIT_NOFILE (as under many service managers), one such client must not
    lock everyone else out."""
    served = start_with_fd_limit(start, 256)
    (served.root / "a.txt").write_bytes(HELLO)
    with open(served.root / "big.bin", "wb") as f:
        f.truncate(64 * MiB)
    hoarder = socket.socket()
    hoarder.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hoarder.connect(served.addr)
    hoarder.setblocking(False)
    stream = b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
    sent = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 1.0 and sent < len(stream):
        try:
            sent += hoarder.send(stream[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    time.sleep(0.3)
    try:
        with served.connect(timeout=3) as sock:
            sock.sendall(GET_A)
            assert Reader(sock, timeout=3).response()[::2] == (200, HELLO)
    finally:
        reset(hoarder)
    time.sleep(0.3)
    assert request(served, GET_A)[::2] == (200, HELLO)    # and it recovers


def test_slow_download_of_a_huge_file_keeps_memory_small(served):
    size = 512 * MiB
    with open(served.root / "huge.bin", "wb") as f:
        f.truncate(size)                          # sparse: no disk, no page cache
    assert request(served, GET_A)[0] == 200
    pid = served.server.worker_pid
    before = rss_kib(pid)
    peak = before
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect(served.addr)
    try:
        sock.sendall(b"GET /huge.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(5)
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200 ")
        got = len(first)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.0:
            data = sock.recv(4096)
            assert data, "closed in the middle of a slow download"
            got += len(data)
            time.sleep(0.002)
            peak = max(peak, rss_kib(pid))
        assert got < size                           # it really was still in flight
    finally:
        reset(sock)
    assert peak - before < 32 * 1024, f"RSS grew by {peak - before} KiB"
    assert request(served, GET_A)[::2] == (200, HELLO)


def test_idle_server_uses_no_cpu(served):
    socks = []
    try:
        for _ in range(10):
            s = served.connect()
            s.sendall(GET_A)
            assert Reader(s).response()[0] == 200
            socks.append(s)                    # idle keep-alive connections stay open
        time.sleep(0.2)
        pid = served.server.worker_pid
        t0 = cpu_ticks(pid)
        time.sleep(2.0)
        used = cpu_ticks(pid) - t0
        assert used < 5, f"{used} clock ticks in 2 s of idling"
    finally:
        for s in socks:
            s.close()


def test_200_concurrent_connections_all_served(served):
    n = 200
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []
    ok = []

    def client() -> None:
        try:
            with served.connect(timeout=20) as sock:
                barrier.wait(timeout=20)        # all connected at once, then all ask
                r = Reader(sock, timeout=20)
                for i in range(3):
                    path = b"/a.txt" if i != 1 else b"/nope"
                    sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
                    status, _, body = r.response()
                    assert status == (404 if i == 1 else 200)
                    if i != 1:
                        assert body == HELLO
            ok.append(1)
        except BaseException as e:  # noqa: BLE001 - reported by the test thread below
            errors.append(e)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(ok) == n
