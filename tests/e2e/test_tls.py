"""HTTPS end to end: the real server with certificates made by trustme, real clients (curl,
Python's ssl, openssl s_client): SNI, ALPN, versions, resumption across workers, plain HTTP
on the TLS port, stalled handshakes, a big download to a slow reader, WebSocket, redirects,
HSTS, and TLS to upstreams."""
from __future__ import annotations

import datetime
import json
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

from .conftest import Reader, Server, free_port, recv_until_close
from .test_proxy import rss_kib, websocket_echo
from .upstreams import Upstream, http, response

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None or shutil.which("curl") is None,
                                reason="needs openssl and curl (installed by .ci/run)")


class PKI:
    """A test CA and the files of three certificates (a.test, b.test, *.wild.test)."""

    def __init__(self, root: Path) -> None:
        self.ca = trustme.CA()
        self.root = root
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.files: dict[str, tuple[str, str]] = {}
        for name in ("a.test", "b.test", "*.wild.test", "127.0.0.1"):
            self.add(name)

    def add(self, name: str, **kwargs: Any) -> tuple[str, str]:
        leaf = self.ca.issue_cert(name, **kwargs)
        stem = name.replace("*", "star")
        cert, key = self.root / f"{stem}.crt", self.root / f"{stem}.key"
        leaf.cert_chain_pems[0].write_to_path(str(cert))
        for pem in leaf.cert_chain_pems[1:]:
            pem.write_to_path(str(cert), append=True)
        leaf.private_key_pem.write_to_path(str(key))
        self.files[name] = (str(cert), str(key))
        return self.files[name]

    def tls(self, name: str, **extra: Any) -> dict[str, Any]:
        cert, key = self.files[name]
        return {"cert": cert, "key": key, **extra}

    def client(self, **kwargs: Any) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        for k, v in kwargs.items():
            setattr(ctx, k, v)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return PKI(tmp_path_factory.mktemp("pki"))


class Running:
    def __init__(self, server: Server, tls_port: int, plain_port: int | None, root: Path):
        self.server = server
        self.tls_port = tls_port
        self.plain_port = plain_port
        self.root = root


@pytest.fixture
def serve(tmp_path: Path, pki: PKI):
    started: list[Server] = []

    def run(servers: list[dict[str, Any]] | None = None, plain: bool = False,
            **top: Any) -> Running:
        root = tmp_path / "www"
        root.mkdir(exist_ok=True)
        (root / "index.html").write_text("hello over tls\n")
        tls_port, plain_port = free_port(), free_port() if plain else None
        listeners = [{"host": "127.0.0.1", "port": tls_port, "tls": True}]
        if plain:
            listeners.append({"host": "127.0.0.1", "port": plain_port})
        if servers is None:
            servers = [{"tls": pki.tls("a.test")}]
        for s in servers:
            s.setdefault("listeners", listeners)
            s.setdefault("routes", [{"req_path": "/", "type": "file_serve",
                                     "dir_path": str(root)}])
        path = tmp_path / f"tls-{tls_port}.json"
        path.write_text(json.dumps({"servers": servers, **top}))
        server = Server(["serve", "-c", str(path)])
        started.append(server)
        server.wait_listening(tls_port)
        return Running(server, tls_port, plain_port, root)

    yield run
    for server in started:
        assert server.stop() == 0, server.stderr.decode()
        assert b"Traceback" not in server.stderr, server.stderr.decode()


def tls_connect(port: int, ctx: ssl.SSLContext, name: str | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname=name)


def get(sock: ssl.SSLSocket | socket.socket, path: str = "/", host: str = "a.test",
        extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + extra + b"\r\n")
    return Reader(sock).response()


def names_of(sock: ssl.SSLSocket) -> list[str]:
    return [v for k, v in sock.getpeercert()["subjectAltName"]]


# --------------------------------------------------------------------------- basics


def test_curl_gets_the_page_over_https(serve, pki):
    run = serve()
    out = subprocess.run(
        ["curl", "-sS", "--cacert", str(pki.ca_file), "--resolve",
         f"a.test:{run.tls_port}:127.0.0.1", f"https://a.test:{run.tls_port}/", "-D", "-"],
        capture_output=True, timeout=10)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and body == b"hello over tls\n"


