"""Running for months: access and error logs, signals, reloads under load, respawns, the
environment, privilege drop and the health route, against the real process."""
from __future__ import annotations

import http.client
import json
import os
import pwd
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .conftest import Reader, Server, free_port, recv_until_close, request

COMBINED = re.compile(
    r'^127\.0\.0\.1 - - \[\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4}\] '
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) "(?P<referer>[^"]*)" '
    r'"(?P<agent>[^"]*)"$')


def wait_for(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def lines_of(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def get(served, path: str = "/", extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    return request(served, f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n")


# --------------------------------------------------------------------------- access log


def test_combined_access_log_lines_are_nginx_combined(start, tmp_path):
    log = tmp_path / "access.log"
    served = start(access_log={"path": str(log), "format": "combined"})
    (served.root / "a.txt").write_bytes(b"hello")
    assert get(served, "/a.txt?x=1", b"Referer: http://ref.test/\r\nUser-Agent: agent/1.0\r\n"
               )[0] == 200
    assert get(served, "/missing", b'User-Agent: say "hi" caf\xe9\r\n')[0] == 404
    assert wait_for(lambda: len(lines_of(log)) == 2)       # flushed within a second
    first, second = (COMBINED.match(line) for line in lines_of(log))
    assert first and second, lines_of(log)
    assert first.group("request", "status", "bytes", "referer", "agent") == (
        "GET /a.txt?x=1 HTTP/1.1", "200", "5", "http://ref.test/", "agent/1.0")
    assert second.group("status", "referer", "agent") == ("404", "-", r"say \x22hi\x22 caf\xE9")


def test_json_access_log_lines_are_json_with_caddy_names(start, tmp_path):
    log = tmp_path / "access.json"
    served = start(access_log={"path": str(log), "format": "json"})
    (served.root / "b.txt").write_bytes(b"0123456789")
    get(served, "/b.txt", b"User-Agent: t\xe9st\r\n")
    assert wait_for(lambda: len(lines_of(log)) == 1)
    entry = json.loads(lines_of(log)[0])
    assert entry["request"]["remote_ip"] == "127.0.0.1"
    assert (entry["request"]["method"], entry["request"]["uri"]) == ("GET", "/b.txt")
    assert entry["request"]["headers"]["User-Agent"] == ["t\u00e9st"]
    assert (entry["status"], entry["size"]) == (200, 10)
    assert 0 <= entry["duration"] < 1 and entry["ts"] > 1.7e9


def test_a_template_access_log(start, tmp_path):
    log = tmp_path / "t.log"
    served = start(access_log={"path": str(log), "format": "$status $request_method $request_uri? "
                                                            "$body_bytes_sent"})
    status, _, body = get(served, "/nope")
    assert wait_for(lambda: lines_of(log) == [f"404 GET /nope? {len(body)}"]), lines_of(log)


def test_a_client_that_leaves_mid_download_is_logged_with_what_it_got(start, tmp_path):
    log = tmp_path / "access.log"
    served = start(access_log={"path": str(log), "format": "$status $body_bytes_sent"})
    (served.root / "big.bin").write_bytes(b"x" * (64 << 20))
    with served.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1000)
    assert wait_for(lambda: len(lines_of(log)) == 1, timeout=10)
    status, sent = lines_of(log)[0].split()
    assert status == "200" and 0 < int(sent) < 64 << 20


def test_serve_dir_logs_to_stdout(tmp_path):
    (tmp_path / "i.txt").write_text("i")
    port = free_port()
    server = Server(["serve", str(tmp_path), "--port", str(port)])
    server.wait_listening(port)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET /i.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        recv_until_close(sock)
    assert server.stop() == 0
    assert b'"GET /i.txt HTTP/1.1" 200 1 "-" "-"' in server.stdout


def test_usr1_after_logrotate_moved_the_file_writes_a_new_one(start, tmp_path):
    log = tmp_path / "access.log"
    served = start(access_log={"path": str(log), "format": "$request_uri"})
    get(served, "/before")
    assert wait_for(lambda: lines_of(log) == ["/before"])
    log.rename(tmp_path / "access.log.1")
    os.kill(served.server.pid, signal.SIGUSR1)
    assert wait_for(log.exists)
    get(served, "/after")
    assert wait_for(lambda: lines_of(log) == ["/after"])
    assert lines_of(tmp_path / "access.log.1") == ["/before"]


# --------------------------------------------------------------------------- error log


def test_the_error_log_says_which_upstream_failed_and_why(start, tmp_path):
    """A refused and a silent upstream are logged with the peer and the reason, and at
    info a client's timeout too; nothing of it as a traceback."""
    errors = tmp_path / "error.log"
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)                    # the kernel accepts; nobody ever answers
    refused = free_port()
    try:
        served = start(routes=[
            {"req_path": "/dead", "type": "reverse_proxy", "upstreams": [f"127.0.0.1:{refused}"]},
            {"req_path": "/slow", "type": "reverse_proxy", "upstream_read_timeout": 0.5,
             "upstreams": [f"127.0.0.1:{silent.getsockname()[1]}"]}],
            header_timeout=0.5, error_log={"path": str(errors), "level": "info"})
        assert get(served, "/dead")[0] == 502
        assert get(served, "/slow")[0] == 504
        with socket.create_connection(("127.0.0.1", served.port)) as stalled:
            stalled.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")       # never finished
            assert recv_until_close(stalled).startswith(b"HTTP/1.1 408 ")
        assert wait_for(lambda: sum("[error]" in line for line in lines_of(errors)) >= 2 and
                        any("timed out" in line and "[info]" in line for line in lines_of(errors)))
    finally:
        silent.close()
    text = errors.read_text()
    assert re.search(rf"\[error\] \d+: upstream 127\.0\.0\.1:{refused} connect failed: "
                     r"Connection refused \(the exchange for GET /dead from 127\.0\.0\.1\)", text)
    assert re.search(r"\[error\] \d+: upstream 127\.0\.0\.1:\d+ timed out before its response "
                     r"head \(upstream_read_timeout 0\.5 s\) \(the exchange for GET /slow", text)
    assert re.search(r"\[info\] \d+: the connection from 127\.0\.0\.1 timed out reading "
                     r"the request head", text)
    assert "Traceback" not in text and served.server.stderr == b""


def test_the_error_log_level_leaves_out_what_is_below_it(start, tmp_path):
    errors = tmp_path / "error.log"
    served = start(routes=[{"req_path": "/", "type": "reverse_proxy",
                            "upstreams": [f"127.0.0.1:{free_port()}"]}],
                   header_timeout=0.5, error_log={"path": str(errors), "level": "error"})
    with socket.create_connection(("127.0.0.1", served.port)) as stalled:
        stalled.sendall(b"GET / HTTP/1.1\r\n")
        assert recv_until_close(stalled).startswith(b"HTTP/1.1 408 ")
    assert get(served)[0] == 502
    assert wait_for(lambda: any("[error]" in line for line in lines_of(errors)))
    assert not [line for line in lines_of(errors) if "[error]" not in line]


# --------------------------------------------------------------------------- reload


def rewrite(served, change) -> None:
    cfg = json.loads(served.config.read_text())
    change(cfg)
    served.config.write_text(json.dumps(cfg))


def test_hup_serves_a_changed_route_while_an_old_download_finishes(start, tmp_path):
    served = start()
    size = 32 << 20
    (served.root / "big.bin").write_bytes(bytes(range(256)) * (size // 256))
    old = served.server.worker_pid
    slow = served.connect()
    slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    slow.sendall(b"GET /big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
    got = slow.recv(65536)
    assert get(served, "/new")[0] == 404
    rewrite(served, lambda cfg: cfg["servers"][0]["routes"].insert(0, {
        "req_path": "/new", "type": "redirect", "redirect_url": "http://example.test/"}))
    os.kill(served.server.pid, signal.SIGHUP)
    assert wait_for(lambda: get(served, "/new")[0] == 302)
    new = [p for p in served.server.worker_pids(2) if p != old]
    assert new, "no new worker"
    while True:                             # the old worker finishes its download intact
        data = slow.recv(1 << 20)
        if not data:
            break
        got += data
        if len(got) >= size + 200:
            break
    slow.close()
    head, _, body = got.partition(b"\r\n\r\n")
    assert body == bytes(range(256)) * (size // 256)
    assert wait_for(lambda: not Path(f"/proc/{old}").exists(), timeout=10)
    assert served.server.stop() == 0
    assert b"[warn]" in served.server.stderr and b"reloaded " in served.server.stderr


def test_hup_with_an_invalid_config_keeps_serving_and_says_why(start):
    served = start()
    (served.root / "a.txt").write_text("a")
    worker = served.server.worker_pid
    rewrite(served, lambda cfg: cfg["servers"][0]["routes"][0].update(gzip_level=42))
    os.kill(served.server.pid, signal.SIGHUP)
    time.sleep(0.5)
    assert get(served, "/a.txt")[0] == 200
    assert served.server.worker_pids(1) == [worker]
    assert served.server.stop() == 0
    assert (b"reload refused, still serving the old config: " in served.server.stderr and
            b"servers[0].routes[0].gzip_level: must be between 1 and 9, got 42"
            in served.server.stderr)


def load(port: int, stop: threading.Event, results: list[tuple[int, int]]) -> None:
    """Keep-alive requests as fast as they come back; counts answers and failures."""
    ok = failed = 0
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    while not stop.is_set():
        try:
            conn.request("GET", "/a.txt")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200 and body == b"a" * 1024:
                ok += 1
            else:
                failed += 1
            if resp.getheader("connection") == "close":
                conn.close()
        except (OSError, http.client.HTTPException):
            failed += 1
            conn.close()
    results.append((ok, failed))


def test_reloads_under_load_lose_no_request(start):
    served = start(workers=2)
    (served.root / "a.txt").write_bytes(b"a" * 1024)
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=load, args=(served.port, stop, results))
               for _ in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            time.sleep(0.7)
            os.kill(served.server.pid, signal.SIGHUP)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    ok = sum(r[0] for r in results)
    failed = sum(r[1] for r in results)
    assert ok > 1000 and failed == 0, (ok, failed)


# --------------------------------------------------------------------------- the master


def test_a_killed_worker_is_replaced_and_repeated_deaths_at_start_make_it_give_up(tmp_path):
    port = free_port()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"servers": [{"listeners": [{"host": "127.0.0.1",
                                                             "port": port}]}]}))
    server = Server(["serve", "-c", str(path)])
    server.wait_listening(port)
    deaths = []
    try:
        for _ in range(6):
            kids = server.worker_pids(1)
            if not kids or server.proc.poll() is not None:
                break
            os.kill(kids[0], signal.SIGKILL)
            deaths.append(time.monotonic())
            wait_for(lambda k=kids[0]: server.worker_pids(1) not in ([], [k])
                     or server.proc.poll() is not None, timeout=5)
        assert server.proc.wait(timeout=10) == 1
    finally:
        server.stop()
    err = server.stderr.decode()
    assert "was killed by signal 9 (SIGKILL); starting another" in err
    assert "workers died at start 5 times in a row: giving up" in err
    gaps = [b - a for a, b in zip(deaths, deaths[1:])]
    assert len(gaps) >= 3 and gaps[-1] > gaps[0]       # the delay grows


def test_config_values_from_the_environment(tmp_path):
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "e.txt").write_text("env")
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"servers": [{
        "listeners": [{"host": "${HOST:-127.0.0.1}", "port": "${PORT}"}],
        "routes": [{"req_path": "/", "type": "file_serve", "dir_path": "${ROOT}"}]}]}))
    env = dict(os.environ, PORT=str(port), ROOT=str(tmp_path / "www"))
    import subprocess
    proc = subprocess.Popen([sys.executable, "-m", "expserver", "serve", "-c", str(path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: _answers(port))
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET /e.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            assert Reader(sock).response()[2] == b"env"
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    del env["ROOT"]
    out = subprocess.run([sys.executable, "-m", "expserver", "check", "-c", str(path)],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "servers[0].routes[0].dir_path: environment variable ROOT is not set" in out.stderr


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_to_the_configured_user_and_still_read_the_files(start):
    nobody = pwd.getpwnam("nobody")
    root = Path(tempfile.mkdtemp(prefix="expserver-drop-"))
    root.chmod(0o755)
    (root / "p.txt").write_text("readable by nobody")
    (root / "p.txt").chmod(0o644)
    log = Path(tempfile.mkdtemp(prefix="expserver-log-")) / "access.log"
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(root)}],
                   user="nobody", access_log={"path": str(log), "format": "$status"})
    worker = served.server.worker_pid

    def uids() -> tuple[str, ...]:
        found = re.search(r"^Uid:\s+(\d+)\s+(\d+)", Path(f"/proc/{worker}/status").read_text(),
                          re.M)
        return found.groups() if found else ()
    assert wait_for(lambda: uids() == (str(nobody.pw_uid), str(nobody.pw_uid))), uids()
    assert os.stat(f"/proc/{served.server.pid}").st_uid == 0     # the master stays root
    assert get(served, "/p.txt")[2] == b"readable by nobody"
    assert wait_for(lambda: lines_of(log) == ["200"])      # opened before the drop


