"""Route policies end to end: headers, error pages, CORS, basic auth, rate and connection
limits across workers, request IDs, charset and caching, fallbacks and fixed answers, on
every route type, against the real process."""
from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import bcrypt
import pytest

from .conftest import Reader, request
from .test_proxy import Client, route
from .upstreams import Upstream, dead_address, http, response


def get(served, path: str = "/", extra: bytes = b"", method: str = "GET"):
    return request(served, f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + extra + b"\r\n")


def echo_fields(req, conn):
    """An upstream that answers with the request's fields as JSON (and its own Server)."""
    fields = {n.decode().lower(): v.decode() for n, v in req.headers}
    return response(200, json.dumps(fields).encode(),
                    [(b"Content-Type", b"application/json"), (b"X-Powered-By", b"up"),
                     (b"Access-Control-Allow-Origin", b"https://wrong.test")])


@pytest.fixture
def upstream():
    made: list[Upstream] = []

    def make(serve=None) -> Upstream:
        made.append(Upstream(serve or http(echo_fields)))
        return made[-1]
    yield make
    for u in made:
        u.stop()


# --------------------------------------------------------------------------- headers


def test_header_rules_reach_every_route_type_and_merge_down(start, upstream, tmp_path):
    (tmp_path / "www").mkdir(exist_ok=True)
    (tmp_path / "www" / "f.txt").write_text("f")
    u = upstream()
    served = start(servers=[{
        "headers": {"set": {"X-Frame-Options": "DENY"}, "add": {"X-Site": "a"},
                    "remove": ["X-Powered-By"]},
        "routes": [
            {"req_path": "/", "type": "file_serve", "dir_path": str(tmp_path / "www"),
             "headers": {"add": {"X-Route": ["1", "2"]}}},
            {"req_path": "/go", "type": "redirect", "redirect_url": "https://x.test/"},
            {**route(u, path="/api"), "headers": {"set": {"X-Frame-Options": "SAMEORIGIN"}}},
        ]}])
    file = get(served, "/f.txt")
    assert file[0] == 200 and file[1]["x-frame-options"] == "DENY"
    assert file[1]["x-site"] == "a" and file[1]["x-route"] == "2"     # both, last kept here
    with served.connect() as sock:
        sock.sendall(b"GET /f.txt HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = sock.recv(4096)
    assert raw.count(b"X-Route: ") == 2 and raw.count(b"X-Site: a") == 1
    redirect = get(served, "/go")
    assert redirect[0] == 302 and redirect[1]["x-frame-options"] == "DENY"
    missing = get(served, "/nope.txt")
    assert missing[0] == 404 and missing[1]["x-site"] == "a"
    proxied = get(served, "/api/x")
    assert proxied[0] == 200
    assert proxied[1]["x-frame-options"] == "SAMEORIGIN"           # the route's set wins
    assert "x-powered-by" not in proxied[1] and proxied[1]["x-site"] == "a"
    assert "x-route" not in proxied[1]


def test_a_route_without_policies_relays_the_upstream_head_unchanged(start, upstream):
    u = upstream()
    served = start(routes=[route(u)])
    assert get(served, "/")[1]["x-powered-by"] == "up"


# --------------------------------------------------------------------------- error pages


def test_error_pages_for_a_404_and_a_dead_upstreams_502(start, upstream, tmp_path):
    www = tmp_path / "www"
    (www / "errors").mkdir(parents=True)
    (www / "errors" / "404.html").write_text("<h1>lost</h1>")
    (www / "errors" / "50x.txt").write_text("down for a moment")
    u = upstream(http(lambda req, conn: response(404, b"upstream's own 404")))
    served = start(servers=[{
        "error_pages": {"404": "/errors/404.html", "5xx": "/errors/50x.txt"},
        "routes": [
            {"req_path": "/", "type": "file_serve", "dir_path": str(www)},
            route(dead_address(), path="/dead"),
            route(u, path="/up"),
        ]}])
    status, headers, body = get(served, "/nothing-here")
    assert (status, body, headers["content-type"]) == (404, b"<h1>lost</h1>", "text/html")
    status, headers, body = get(served, "/dead/x")
    assert (status, body, headers["content-type"]) == (502, b"down for a moment", "text/plain")
    assert get(served, "/up/x")[::2] == (404, b"upstream's own 404")   # relayed as it is
    head = request(served, b"HEAD /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n", head_only=True)
    assert head[0] == 404 and head[1]["content-length"] == "13"


def test_check_refuses_an_error_page_no_file_route_serves(tmp_path):
    (tmp_path / "w").mkdir()
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"servers": [{
        "listeners": [{"host": "127.0.0.1", "port": 8080}],
        "error_pages": {"404": "/404.html"},
        "routes": [{"req_path": "/", "type": "file_serve", "dir_path": str(tmp_path / "w")}]}]}))
    out = subprocess.run([sys.executable, "-m", "expserver", "check", "-c", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert 'servers[0].error_pages["404"]: "/404.html": file' in out.stderr


# --------------------------------------------------------------------------- CORS


CORS = {"allow_origins": ["https://app.test"], "allow_methods": ["GET", "PUT"],
        "allow_headers": ["X-Token"], "expose_headers": ["X-Total"], "max_age": 300}


def preflight(served, origin: str, method: str = "PUT", headers: str = "X-Token"):
    return get(served, "/api/x", f"Origin: {origin}\r\nAccess-Control-Request-Method: "
               f"{method}\r\nAccess-Control-Request-Headers: {headers}\r\n".encode(), "OPTIONS")


def test_cors_preflight_is_answered_before_the_password(start, upstream, tmp_path):
    users = tmp_path / "users"
    users.write_bytes(b"alice:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    u = upstream()
    served = start(routes=[{**route(u, path="/api"), "cors": CORS,
                            "basic_auth": {"users_file": str(users)}}])
    status, headers, _ = preflight(served, "https://app.test")
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.test"
    assert headers["access-control-allow-methods"] == "GET, PUT"
    assert headers["access-control-allow-headers"] == "X-Token"
    assert headers["access-control-max-age"] == "300"
    assert "origin" in headers["vary"].lower()
    assert u.requests == []                     # answered here, not upstream
    status, headers, _ = preflight(served, "https://evil.test")
    assert status == 204 and "access-control-allow-origin" not in headers
    # the actual request: the password is asked, and the 401 carries CORS for the origin
    status, headers, _ = get(served, "/api/x", b"Origin: https://app.test\r\n")
    assert status == 401 and headers["access-control-allow-origin"] == "https://app.test"


def test_cors_on_actual_requests_with_and_without_credentials(start, upstream):
    u = upstream()
    served = start(routes=[
        {**route(u, path="/open"), "cors": {"allow_origins": "*"}},
        {**route(u, path="/cred"), "cors": {"allow_origins": ["https://app.test"],
                                            "allow_credentials": True,
                                            "expose_headers": ["X-Total"]}},
    ])
    headers = get(served, "/open/a", b"Origin: https://any.test\r\n")[1]
    assert headers["access-control-allow-origin"] == "*"     # the upstream's own is replaced
    assert "vary" not in headers and "access-control-allow-credentials" not in headers
    headers = get(served, "/cred/a", b"Origin: https://app.test\r\n")[1]
    assert headers["access-control-allow-origin"] == "https://app.test"
    assert headers["access-control-allow-credentials"] == "true"
    assert headers["access-control-expose-headers"] == "X-Total"
    assert headers["vary"] == "Origin"
    headers = get(served, "/cred/a", b"Origin: https://other.test\r\n")[1]
    assert "access-control-allow-origin" not in headers and headers["vary"] == "Origin"


def test_check_refuses_credentials_for_any_origin(start, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"servers": [{
        "listeners": [{"host": "127.0.0.1", "port": 8080}],
        "cors": {"allow_origins": "*", "allow_credentials": True}}]}))
    out = subprocess.run([sys.executable, "-m", "expserver", "check", "-c", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "servers[0].cors.allow_credentials: credentials cannot be allowed" in out.stderr


# --------------------------------------------------------------------------- basic auth


def basic(user: bytes, password: bytes) -> bytes:
    return b"Authorization: Basic " + base64.b64encode(user + b":" + password) + b"\r\n"


@pytest.fixture
def users(tmp_path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_bytes(b"alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(5)).replace(
        b"$2b$", b"$2y$") + b"\n# a comment\nbob:" + bcrypt.hashpw(b"x", bcrypt.gensalt(4)) +
        b"\n")
    return path


def test_basic_auth_right_wrong_and_missing(start, upstream, users):
    u = upstream()
    served = start(routes=[{**route(u), "basic_auth": {"users_file": str(users),
                                                       "realm": "Staff only"}}])
    status, headers, _ = get(served, "/")
    assert status == 401
    assert headers["www-authenticate"] == 'Basic realm="Staff only", charset="UTF-8"'
    assert get(served, "/", basic(b"alice", b"wrong"))[0] == 401
    assert get(served, "/", basic(b"nobody", b"s3cret"))[0] == 401
    assert get(served, "/", b"Authorization: Bearer abc\r\n")[0] == 401
    status, _, body = get(served, "/", basic(b"alice", b"s3cret"))
    assert status == 200
    assert "authorization" not in json.loads(body)        # the password stays here
    assert get(served, "/", basic(b"alice", b"s3cret"))[0] == 200   # remembered


def test_basic_auth_can_forward_the_authorization(start, upstream, users):
    u = upstream()
    served = start(routes=[{**route(u), "basic_auth": {"users_file": str(users),
                                                       "forward_authorization": True}}])
    body = get(served, "/", basic(b"bob", b"x"))[2]
    assert json.loads(body)["authorization"].startswith("Basic ")


def test_check_refuses_sha_hashes(tmp_path):
    users = tmp_path / "htpasswd"
    users.write_text("carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"servers": [{
        "listeners": [{"host": "127.0.0.1", "port": 8080}],
        "basic_auth": {"users_file": str(users)}}]}))
    out = subprocess.run([sys.executable, "-m", "expserver", "check", "-c", str(path)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "servers[0].basic_auth.users_file: line 1: {SHA} hashes are unsalted" in out.stderr


# --------------------------------------------------------------------------- limits


def hammer(port: int, seconds: float, threads: int = 6) -> list[int]:
    """Keep-alive GETs from several connections as fast as they come back: statuses."""
    statuses: list[int] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def run() -> None:
        sock = socket.create_connection(("127.0.0.1", port))
        reader = Reader(sock)
        mine = []
        while time.monotonic() < end:
            sock.sendall(b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = reader.response()
            mine.append(status)
            if headers.get("connection") == "close":
                sock.close()
                sock = socket.create_connection(("127.0.0.1", port))
                reader = Reader(sock)
        sock.close()
        with lock:
            statuses.extend(mine)
    workers = [threading.Thread(target=run) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return statuses


def test_two_workers_together_admit_the_configured_rate(start, tmp_path):
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "a.txt").write_text("a")
    served = start(workers=2, servers=[{
        "rate_limit": {"rate": "40r/s", "burst": 5, "nodelay": True},
        "routes": [{"req_path": "/", "type": "file_serve", "dir_path": str(www)}]}])
    statuses = hammer(served.port, 3.0)
    ok = statuses.count(200)
    refused = statuses.count(429)
    expected = 40 * 3.0 + 5 + 1
    assert refused > ok                          # the load was well over the rate
    assert abs(ok - expected) <= 0.1 * expected, (ok, expected)
    assert set(statuses) == {200, 429}


def test_a_refusal_says_when_to_retry(start):
    served = start(routes=[{"req_path": "/", "type": "respond", "status": 200, "body": "ok",
                            "rate_limit": {"rate": "1r/m", "nodelay": True}}])
    assert get(served, "/")[0] == 200
    status, headers, _ = get(served, "/")
    assert status == 429 and 55 <= int(headers["retry-after"]) <= 63   # 1r/m: a minute


def test_without_nodelay_requests_over_the_rate_are_spaced_out(start):
    served = start(routes=[{"req_path": "/", "type": "respond", "status": 200, "body": "ok",
                            "rate_limit": {"rate": "10r/s", "burst": 3}}])
    t0 = time.monotonic()
    results = [get(served, "/")[0] for _ in range(4)]
    assert results == [200] * 4
    assert 0.25 < time.monotonic() - t0 < 2        # the 2nd to 4th waited 0.1 s each


def test_limit_conn_counts_requests_in_flight_per_client(start, upstream):
    release = threading.Event()

    def slow(req, conn):
        release.wait(5)
        return response(200, b"late")
    u = upstream(http(slow))
    served = start(workers=2, routes=[{**route(u), "limit_conn": 2}])
    clients = [Client(served) for _ in range(3)]
    try:
        for c in clients[:2]:
            c.send(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while len(u.requests) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        third = clients[2].get("/3")
        assert third.status == 429 and third.get("retry-after") == "1"
        release.set()
        assert [c.read().status for c in clients[:2]] == [200, 200]
        assert clients[2].get("/4").status == 200          # the slots are free again
    finally:
        release.set()
        for c in clients:
            c.close()


# --------------------------------------------------------------------------- the rest


def test_request_ids_are_taken_or_made_and_passed_upstream(start, upstream, tmp_path):
    u = upstream()
    log = tmp_path / "ids.log"
    served = start(request_id=True, access_log={"path": str(log), "format": "$request_id"},
                   routes=[route(u)])
    given = json.loads(get(served, "/", b"X-Request-ID: abc-123\r\n")[2])["x-request-id"]
    made = json.loads(get(served, "/", b"X-Request-ID: bad id!\r\n")[2])["x-request-id"]
    other = json.loads(get(served, "/")[2])["x-request-id"]
    assert given == "abc-123"
    assert made != other and len(made) == 22 and made.isalnum()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and \
            len(log.read_text().split() if log.exists() else []) < 3:
        time.sleep(0.05)
    assert log.read_text().split() == ["abc-123", made, other]


def test_charset_cache_control_and_expires_on_files(start, tmp_path):
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "t.txt").write_text("café")
    (www / "p.png").write_bytes(b"\x89PNG")
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(www),
                            "charset": "utf-8", "cache_control": "public, max-age=60",
                            "expires": 3600}])
    status, headers, _ = get(served, "/t.txt")
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["cache-control"] == "public, max-age=60"
    expires = time.mktime(time.strptime(headers["expires"], "%a, %d %b %Y %H:%M:%S GMT"))
    assert 3500 < expires - time.mktime(time.gmtime()) < 3700
    assert get(served, "/p.png")[1]["content-type"] == "image/png"
    assert "cache-control" not in get(served, "/missing")[1]


def test_text_types_keep_exeservers_exact_type_without_charset(start, tmp_path):
    served = start()
    (served.root / "t.txt").write_text("x")
    assert get(served, "/t.txt")[1]["content-type"] == "text/plain"


def test_a_fallback_serves_single_page_apps(start, tmp_path):
    www = tmp_path / "www"
    (www / "assets").mkdir(parents=True)
    (www / "index.html").write_text("<app>")
    (www / "assets" / "a.js").write_text("js")
    served = start(routes=[{"req_path": "/", "type": "file_serve", "dir_path": str(www),
                            "fallback": "/index.html"}])
    assert get(served, "/users/42/settings")[::2] == (200, b"<app>")
    assert get(served, "/assets/a.js")[::2] == (200, b"js")
    assert get(served, "/users", method="POST")[0] == 405


def test_respond_routes_give_a_fixed_answer(start):
    served = start(routes=[{"req_path": "/", "type": "respond", "status": 503,
                            "body": "back soon\n", "content_type": "text/plain",
                            "headers": {"set": {"Retry-After": "120"}}}])
    status, headers, body = get(served, "/anything")
    assert (status, body, headers["retry-after"]) == (503, b"back soon\n", "120")

