"""The response pipeline and each policy as units: header rules, error pages, CORS, basic
auth and its cache, the shared zones of the limits, and Later answers through the rig."""
from __future__ import annotations

import base64

import bcrypt
import pytest
from expserver._zone import Zone

from expserver import config
from expserver.auth import BasicAuth, read_users
from expserver.config import HeadersConfig
from expserver.config.model import CorsConfig
from expserver.policy import Cors, HeaderRules, ResponsePolicy, without
from expserver.response import Later, ReadBody
from tests.rig import Rig, parse_response


class Req:
    """A request as policies see it."""

    def __init__(self, method: bytes = b"GET", **fields: bytes) -> None:
        self.method = method
        self.fields = {k.replace("_", "-").encode(): v for k, v in fields.items()}
        self.secure = False
        self.peer = "127.0.0.1"
        self.content_length = -1
        self.chunked = False

    def get(self, name: bytes) -> bytes | None:
        return self.fields.get(name)


def refuse(status: int) -> tuple[int, bytes, bytes]:
    return status, b"Content-Type: text/html\r\n", b"page"


# --------------------------------------------------------------------------- header rules


def test_without_removes_named_lines_of_any_case_and_nothing_else():
    block = b"Content-Type: a\r\nX-Powered-By: b\r\nx-powered-by: c\r\nX-Keep: d\r\n"
    assert without(block, frozenset([b"x-powered-by"])) == b"Content-Type: a\r\nX-Keep: d\r\n"
    assert without(block, frozenset([b"x-other"])) is block      # untouched: no copy


def test_route_rules_merge_over_the_servers():
    server = HeadersConfig(set=(("X-A", "1"),), add=(("X-B", ("2",)),), remove=("Server",))
    route = HeadersConfig(set=(("x-a", "9"),), add=(("X-B", ("3", "4")),), remove=("X-B",))
    rules = HeaderRules([server, route])
    out = rules.apply(b"Server: up\r\nX-A: old\r\nX-B: old\r\nKeep: me\r\n")
    assert out == b"Keep: me\r\nx-a: 9\r\nX-B: 3\r\nX-B: 4\r\n"
    only_server = HeaderRules([server]).apply(b"Server: up\r\n")
    assert only_server == b"X-A: 1\r\nX-B: 2\r\n"


def test_an_error_page_replaces_the_representation_but_keeps_the_rest():
    class Pages:
        def get(self, status):
            return (b"Content-Type: text/plain\r\n", b"custom") if status == 401 else None
    policy = ResponsePolicy(Pages(), None)
    status, headers, body = policy.answer(
        Req(), 401, b'WWW-Authenticate: Basic realm="x"\r\nContent-Type: text/html\r\n', b"x")
    assert (status, body) == (401, b"custom")
    assert headers == b'WWW-Authenticate: Basic realm="x"\r\nContent-Type: text/plain\r\n'
    assert policy.answer(Req(), 404, b"Content-Type: text/html\r\n", b"built-in")[2] == \
        b"built-in"


def test_hsts_only_on_tls_requests():
    policy = ResponsePolicy(None, None, b"Strict-Transport-Security: max-age=9\r\n")
    plain, tls = Req(), Req()
    tls.secure = True
    assert policy.head(plain, 200, b"") == b""
    assert policy.head(tls, 200, b"Strict-Transport-Security: max-age=1\r\n") == \
        b"Strict-Transport-Security: max-age=9\r\n"


# --------------------------------------------------------------------------- CORS


def cors(**kw) -> Cors:
    return Cors(CorsConfig(**{"allow_origins": ("https://a.test",), **kw}))


def test_preflights_are_answered_only_when_they_are_preflights():
    c = cors(allow_methods=("GET", "PUT"), allow_headers=("X-T",), max_age=60)
    answer = c.check(Req(b"OPTIONS", origin=b"https://a.test",
                         access_control_request_method=b"PUT",
                         access_control_request_headers=b"X-T"))
    assert answer is not None and answer[0] == 204
    assert b"Access-Control-Allow-Origin: https://a.test\r\n" in answer[1]
    assert b"Access-Control-Allow-Methods: GET, PUT\r\n" in answer[1]
    assert b"Access-Control-Allow-Headers: X-T\r\n" in answer[1]
    assert b"Access-Control-Max-Age: 60\r\n" in answer[1]
    assert c.check(Req(b"OPTIONS", origin=b"https://a.test")) is None     # a plain OPTIONS
    assert c.check(Req(b"GET", origin=b"https://a.test",
                       access_control_request_method=b"PUT")) is None


def test_star_with_any_header_echoes_what_is_asked():
    c = Cors(CorsConfig(allow_origins=("*",), allow_headers=("*",)))
    answer = c.check(Req(b"OPTIONS", origin=b"https://z.test",
                         access_control_request_method=b"GET",
                         access_control_request_headers=b"X-One, X-Two"))
    assert b"Access-Control-Allow-Origin: *\r\n" in answer[1]
    assert b"Access-Control-Allow-Headers: X-One, X-Two\r\n" in answer[1]


