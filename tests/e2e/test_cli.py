"""The command line as a user meets it: ``expserver serve`` / ``check``, exit codes, one-line
errors, signals, worker processes, and eXpServer's own sample config."""
from __future__ import annotations

import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib

from .conftest import Reader, free_port

REPO = Path(__file__).resolve().parents[2]
SAMPLE = Path("/work/shared/examples/xps_config.json")
HELLO = b"hello\n"
MiB = 1 << 20


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def console_script() -> list[str]:
    """What the installed ``expserver`` script runs: the [project.scripts] entry point."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, func = scripts["expserver"].partition(":")
    return [sys.executable, "-c", f"import sys; from {module} import {func}; sys.exit({func}())"]


PYTHON_M = [sys.executable, "-m", "expserver"]


class Proc:
    """An expserver process started from any directory."""

    def __init__(self, args: list[str], cwd: Path | str | None = None,
                 cmd: list[str] = PYTHON_M) -> None:
        self.proc = subprocess.Popen([*cmd, *args], cwd=cwd, env=env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout = b""
        self.stderr = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_listening(self, port: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.finish()
                raise AssertionError(f"exited {self.proc.returncode}: {self.stderr.decode()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("did not start listening")

    def finish(self, timeout: float = 10.0) -> int:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            self.stdout += out
            self.stderr += err
            raise AssertionError(f"still running after {timeout} s: {self.stderr.decode()}") from None
        self.stdout += out
        self.stderr += err
        return self.proc.returncode

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.finish(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate()


@pytest.fixture
def procs():
    started: list[Proc] = []

    def _start(*args, **kw) -> Proc:
        p = Proc(*args, **kw)
        started.append(p)
        return p

    yield _start
    for p in started:
        p.kill()


def run(args: list[str], cwd: Path | None = None,
        timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*PYTHON_M, *args], cwd=cwd, env=env(), capture_output=True,
                          timeout=timeout, check=False)


def get(port: int, path: str, host: str = "x", extra: bytes = b"") -> tuple[int, dict, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(),
                                                                   extra))
        return Reader(sock).response()


def one_line(stderr: bytes) -> str:
    text = stderr.decode()
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def config_for(port: int, root: Path, **top) -> dict:
    return {"servers": [{"listeners": [{"host": "127.0.0.1", "port": port}],
                         "routes": [{"req_path": "/", "type": "file_serve",
                                     "dir_path": str(root)}]}], **top}


@pytest.fixture
def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_bytes(HELLO)
    (root / "sub" / "b.txt").write_bytes(b"b\n")
    return root


# ---------------------------------------------------------------------------- serve DIR

@pytest.mark.parametrize("cmd", [console_script(), PYTHON_M], ids=["expserver", "python-m"])
def test_serve_directory_without_config(procs, www, cmd):
    port = free_port()
    p = procs(["serve", "www", "--port", str(port)], cwd=www.parent, cmd=cmd)
    p.wait_listening(port)
    assert get(port, "/a.txt")[::2] == (200, HELLO)
    assert get(port, "/sub/b.txt")[::2] == (200, b"b\n")
    status, headers, body = get(port, "/")
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"  # no config: utf-8
    assert b"<table" in body
    assert b'href="/a.txt"' in body and b'href="/sub/"' in body
    assert p.stop() == 0
    assert f"http://127.0.0.1:{port}/".encode() in p.stderr
    assert b"Traceback" not in p.stderr


def test_serve_without_dir_serves_the_current_directory(procs, www):
    port = free_port()
    p = procs(["serve", "--port", str(port)], cwd=www)
    p.wait_listening(port)
    assert get(port, "/a.txt")[::2] == (200, HELLO)
    assert p.stop() == 0


# ---------------------------------------------------------------------------- check

def test_check_good_config(tmp_path, www):
    cfg = tmp_path / "good.json"
    cfg.write_text(json.dumps(config_for(8123, www, keepalive_timeout=5)))
    out = run(["check", "-c", str(cfg)])
    assert out.returncode == 0, out.stderr.decode()
    text = out.stdout.decode()
    assert "servers[0]" in text and "127.0.0.1:8123" in text and "file_serve" in text
    assert str(www) in text
    assert out.stderr == b""


def good(root: Path) -> dict:
    return config_for(8123, root)


def _mutate(f):
    def make(root: Path):
        cfg = good(root)
        f(cfg)
        return cfg
    return make


BAD = [
    ("invalid-json", lambda root: '{"servers": [', "$", "invalid JSON"),
    ("wrong-type", _mutate(lambda c: c["servers"][0]["listeners"][0].update(port="80")),
     "servers[0].listeners[0].port", "integer"),
    ("unknown-route-type", _mutate(lambda c: c["servers"][0]["routes"][0].update(
        type="fileserve")), "servers[0].routes[0].type", "file_serve"),
    ("missing-redirect-url", _mutate(lambda c: c["servers"][0]["routes"].append(
        {"req_path": "/r", "type": "redirect"})), "servers[0].routes[1]", "redirect_url"),
    ("port-70000", _mutate(lambda c: c["servers"][0]["listeners"][0].update(port=70000)),
     "servers[0].listeners[0].port", "65535"),
    ("upstream-x", _mutate(lambda c: c["servers"][0]["routes"].append(
        {"req_path": "/api", "type": "reverse_proxy", "upstreams": ["127.0.0.1:3000", "x"]})),
     "servers[0].routes[1].upstreams[1]", '"x" is not host:port'),
    ("unknown-key", _mutate(lambda c: c["servers"][0].update(listners=[])),
     "servers[0].listners", "unknown key"),
    ("missing-dir", _mutate(lambda c: c["servers"][0]["routes"][0].update(
        dir_path="/nonexistent/expserver-e2e")), "servers[0].routes[0].dir_path",
     "/nonexistent/expserver-e2e"),
    ("not-an-object", lambda root: "[]", "$", "object"),
]


def write_config(tmp_path: Path, make, root: Path) -> Path:
    value = make(root)
    path = tmp_path / "bad.json"
    path.write_text(value if isinstance(value, str) else json.dumps(value))
    return path


@pytest.mark.parametrize("make,path,reason", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_check_bad_config(tmp_path, www, make, path, reason):
    cfg = write_config(tmp_path, make, www)
    out = run(["check", "-c", str(cfg)])
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert f"{path}: " in line, line
    assert reason in line, line
    assert out.stdout == b""


def test_check_missing_file(tmp_path):
    out = run(["check", "-c", str(tmp_path / "nope.json")])
    assert out.returncode == 1
    assert "nope.json" in one_line(out.stderr)


@pytest.mark.parametrize("make,path,reason", [b[1:] for b in BAD[1:6]],
                         ids=[b[0] for b in BAD[1:6]])
def test_serve_bad_config_exits_1_and_never_listens(procs, tmp_path, www, make, path, reason):
    port = free_port()

    def make_with_port(root):
        cfg = make(root)
        # a good first listener: it must not be opened when a later part is bad
        if cfg["servers"][0]["listeners"][0]["port"] == 8123:
            cfg["servers"][0]["listeners"][0]["port"] = port
        cfg["servers"].insert(0, config_for(port, root)["servers"][0])
        return cfg

    cfg = write_config(tmp_path, make_with_port, www)
    p = procs(["serve", "-c", str(cfg)])
    deadline = time.monotonic() + 10
    while p.proc.poll() is None and time.monotonic() < deadline:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        time.sleep(0.01)
    assert p.finish() == 1
    line = one_line(p.stderr)
    assert f"{path.replace('servers[0]', 'servers[1]')}: " in line and reason in line, line


def test_serve_with_both_config_and_dir_is_refused(tmp_path, www):
    cfg = tmp_path / "good.json"
    cfg.write_text(json.dumps(config_for(free_port(), www)))
    out = run(["serve", "-c", str(cfg), str(www)])
    assert out.returncode == 1
    one_line(out.stderr)


# ---------------------------------------------------------------------------- start-up errors

def test_port_in_use_config(procs, tmp_path, www):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cfg = tmp_path / "cfg.json"
        cfg.write_text(json.dumps(config_for(port, www)))
        p = procs(["serve", "-c", str(cfg)])
        assert p.finish() == 1
    line = one_line(p.stderr)
    assert f"127.0.0.1:{port}" in line, line


def test_port_in_use_does_not_start_half_a_server(procs, tmp_path, www):
    """Two listeners, the second taken: the first must never accept a connection."""
    free = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        cfg = config_for(free, www)
        cfg["servers"].append(config_for(taken, www)["servers"][0])
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        p = procs(["serve", "-c", str(path)])
        while p.proc.poll() is None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", free), timeout=0.5).close()
            time.sleep(0.01)
        assert p.finish() == 1
    assert f"127.0.0.1:{taken}" in one_line(p.stderr)


def test_port_in_use_no_config(procs, www):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        p = procs(["serve", str(www), "--port", str(port)])
        assert p.finish() == 1
    line = one_line(p.stderr)
    assert f"127.0.0.1:{port}" in line, line


def test_missing_directory_no_config(www):
    out = run(["serve", str(www / "nope"), "--port", str(free_port())])
    assert out.returncode == 1
    assert str(www / "nope") in one_line(out.stderr)


def test_missing_dir_path_in_config(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config_for(free_port(), tmp_path / "public")))
    out = run(["serve", "-c", str(cfg)])
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert "servers[0].routes[0].dir_path" in line and str(tmp_path / "public") in line


# ---------------------------------------------------------------------------- signals

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_fast_shutdown_signals_exit_0(procs, www, sig):
    port = free_port()
    p = procs(["serve", str(www), "--port", str(port)])
    p.wait_listening(port)
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)   # must not delay exit
    with idle:
        idle.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        assert Reader(idle).response()[0] == 200
        t0 = time.monotonic()
        assert p.stop(sig) == 0
        assert time.monotonic() - t0 < 5
    assert b"Traceback" not in p.stderr


def test_sigquit_finishes_the_download_then_exits(procs, www):
    size = 32 * MiB
    with open(www / "big.bin", "wb") as f:
        f.truncate(size)
    port = free_port()
    p = procs(["serve", str(www), "--port", str(port)])
    p.wait_listening(port)
    idle = socket.create_connection(("127.0.0.1", port), timeout=5)
    idle.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
    idle_reader = Reader(idle)
    assert idle_reader.response()[0] == 200

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(5)
    sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(4096)
    head, _, body = head.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Content-Length: %d" % size in head
    got = len(body)
    time.sleep(0.2)

    p.proc.send_signal(signal.SIGQUIT)
    time.sleep(0.5)
    # in flight: the process lives on; new connections are refused; idle ones are closed
    assert p.proc.poll() is None
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        refused = False
    except ConnectionRefusedError:
        refused = True
    except OSError:
        refused = True
    idle_closed = idle_reader.closed(timeout=2)
    idle.close()

    while True:                                 # now read as fast as we can
        data = sock.recv(1 << 20)
        if not data:
            break
        got += len(data)
    sock.close()
    assert got == size
    assert p.finish(timeout=10) == 0
    assert b"Traceback" not in p.stderr
    assert idle_closed, "an idle keep-alive connection stayed open after SIGQUIT"
    assert refused, "a new connection was accepted (or left hanging) after SIGQUIT"


def test_sigquit_with_nothing_in_flight_exits_at_once(procs, www):
    port = free_port()
    p = procs(["serve", str(www), "--port", str(port)])
    p.wait_listening(port)
    t0 = time.monotonic()
    assert p.stop(signal.SIGQUIT) == 0
    assert time.monotonic() - t0 < 5


# ---------------------------------------------------------------------------- workers

def children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(x) for x in text.split()]


def test_two_workers_serve_and_exit_on_sigterm(procs, www):
    port = free_port()
    p = procs(["serve", str(www), "--port", str(port), "--workers", "2"])
    p.wait_listening(port)
    deadline = time.monotonic() + 5
    while len(children(p.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    workers = children(p.pid)
    assert len(workers) == 2, workers
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(16)]
    try:
        for _ in range(3):
            for s in socks:
                s.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            for s in socks:
                assert Reader(s).response()[::2] == (200, HELLO)
    finally:
        for s in socks:
            s.close()
    assert p.stop(signal.SIGTERM) == 0
    for w in workers:
        assert not Path(f"/proc/{w}").exists() or \
            Path(f"/proc/{w}/stat").read_text().split(")")[1].split()[0] == "Z"
    assert b"Traceback" not in p.stderr


# ---------------------------------------------------------------------------- sample config

def test_expserver_sample_config_runs_unchanged(procs, tmp_path):
    if not SAMPLE.exists():
        pytest.skip(f"{SAMPLE} is missing")
    text = SAMPLE.read_text()
    original = json.loads(text)
    ports = {}
    for server in original["servers"]:
        for lc in server["listeners"]:
            ports[lc["port"]] = free_port()
    # rewrite only the port numbers, keeping every other byte of the file
    rewritten = re.sub(r'("port"\s*:\s*)(\d+)', lambda m: m[1] + str(ports[int(m[2])]), text)
    conf = tmp_path / "conf"
    public = tmp_path / "public"
    conf.mkdir()
    public.mkdir()
    index = b"<!DOCTYPE html><title>eXpServer</title>" + b"<p>hello from public</p>\n" * 80
    (public / "index.html").write_bytes(index)
    (public / "a.txt").write_bytes(HELLO)
    cfg = conf / "xps_config.json"
    cfg.write_text(rewritten)
    changed = json.loads(rewritten)
    for server in changed["servers"]:
        for lc in server["listeners"]:
            lc["port"] = {v: k for k, v in ports.items()}[lc["port"]]
    assert changed == original

    out = run(["check", "-c", str(cfg)])
    assert out.returncode == 0, out.stderr.decode()

    first, _, third, fourth = (ports[lc["port"]] for s in original["servers"]
                               for lc in s["listeners"])
    p = procs(["serve", "-c", "conf/xps_config.json"], cwd=tmp_path)
    for port in (first, third, fourth):
        p.wait_listening(port)
    assert get(first, "/")[::2] == (200, index)
    assert get(first, "/a.txt")[::2] == (200, HELLO)
    status, headers, body = get(first, "/", extra=b"Accept-Encoding: gzip\r\n")
    assert status == 200
    if headers.get("content-encoding") == "gzip":             # gzip_enable: true
        body = gzip.decompress(body)
    assert body == index
    status, headers, _ = get(first, "/redirect")
    assert (status, headers["location"]) == (302, "http://localhost:8002/")
    status, headers, _ = get(third, "/anything")
    assert status == 302 and headers["location"].startswith("https://expserver.github.io")
    assert get(fourth, "/")[0] == 404
    status, headers, body = get(fourth, "/api")           # eXpServer's dashboard endpoint
    assert (status, headers["access-control-allow-origin"]) == (200, "*")
    assert json.loads(body)["workers"] == 4
    assert p.stop() == 0
    assert b"Traceback" not in p.stderr


def test_serve_starts_with_the_largest_values_check_accepts(start, tmp_path):
    """`check` accepting a config means `serve` starts with it: every bound is what the
    compiled core can hold (these used to pass check and crash serve with OverflowError)."""
    from expserver.config.specs import INT32_MAX, INT64_MAX, MAX_SECONDS
    (tmp_path / "www").mkdir(exist_ok=True)
    (tmp_path / "www" / "a.txt").write_text("a")
    served = start(
        servers=[{
            "hostnames": ["x" * 63 + ".example", "127.0.0.1"],
            "routes": [
                {"req_path": "/", "type": "file_serve", "dir_path": str(tmp_path / "www")},
                {"req_path": "/up", "type": "reverse_proxy", "upstreams": ["127.0.0.1:9"],
                 "retries": INT32_MAX, "upstream_keepalive": INT32_MAX,
                 "max_body_size": INT64_MAX, "connect_timeout": MAX_SECONDS,
                 "health_check": {"timeout": MAX_SECONDS, "interval": MAX_SECONDS}},
            ]}],
        max_body_size=INT64_MAX, max_connections=INT32_MAX, header_timeout=MAX_SECONDS,
        keepalive_timeout=MAX_SECONDS, drain_timeout=MAX_SECONDS)
    with served.connect() as sock:
        sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 OK\r\n")
