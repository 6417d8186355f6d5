"""Start the real ``expserver serve`` process on 127.0.0.1 for end-to-end tests."""
from __future__ import annotations

import json
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``expserver`` process."""

    def __init__(self, args: list[str], cwd: str | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expserver", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
        )
        self.stderr = b""
        self.stdout = b""

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: "
                                   f"{self.proc.stderr.read().decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("server did not start listening")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.returncode is not None and self.proc.stderr.closed:
            return self.proc.returncode      # stopped already
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    @property
    def pid(self) -> int:
        """The master's pid (the process started)."""
        return self.proc.pid

    def worker_pids(self, count: int = 1, timeout: float = 5.0) -> list[int]:
        """The master's worker processes, once ``count`` of them run."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
                    kids = [int(p) for p in f.read().split()]
            except OSError:
                kids = []
            if len(kids) >= count or time.monotonic() > deadline:
                return kids
            time.sleep(0.02)

    @property
    def worker_pid(self) -> int:
        """The worker of a one-worker server (the process that serves)."""
        kids = self.worker_pids(1)
        assert len(kids) == 1, kids
        return kids[0]


class Served:
    """A server with a config, its port and its document root."""

    def __init__(self, server: Server, port: int, root: Path, config: Path | None = None) -> None:
        self.server = server
        self.port = port
        self.root = root
        self.config = config            # the config file (rewrite it, then SIGHUP)
        self.addr = ("127.0.0.1", port)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(self.addr, timeout=timeout)

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"


@pytest.fixture
def start(tmp_path: Path) -> Iterator:
    """``start(routes=[...], **top_level)`` runs a server with one listener; returns Served.

    Routes default to one ``/`` file_serve route over ``tmp_path/www``. Every started
    server is stopped with SIGTERM at the end of the test and must exit 0.
    """
    started: list[Server] = []

    def _start(routes: list[dict] | None = None, servers: list[dict] | None = None,
               **top: object) -> Served:
        root = tmp_path / "www"
        root.mkdir(exist_ok=True)
        port = free_port()
        if servers is None:
            if routes is None:
                routes = [{"req_path": "/", "type": "file_serve", "dir_path": str(root)}]
            servers = [{"listeners": [{"host": "127.0.0.1", "port": port}], "routes": routes}]
        else:
            for s in servers:
                s.setdefault("listeners", [{"host": "127.0.0.1", "port": port}])
        cfg = {"servers": servers, **top}
        path = tmp_path / f"config-{port}.json"
        path.write_text(json.dumps(cfg))
        server = Server(["serve", "-c", str(path)])
        started.append(server)
        server.wait_listening(port)
        return Served(server, port, root, path)

    yield _start
    for server in started:
        code = server.stop()
        assert code == 0, server.stderr.decode()
        assert b"Traceback" not in server.stderr, server.stderr.decode()


def recv_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


class Reader:
    """Reads responses off one socket, keeping bytes that belong to the next one."""

    def __init__(self, sock: socket.socket, timeout: float = 5.0) -> None:
        self.sock = sock
        self.buf = b""
        sock.settimeout(timeout)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise EOFError("connection closed in the middle of a line")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise EOFError("connection closed in the middle of a body")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        """One response framed by Content-Length, chunked, or close: (status, headers, body).

        Header names are lower-cased; a repeated field keeps its last value.
        """
        if not self.buf and not self._fill():
            raise EOFError("connection closed before a response")
        status = int(self._line().split()[1])
        headers: dict[str, str] = {}
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only or status in (204, 304) or status < 200:
            return status, headers, b""
        if "content-length" in headers:
            return status, headers, self._exactly(int(headers["content-length"]))
        if headers.get("transfer-encoding") == "chunked":
            parts = []
            while size := int(self._line().split(b";")[0], 16):
                parts.append(self._exactly(size))
                self._line()
            while self._line():
                pass
            return status, headers, b"".join(parts)
        while self._fill():
            pass
        body, self.buf = self.buf, b""
        return status, headers, body

    def closed(self, timeout: float = 5.0) -> bool:
        """Whether the server closes the connection with no further bytes."""
        self.sock.settimeout(timeout)
        try:
            return not self.buf and self.sock.recv(1) == b""
        except ConnectionResetError:
            return not self.buf


def request(served: Served, raw: bytes, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
    """Send ``raw`` on a new connection and read one response."""
    with served.connect() as sock:
        sock.sendall(raw)
        return Reader(sock).response(head_only)


@pytest.fixture(scope="module")
def module_served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One default server (a ``/`` file_serve route over ``root``) shared by a test module.

    For tests that only need the defaults and use their own connections: it saves a process
    start per test. It must exit 0 with no traceback at the end of the module.
    """
    tmp = tmp_path_factory.mktemp("module")
    root = tmp / "www"
    root.mkdir()
    port = free_port()
    path = tmp / "config.json"
    path.write_text(json.dumps({"servers": [{
        "listeners": [{"host": "127.0.0.1", "port": port}],
        "routes": [{"req_path": "/", "type": "file_serve", "dir_path": str(root)}]}]}))
    server = Server(["serve", "-c", str(path)])
    server.wait_listening(port)
    yield Served(server, port, root)
    code = server.stop()
    assert code == 0, server.stderr.decode()
    assert b"Traceback" not in server.stderr, server.stderr.decode()


def start_with_fd_limit(start, limit: int) -> Served:
    """A default server whose RLIMIT_NOFILE is ``limit`` (as under many service managers)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        return start()                      # the child inherits the limit
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