def test_answers_vary_on_origin_and_never_credit_a_stranger():
    c = cors(allow_credentials=True)
    assert c.apply(Req(origin=b"https://a.test"), b"") == (
        b"Access-Control-Allow-Origin: https://a.test\r\n"
        b"Access-Control-Allow-Credentials: true\r\nVary: Origin\r\n")
    assert c.apply(Req(origin=b"https://b.test"),
                   b"Access-Control-Allow-Origin: *\r\n") == b"Vary: Origin\r\n"
    assert c.apply(Req(), b"") == b"Vary: Origin\r\n"


def test_check_refuses_what_cors_cannot_mean():
    def server(cors_obj):
        return {"servers": [{"listeners": [{"host": "h", "port": 1}], "cors": cors_obj}]}
    for bad, path in [({"allow_origins": "*", "allow_credentials": True},
                       "servers[0].cors.allow_credentials"),
                      ({"allow_origins": ["*", "https://a.test"]}, "servers[0].cors.allow_origins"),
                      ({"allow_origins": ["https://a.test/path"]},
                       "servers[0].cors.allow_origins[0]")]:
        with pytest.raises(config.ConfigError) as err:
            config.parse(server(bad), "/")
        assert err.value.path == path


# --------------------------------------------------------------------------- basic auth


@pytest.fixture
def users(tmp_path):
    path = tmp_path / "users"
    path.write_bytes(b"ann:" + bcrypt.hashpw(b"pw", bcrypt.gensalt(4)) + b"\n")
    return str(path)


def authorization(user: bytes, password: bytes) -> bytes:
    return b"Basic " + base64.b64encode(user + b":" + password)


def test_a_verified_password_is_remembered_and_a_wrong_one_never(users, monkeypatch):
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(p) or real(p, h))
    auth = BasicAuth(users, "r", refuse)
    for _ in range(5):
        assert auth(Req(authorization=authorization(b"ann", b"pw"))) is None
    assert len(calls) == 1
    for _ in range(3):
        assert auth(Req(authorization=authorization(b"ann", b"no")))[0] == 401
    assert len(calls) == 4
    answer = auth(Req())
    assert answer[0] == 401 and answer[1].startswith(b'WWW-Authenticate: Basic realm="r"')


def test_unknown_users_cost_a_bcrypt_too(users, monkeypatch):
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda p, h: calls.append(p) or real(p, h))
    auth = BasicAuth(users, "r", refuse)
    assert auth(Req(authorization=authorization(b"zed", b"pw")))[0] == 401
    assert len(calls) == 1


@pytest.mark.parametrize("line,reason", [
    (b"u:{SHA}abc=", "{SHA} hashes are unsalted"),
    (b"u:$apr1$x$y", "not a bcrypt hash"),
    (b"nocolon", "not user:hash"),
])
def test_weak_or_broken_users_files_are_refused(tmp_path, line, reason):
    path = tmp_path / "u"
    path.write_bytes(line + b"\n")
    with pytest.raises(ValueError, match=reason):
        read_users(str(path))


# --------------------------------------------------------------------------- zones


def test_the_leaky_bucket_admits_the_rate_and_the_burst():
    zone = Zone(64)
    admitted = sum(zone.take(b"k", 0, 10_000, 3)[0] for _ in range(10))
    assert admitted == 4                    # the first, and a burst of 3
    assert zone.take(b"k", 100, 10_000, 3)[0]        # 100 ms at 10 r/s drains one
    assert not zone.take(b"k", 100, 10_000, 3)[0]
    assert zone.take(b"other", 100, 10_000, 3)[0]    # keys do not share


def test_zones_are_bounded_and_evict_the_stalest():
    zone = Zone(16)
    for i in range(1000):
        zone.take(b"client-%d" % i, i, 1000, 0)
    assert zone.size == 16 and zone.evictions >= 1000 - 16


def test_connection_counts_go_up_and_down():
    zone = Zone(64)
    assert zone.acquire(b"ip", 0, 2) and zone.acquire(b"ip", 0, 2)
    assert not zone.acquire(b"ip", 0, 2)
    zone.release(b"ip", 0)
    assert zone.acquire(b"ip", 0, 2)


# --------------------------------------------------------------------------- Later answers


class Echo(Later):
    def started(self, req):
        self.parts = []
        if not (req.chunked or req.content_length > 0):
            self.respond(200, b"", b"no body")

    def body(self, data, done):
        self.parts.append(data)
        if done:
            self.respond(201, b"X-Later: yes\r\n", b"".join(self.parts))


def test_a_python_later_reads_the_body_and_answers_after_it():
    rig = Rig(lambda req: Echo())
    try:
        client, conn = rig.connect()
        client.send(b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"3\r\nabc\r\n")
        assert client.take() == b""
        client.send(b"2\r\nde\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = client.take()
        status, headers, rest = parse_response(raw)
        assert (status, headers["x-later"], headers["content-length"]) == (201, "yes", "5")
        assert rest.startswith(b"abcde") and rest.endswith(b"no body")
        assert conn.state_name == "IDLE"
    finally:
        rig.close()


def test_read_body_answers_once_the_body_is_in_and_refuses_too_much():
    rig = Rig(lambda req: ReadBody(lambda r, body: (200, b"", body[::-1]), limit=8))
    try:
        client, _ = rig.connect()
        client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nabcd")
        assert parse_response(client.take())[2] == b"dcba"
        client.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"x" * 20)
        assert parse_response(client.take())[0] == 413
    finally:
        rig.close()