SNI = [("a.test", "a.test"), ("b.test", "b.test"), ("x.wild.test", "*.wild.test"),
       ("unknown.test", "a.test"), (None, "a.test")]


@pytest.mark.parametrize("sni,expect", SNI, ids=["a", "b", "wildcard", "unknown", "no-sni"])
def test_sni_picks_the_certificate_of_the_server_for_that_name(serve, pki, sni, expect):
    run = serve(servers=[
        {"hostnames": ["a.test"], "tls": pki.tls("a.test")},
        {"hostnames": ["b.test"], "tls": pki.tls("b.test")},
        {"hostnames": ["*.wild.test"], "tls": pki.tls("*.wild.test")},
    ])
    ctx = pki.client(check_hostname=False)
    with tls_connect(run.tls_port, ctx, sni) as sock:
        assert names_of(sock) == [expect]
        status, _, body = get(sock, host=sni or "a.test")
        # no server has that name: the default certificate, and eXpServer's 404 for the Host
        assert status == (404 if sni == "unknown.test" else 200)


def openssl(*args: str, stdin: bytes = b"GET / HTTP/1.1\r\nHost: a.test\r\n"
            b"Connection: close\r\n\r\n") -> str:
    out = subprocess.run(["openssl", "s_client", "-ign_eof", *args], input=stdin,
                         capture_output=True, timeout=15)
    return out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")


def test_alpn_offers_http_1_1(serve, pki):
    run = serve()
    text = openssl("-connect", f"127.0.0.1:{run.tls_port}", "-servername", "a.test",
                   "-alpn", "h2,http/1.1", "-CAfile", str(pki.ca_file))
    assert "ALPN protocol: http/1.1" in text
    assert "Verify return code: 0 (ok)" in text


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # the old versions, on purpose
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(serve, pki, version):
    run = serve()
    ctx = pki.client(minimum_version=version, maximum_version=version)
    ctx.set_ciphers("DEFAULT@SECLEVEL=0")
    with pytest.raises(ssl.SSLError):
        tls_connect(run.tls_port, ctx, "a.test").close()


@pytest.mark.parametrize("flag", ["-tls1_2", "-tls1_3"])
def test_sessions_resume_across_workers(serve, pki, tmp_path, flag):
    """Tickets are issued by contexts made before forking: any worker resumes them."""
    run = serve(workers=2)
    sess = tmp_path / "sess.pem"
    base = ["-connect", f"127.0.0.1:{run.tls_port}", "-servername", "a.test",
            "-CAfile", str(pki.ca_file), flag]
    first = openssl(*base, "-sess_out", str(sess))
    assert "New, TLSv1" in first, first
    reused = [openssl(*base, "-sess_in", str(sess)) for _ in range(6)]
    assert all("Reused, TLSv1" in text for text in reused), reused


# --------------------------------------------------------------------------- bad peers