def test_the_health_route_says_503_once_a_drain_begins(start):
    served = start(routes=[{"req_path": "/healthz", "type": "health"}])
    assert get(served, "/healthz")[:3:2] == (200, b"ok\n")
    with served.connect() as sock:              # a load balancer's kept-alive probe
        reader = Reader(sock)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reader.response()[0] == 200
        os.kill(served.server.pid, signal.SIGQUIT)
        time.sleep(0.3)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers, body = reader.response()
        assert (status, body, headers["connection"]) == (503, b"draining\n", "close")


def test_control_commands_find_the_master_through_the_pid_file(start, tmp_path):
    pid_file = tmp_path / "x.pid"
    served = start(pid_file=str(pid_file))
    assert wait_for(pid_file.exists)
    assert int(pid_file.read_text()) == served.server.pid
    import subprocess
    old = served.server.worker_pid
    out = subprocess.run([sys.executable, "-m", "expserver", "reload", "-c", str(served.config)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0 and f"sent SIGHUP to {served.server.pid}" in out.stdout
    assert wait_for(lambda: old not in served.server.worker_pids(1), timeout=10)
    out = subprocess.run([sys.executable, "-m", "expserver", "quit", "-c", str(served.config)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 0
    assert served.server.proc.wait(timeout=10) == 0
    assert not pid_file.exists()            # removed at exit
    out = subprocess.run([sys.executable, "-m", "expserver", "stop", "-c", str(served.config)],
                         capture_output=True, text=True, timeout=20)
    assert out.returncode == 1 and "cannot read the pid file" in out.stderr


def test_metrics_stay_continuous_across_a_reload(start):
    served = start(routes=[{"req_path": "/m", "type": "metrics"}])

    def total() -> int:
        return json.loads(get(served, "/m")[2])["req_total"]
    for _ in range(10):
        get(served, "/m")
    before = total()
    old = served.server.worker_pid
    os.kill(served.server.pid, signal.SIGHUP)
    assert wait_for(lambda: old not in served.server.worker_pids(1), timeout=10)
    assert total() >= before + 1