def test_plain_http_on_the_tls_port_gets_nginx_answer_in_clear(serve):
    run = serve()
    with socket.create_connection(("127.0.0.1", run.tls_port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
        data = recv_until_close(sock)
    assert data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"The plain HTTP request was sent to HTTPS port" in data


def test_garbage_on_the_tls_port_is_closed_and_the_server_goes_on(serve, pki):
    run = serve()
    with socket.create_connection(("127.0.0.1", run.tls_port), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01\x00\x05hello-not-tls" * 3)
        answer = recv_until_close(sock)
    assert answer == b"" or answer[:1] == b"\x15"      # nothing, or a TLS alert; then close
    with tls_connect(run.tls_port, pki.client(), "a.test") as sock:
        assert get(sock)[0] == 200


def test_a_stalled_handshake_is_closed_at_the_header_timeout(serve):
    run = serve(header_timeout=1)
    with socket.create_connection(("127.0.0.1", run.tls_port), timeout=5) as sock:
        t0 = time.monotonic()
        sock.sendall(b"\x16\x03\x01")           # the start of a ClientHello, then nothing
        assert recv_until_close(sock, timeout=5) == b""
        assert 0.8 < time.monotonic() - t0 < 3.0


def test_big_download_to_a_slow_reader_costs_bounded_memory(serve, pki):
    """256 MiB over TLS: read from a file a chunk at a time as the client takes it."""
    run = serve()
    size = 256 << 20
    with open(run.root / "big.bin", "wb") as f:
        f.truncate(size)
    pid = run.server.worker_pid
    before = rss_kib(pid)
    with tls_connect(run.tls_port, pki.client(), "a.test") as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: a.test\r\n\r\n")
        got = len(sock.recv(65536))
        time.sleep(1.5)                         # the slow part: the server must wait
        during = rss_kib(pid)
        while True:
            data = sock.recv(1 << 20)
            if not data:
                break
            got += len(data)
            if got >= size:
                break
    assert during - before < 16 * 1024, (before, during)
    assert got > size


def test_websocket_through_a_tls_listener(serve, pki):
    u = Upstream(websocket_echo, "ws")
    try:
        run = serve(servers=[{"tls": pki.tls("a.test"), "routes": [
            {"req_path": "/", "type": "reverse_proxy", "upstreams": [u.address]}]}])
        with tls_connect(run.tls_port, pki.client(), "a.test") as sock:
            sock.sendall(b"GET /chat HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                         b"Sec-WebSocket-Version: 13\r\n\r\n")
            r = Reader(sock)
            status, headers, _ = r.response(head_only=True)
            assert status == 101 and headers["upgrade"] == "websocket"
            sock.sendall(b"ping over tls")
            got = r.buf
            while len(got) < len(b"ping over tls"):
                got += sock.recv(100)
            assert got == b"ping over tls"
    finally:
        u.stop()


# --------------------------------------------------------------------------- policies


def test_https_redirect_and_hsts(serve, pki):
    run = serve(servers=[{"hostnames": ["a.test"], "https_redirect": True,
                          "tls": pki.tls("a.test", hsts=31536000)}], plain=True)
    with socket.create_connection(("127.0.0.1", run.plain_port), timeout=5) as sock:
        status, headers, _ = get(sock, "/x/y?q=1")
        assert status == 301
        assert headers["location"] == f"https://a.test:{run.tls_port}/x/y?q=1"
        assert "strict-transport-security" not in headers
        sock.sendall(b"POST /form HTTP/1.1\r\nHost: a.test\r\nContent-Length: 0\r\n\r\n")
        status, headers, _ = Reader(sock).response()
        assert status == 308
    with tls_connect(run.tls_port, pki.client(), "a.test") as sock:
        status, headers, _ = get(sock)
        assert status == 200
        assert headers["strict-transport-security"] == "max-age=31536000"


def test_hup_picks_up_new_certificate_files_without_dropping_a_connection(serve, pki):
    run = serve()
    size = 16 << 20
    (run.root / "big.bin").write_bytes(b"b" * size)
    ctx = pki.client()
    kept = tls_connect(run.tls_port, ctx, "a.test")
    before = kept.getpeercert()["serialNumber"]
    kept.sendall(b"GET /big.bin HTTP/1.1\r\nHost: a.test\r\n\r\n")
    got = len(kept.recv(65536))                 # a download in flight across the reload
    cert, key = pki.files["a.test"]
    fresh = pki.ca.issue_cert("a.test")                     # same name, a new certificate
    fresh.cert_chain_pems[0].write_to_path(cert)
    fresh.private_key_pem.write_to_path(key)
    import os
    import signal as sig
    os.kill(run.server.pid, sig.SIGHUP)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with tls_connect(run.tls_port, ctx, "a.test") as sock:
            if sock.getpeercert()["serialNumber"] != before:
                break
        time.sleep(0.1)
    else:
        raise AssertionError("the new certificate was not served")
    while got < size:                           # ... finishes on the old certificate
        data = kept.recv(1 << 20)
        if not data:
            break
        got += len(data)
    kept.close()
    assert got > size


# --------------------------------------------------------------------------- upstreams


def tls_upstream(pki: PKI) -> Upstream:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = pki.files["127.0.0.1"]
    ctx.load_cert_chain(cert, key)

    def reply(req, conn):
        proto = (req.get(b"x-forwarded-proto") or b"").decode()
        return response(200, f"tls upstream saw {req.get(b'host').decode()} {proto}".encode())
    return Upstream(http(reply), "tls-up", tls=ctx)


@pytest.mark.parametrize("upstream_tls,status", [
    ("ca", 200), ("system", 502), ("no-verify", 200)], ids=["verified", "untrusted", "unverified"])
def test_proxy_to_a_tls_upstream(serve, pki, upstream_tls, status):
    u = tls_upstream(pki)
    options = {"ca": {"ca_file": str(pki.ca_file)}, "system": {},
               "no-verify": {"verify": False}}[upstream_tls]
    try:
        run = serve(servers=[{"tls": pki.tls("a.test"), "routes": [
            {"req_path": "/", "type": "reverse_proxy", "upstreams": [f"https://{u.address}"],
             "upstream_tls": options}]}])
        with tls_connect(run.tls_port, pki.client(), "a.test") as sock:
            code, _, body = get(sock)
            assert code == status
            if status == 200:
                assert body == f"tls upstream saw {u.address} https".encode()
                assert get(sock)[0] == 200
                assert u.accepted == 1          # pooled keep-alive over TLS
    finally:
        u.stop()
    if status == 502:
        assert run.server.stop() == 0
        assert b"TLS handshake failed" in run.server.stderr


# --------------------------------------------------------------------------- check


def run_check(tmp_path: Path, tls: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    import sys
    (tmp_path / "w").mkdir(exist_ok=True)
    path = tmp_path / "check.json"
    path.write_text(json.dumps({"servers": [{
        "listeners": [{"host": "127.0.0.1", "port": 8443, "tls": True}], "tls": tls,
        "routes": [{"req_path": "/", "type": "file_serve", "dir_path": str(tmp_path / "w")}]}]}))
    return subprocess.run([sys.executable, "-m", "expserver", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=20)


def test_check_shows_the_certificate(tmp_path, pki):
    out = run_check(tmp_path, pki.tls("a.test"))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if "certificate" in line)
    assert "names a.test" in line and "expires" in line
    assert "warning" not in out.stderr


def test_check_warns_about_a_certificate_that_expires_soon(tmp_path, pki):
    soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=5)
    cert, key = pki.add("soon.test", not_after=soon)
    out = run_check(tmp_path, {"cert": cert, "key": key})
    assert out.returncode == 0
    assert "warning: servers[0]: certificate" in out.stderr
    assert re.search(r"expires in [45]\.\d days", out.stderr), out.stderr


def test_check_refuses_a_key_that_does_not_match(tmp_path, pki):
    cert, _ = pki.files["a.test"]
    _, other = pki.files["b.test"]
    out = run_check(tmp_path, {"cert": cert, "key": other})
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1
    assert "servers[0].tls:" in out.stderr and "does not match" in out.stderr


def test_check_refuses_a_missing_certificate_file(tmp_path, pki):
    out = run_check(tmp_path, {"cert": str(tmp_path / "nope.crt"), "key": pki.files["a.test"][1]})
    assert out.returncode == 1
    assert "servers[0].tls.cert:" in out.stderr and "nope.crt" in out.stderr


def test_the_stdlib_tls_path_serves_the_same(serve, pki, monkeypatch):
    """EXPSERVER_TLS_STDLIB=1: reads and writes through the ssl module's methods instead of
    libssl's functions on the same objects (the path for Pythons of unknown layout)."""
    monkeypatch.setenv("EXPSERVER_TLS_STDLIB", "1")
    run = serve()
    size = 3 << 20
    (run.root / "m.bin").write_bytes(bytes(range(256)) * (size // 256))
    with tls_connect(run.tls_port, pki.client(), "a.test") as sock:
        for _ in range(3):
            status, _, body = get(sock, "/m.bin")
            assert status == 200 and body == bytes(range(256)) * (size // 256)
        assert get(sock)[2] == b"hello over tls\n"
