"""expserver.config: eXpServer configs load unchanged; every bad config names its path and why."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from expserver import config
from expserver.config import (
    Config,
    ConfigError,
    HealthCheckConfig,
    ListenerConfig,
    RouteConfig,
    ServerConfig,
    UpstreamConfig,
    default,
    load,
    parse,
    split_host_port,
    summary,
)

# eXpServer's own sample config (shared/examples/xps_config.json), kept here too so the suite
# runs without shared/; test_embedded_example_matches_shared catches drift between the two.
EXAMPLE_TEXT = """{
\t"server_name": "eXpServer",
\t"workers": 4,
\t"servers": [
\t\t{
\t\t\t"listeners": [{"host": "0.0.0.0", "port": 8001}],
\t\t\t"routes": [
\t\t\t\t{
\t\t\t\t\t"req_path": "/",
\t\t\t\t\t"type": "file_serve",
\t\t\t\t\t"dir_path": "../public",
\t\t\t\t\t"index": ["index.html"],
\t\t\t\t\t"gzip_enable": true,
\t\t\t\t\t"gzip_level": 8
\t\t\t\t},
\t\t\t\t{
\t\t\t\t\t"req_path": "/redirect",
\t\t\t\t\t"type": "redirect",
\t\t\t\t\t"http_status_code": 302,
\t\t\t\t\t"redirect_url": "http://localhost:8002/"
\t\t\t\t}
\t\t\t]
\t\t},
\t\t{
\t\t\t"listeners": [{"host": "0.0.0.0", "port": 8002}],
\t\t\t"routes": [{"req_path": "/", "type": "reverse_proxy", "upstreams": ["localhost:3000"]}]
\t\t},
\t\t{
\t\t\t"listeners": [{"host": "0.0.0.0", "port": 8003}],
\t\t\t"routes": [
\t\t\t\t{
\t\t\t\t\t"req_path": "/",
\t\t\t\t\t"type": "redirect",
\t\t\t\t\t"http_status_code": 302,
\t\t\t\t\t"redirect_url": "https://expserver.github.io"
\t\t\t\t}
\t\t\t]
\t\t},
\t\t{
\t\t\t"listeners": [{"host": "0.0.0.0", "port": 8004}]
\t\t}
\t]
}
"""
SHARED_EXAMPLE = Path(__file__).resolve().parents[2] / "shared" / "examples" / "xps_config.json"


def example_text() -> str:
    return SHARED_EXAMPLE.read_text() if SHARED_EXAMPLE.is_file() else EXAMPLE_TEXT


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example laid out as it expects: conf/xps_config.json beside public/."""
    (tmp_path / "conf").mkdir()
    (tmp_path / "public").mkdir()
    path = tmp_path / "conf" / "xps_config.json"
    path.write_text(example_text())
    return path


SERVERS = [{"listeners": [{"host": "h", "port": 1}]}]  # the least valid list of servers


def one_route(**route: Any) -> dict[str, Any]:
    """A config with one server on 127.0.0.1:8080 holding one route."""
    return {"servers": [{"listeners": [{"host": "127.0.0.1", "port": 8080}], "routes": [route]}]}


def one_server(**server: Any) -> dict[str, Any]:
    return {"servers": [{"listeners": [{"host": "127.0.0.1", "port": 8080}], **server}]}


def error(obj: object, base_dir: str | Path = "/") -> str:
    with pytest.raises(ConfigError) as info:
        parse(obj, str(base_dir))
    return str(info.value)


# --- the eXpServer example ----------------------------------------------------------------------


def test_example_loads_unchanged(example: Path) -> None:
    cfg = load(str(example))
    public = str(example.parent.parent / "public")
    assert cfg.server_name == "eXpServer"
    assert cfg.workers == 4
    assert cfg.source == str(example)
    assert [s.listeners for s in cfg.servers] == [
        (ListenerConfig("0.0.0.0", port),) for port in (8001, 8002, 8003, 8004)
    ]
    files, redirect = cfg.servers[0].routes
    assert files == RouteConfig(
        req_path="/",
        type="file_serve",
        dir_path=public,
        index=("index.html",),
        gzip_enable=True,
        gzip_level=8,
    )
    assert redirect == RouteConfig(
        req_path="/redirect",
        type="redirect",
        http_status_code=302,
        redirect_url="http://localhost:8002/",
    )
    assert cfg.servers[1].routes == (
        RouteConfig(
            req_path="/", type="reverse_proxy", upstreams=(UpstreamConfig("localhost", 3000),),
            max_body_size=0,
        ),
    )
    assert cfg.servers[2].routes[0].redirect_url == "https://expserver.github.io"
    assert cfg.servers[3].routes == ()  # eXpServer allows a route-less server
    assert all(s.hostnames == () for s in cfg.servers)


def test_embedded_example_matches_shared() -> None:
    if not SHARED_EXAMPLE.is_file():
        pytest.skip("shared/examples is not beside this checkout")
    assert json.loads(SHARED_EXAMPLE.read_text()) == json.loads(EXAMPLE_TEXT)


def test_example_without_public_dir_names_the_directory(tmp_path: Path) -> None:
    path = tmp_path / "xps_config.json"
    path.write_text(example_text())
    with pytest.raises(ConfigError) as info:
        load(str(path))
    missing = json.dumps(str(tmp_path.parent / "public"))
    assert str(info.value) == f"servers[0].routes[0].dir_path: directory {missing} does not exist"


# --- every kind of error: exact path and reason -----------------------------------------------

ERRORS: list[tuple[str, object, str]] = [
    ("root-not-object", [], "$: expected an object, got an array"),
    ("servers-missing", {"workers": 2}, "$: servers is required"),
    ("servers-empty", {"servers": []}, "servers: must not be empty"),
    ("servers-not-list", {"servers": {}}, "servers: expected an array, got an object"),
    ("listeners-missing", {"servers": [{"routes": []}]}, "servers[0]: listeners is required"),
    (
        "listeners-empty",
        {"servers": [{"listeners": []}]},
        "servers[0].listeners: must not be empty",
    ),
    (
        "host-missing",
        {"servers": [{"listeners": [{"port": 80}]}]},
        "servers[0].listeners[0]: host is required",
    ),
    (
        "port-bool",
        {"servers": [{"listeners": [{"host": "h", "port": True}]}]},
        "servers[0].listeners[0].port: expected an integer, got boolean true",
    ),
    (
        "port-string",
        {"servers": [{"listeners": [{"host": "h", "port": "8080"}]}]},
        'servers[0].listeners[0].port: expected an integer, got string "8080"',
    ),
    (
        "port-float",
        {"servers": [{"listeners": [{"host": "h", "port": 8080.0}]}]},
        "servers[0].listeners[0].port: expected an integer, got number 8080.0",
    ),
    (
        "port-0",
        {"servers": [{"listeners": [{"host": "h", "port": 0}]}]},
        "servers[0].listeners[0].port: must be between 1 and 65535, got 0",
    ),
    (
        "port-70000",
        {"servers": [{"listeners": [{"host": "h", "port": 70000}]}]},
        "servers[0].listeners[0].port: must be between 1 and 65535, got 70000",
    ),
    (
        "host-null",
        {"servers": [{"listeners": [{"host": None, "port": 1}]}]},
        "servers[0].listeners[0].host: expected a string, got null",
    ),
    (
        "unknown-root-key",
        {"servers": SERVERS, "server": 1},
        'server: unknown key, did you mean "servers"?',
    ),
    (
        "unknown-key-typo",
        one_route(req_path="/", type="metrics", gzip_levle=3),
        'servers[0].routes[0].gzip_levle: unknown key, did you mean "gzip_level"?',
    ),
    ("unknown-key-far", one_server(flavour="blue"), "servers[0].flavour: unknown key"),
    ("unknown-key-odd-name", {"servers": SERVERS, "a b": 1}, '$["a b"]: unknown key'),
    ("workers-0", {"servers": SERVERS, "workers": 0}, "workers: must be at least 1, got 0"),
    (
        "workers-word",
        {"servers": SERVERS, "workers": "many"},
        'workers: expected an integer or "auto", got string "many"',
    ),
    (
        "workers-bool",
        {"servers": SERVERS, "workers": True},
        'workers: expected an integer or "auto", got boolean true',
    ),
    (
        "timeout-0",
        {"servers": SERVERS, "keepalive_timeout": 0},
        "keepalive_timeout: must be a finite number greater than 0, got 0",
    ),
    (
        "timeout-string",
        {"servers": SERVERS, "send_timeout": "5s"},
        'send_timeout: expected a number of seconds, got string "5s"',
    ),
    (
        "timeout-inf",
        {"servers": SERVERS, "header_timeout": float("inf")},
        "header_timeout: must be a finite number greater than 0, got Infinity",
    ),
    (
        "max-body-negative",
        {"servers": SERVERS, "max_body_size": -1},
        "max_body_size: must be at least 0, got -1",
    ),
    (
        "server-name-crlf",
        {"servers": SERVERS, "server_name": "x\r\nSet-Cookie: a=b"},
        'server_name: must be printable ASCII, got "x\\r\\nSet-Cookie: a=b"',
    ),
    (
        "hostnames-string",
        one_server(hostnames="example.com"),
        'servers[0].hostnames: expected an array, got string "example.com"',
    ),
    (
        "hostname-unicode",
        one_server(hostnames=["bücher.example"]),
        "servers[0].hostnames[0]: must be an ASCII host name (punycode for IDN), "
        'got "bücher.example"',
    ),
    (
        "route-type-unknown",
        one_route(req_path="/", type="fileserve"),
        'servers[0].routes[0].type: must be one of "file_serve", "redirect", "reverse_proxy", '
        '"metrics", "health", "respond", got "fileserve", did you mean "file_serve"?',
    ),
    ("route-type-missing", one_route(req_path="/"), "servers[0].routes[0]: type is required"),
    (
        "req-path-relative",
        one_route(req_path="api", type="metrics"),
        'servers[0].routes[0].req_path: must start with "/", got "api"',
    ),
    (
        "req-path-query",
        one_route(req_path="/a?b", type="metrics"),
        'servers[0].routes[0].req_path: must not contain spaces, control characters, "?" or "#", '
        'got "/a?b"',
    ),
    (
        "req-path-duplicate",
        one_server(
            routes=[
                {"req_path": "/api", "type": "metrics"},
                {"req_path": "/api/", "type": "metrics"},
            ]
        ),
        'servers[0].routes[1].req_path: "/api" is already used by servers[0].routes[0]',
    ),
    (
        "redirect-url-missing",
        one_route(req_path="/", type="redirect"),
        "servers[0].routes[0]: redirect_url is required for a redirect route",
    ),
    (
        "redirect-url-crlf",
        one_route(req_path="/", type="redirect", redirect_url="/a\r\nX: y"),
        "servers[0].routes[0].redirect_url: must be a URL without spaces or control characters, "
        'got "/a\\r\\nX: y"',
    ),
    (
        "redirect-code",
        one_route(req_path="/", type="redirect", redirect_url="/x", http_status_code=200),
        "servers[0].routes[0].http_status_code: must be one of 301, 302, 303, 307, 308, got 200",
    ),
    (
        "dir-path-missing",
        one_route(req_path="/", type="file_serve"),
        "servers[0].routes[0]: dir_path is required for a file_serve route",
    ),
    (
        "dir-path-null",
        one_route(req_path="/", type="file_serve", dir_path=None),
        "servers[0].routes[0].dir_path: expected a string, got null",
    ),
    (
        "dir-path-empty",
        one_route(req_path="/", type="file_serve", dir_path=""),
        'servers[0].routes[0].dir_path: must be a directory path, got ""',
    ),
    (
        "index-slash",
        one_route(req_path="/", type="file_serve", dir_path="/", index=["a/b"]),
        'servers[0].routes[0].index[0]: must be a file name (no "/", not "." or ".."), got "a/b"',
    ),
    (
        "index-dotdot",
        one_route(req_path="/", type="file_serve", dir_path="/", index=["i", ".."]),
        'servers[0].routes[0].index[1]: must be a file name (no "/", not "." or ".."), got ".."',
    ),
    (
        "dotfiles-enum",
        one_route(req_path="/", type="file_serve", dir_path="/", dotfiles="yes"),
        'servers[0].routes[0].dotfiles: must be one of "deny", "allow", got "yes"',
    ),
    (
        "upstreams-missing",
        one_route(req_path="/", type="reverse_proxy"),
        "servers[0].routes[0]: upstreams is required for a reverse_proxy route",
    ),
    (
        "upstreams-empty",
        one_route(req_path="/", type="reverse_proxy", upstreams=[]),
        "servers[0].routes[0].upstreams: must not be empty for a reverse_proxy route",
    ),
    (
        "upstream-x",
        one_route(req_path="/", type="reverse_proxy", upstreams=["a:1", "x"]),
        'servers[0].routes[0].upstreams[1]: "x" is not host:port',
    ),
    (
        "upstream-bad-port",
        one_route(req_path="/", type="reverse_proxy", upstreams=["host:notaport"]),
        'servers[0].routes[0].upstreams[0]: "host:notaport" is not host:port',
    ),
    (
        "upstream-port-0",
        one_route(req_path="/", type="reverse_proxy", upstreams=["h:0"]),
        'servers[0].routes[0].upstreams[0]: "h:0": port must be between 1 and 65535',
    ),
    (
        "upstream-scheme",
        one_route(req_path="/", type="reverse_proxy", upstreams=["ftp://h:80"]),
        'servers[0].routes[0].upstreams[0]: "ftp://h:80" is not host:port, '
        '"http://host[:port]" or "https://host[:port]"',
    ),
    (
        "upstream-not-string",
        one_route(req_path="/", type="reverse_proxy", upstreams=[3000]),
        'servers[0].routes[0].upstreams[0]: expected a "host:port" string or an object, '
        "got number 3000",
    ),
    (
        "gzip-level-10",
        one_route(req_path="/", type="metrics", gzip_level=10),
        "servers[0].routes[0].gzip_level: must be between 1 and 9, got 10",
    ),
    (
        "gzip-enable-int",
        one_route(req_path="/", type="metrics", gzip_enable=1),
        "servers[0].routes[0].gzip_enable: expected a boolean, got number 1",
    ),
    (
        "brotli-level-12",
        one_route(req_path="/", type="metrics", brotli_level=12),
        "servers[0].routes[0].brotli_level: must be between 0 and 11, got 12",
    ),
    (
        "whitelist-entry",
        one_route(req_path="/", type="metrics", ip_whitelist=["10.0.0.0/8", "x"]),
        'servers[0].routes[0].ip_whitelist[1]: "x" is not an IP address or CIDR block',
    ),
    (
        "blacklist-prefix",
        one_server(ip_blacklist=["10.0.0.0/33"]),
        'servers[0].ip_blacklist[0]: "10.0.0.0/33" has an invalid prefix length (must be 0..32)',
    ),
]


@pytest.mark.parametrize(("obj", "expected"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_error_names_path_and_reason(obj: object, expected: str) -> None:
    assert error(obj) == expected


def test_error_for_missing_and_non_directory_dir_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    missing = error(one_route(req_path="/", type="file_serve", dir_path="nope"), tmp_path)
    assert missing == (
        f"servers[0].routes[0].dir_path: directory {json.dumps(str(tmp_path / 'nope'))} "
        "does not exist"
    )
    not_dir = error(one_route(req_path="/", type="file_serve", dir_path="file"), tmp_path)
    assert not_dir == (
        f"servers[0].routes[0].dir_path: {json.dumps(str(tmp_path / 'file'))} is not a directory"
    )


def test_duplicate_json_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"servers": [{"listeners": [{"host": "h", "port": 1, "port": 2}]}]}')
    with pytest.raises(ConfigError, match=r"^servers\[0\]\.listeners\[0\]\.port: duplicate key$"):
        load(str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{\n  "workers": 4\n  "servers": []\n}',
            "$: invalid JSON at line 3 column 3: Expecting ',' delimiter",
        ),
        ("", "$: invalid JSON at line 1 column 1: Expecting value"),
        ('{"servers": [], "workers": NaN}', "$: invalid JSON: NaN is not allowed"),
    ],
    ids=["missing-comma", "empty-file", "nan"],
)
def test_invalid_json(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert (info.value.path, str(info.value)) == ("$", expected)


@pytest.mark.parametrize(
    "text", ["[" * 100_000, '{"workers": 1' + "0" * 5000 + "}"], ids=["deep", "long-int"]
)
def test_pathological_json_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"^\$: invalid JSON: "):
        load(str(path))


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path / "absent.json"))
    absent = tmp_path / "absent.json"
    assert str(info.value) == f"$: cannot read {absent}: No such file or directory"
    (tmp_path / "latin1.json").write_bytes(b'{"server_name": "caf\xe9"}')
    with pytest.raises(ConfigError, match=r"^\$: not UTF-8 text \(bad byte at offset 20\)$"):
        load(str(tmp_path / "latin1.json"))


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(one_server()).encode())
    assert load(str(path)).servers[0].listeners[0].port == 8080


def test_config_error_shape() -> None:
    exc = ConfigError("servers[0].routes[2].upstreams[1]", '"x" is not host:port')
    assert str(exc) == 'servers[0].routes[2].upstreams[1]: "x" is not host:port'
    assert (exc.path, exc.reason) == ("servers[0].routes[2].upstreams[1]", '"x" is not host:port')
    # Workers are separate processes: errors must survive pickling with their fields.
    again = pickle.loads(pickle.dumps(exc))
    assert (again.path, again.reason, str(again)) == (exc.path, exc.reason, str(exc))


# --- accepted values, conversions and defaults ---------------------------------------------------


def test_relative_dir_path_resolves_against_config_directory(tmp_path: Path) -> None:
    (tmp_path / "conf" / "site").mkdir(parents=True)
    (tmp_path / "www").mkdir()
    routes = [
        {"req_path": "/a", "type": "file_serve", "dir_path": "site"},
        {"req_path": "/b", "type": "file_serve", "dir_path": "../www/"},
        {"req_path": "/c", "type": "file_serve", "dir_path": str(tmp_path / "www")},
    ]
    path = tmp_path / "conf" / "c.json"
    path.write_text(json.dumps(one_server(routes=routes)))
    other_cwd = tmp_path / "www"
    old = os.getcwd()
    os.chdir(other_cwd)  # the working directory must not matter
    try:
        cfg = load(str(path))
    finally:
        os.chdir(old)
    assert [r.dir_path for r in cfg.servers[0].routes] == [
        str(tmp_path / "conf" / "site"),
        str(tmp_path / "www"),
        str(tmp_path / "www"),
    ]


def test_defaults() -> None:
    cfg = parse(one_route(req_path="/", type="metrics"), "/")
    assert cfg == Config(
        servers=(
            ServerConfig(
                listeners=(ListenerConfig("127.0.0.1", 8080),),
                routes=(RouteConfig(req_path="/", type="metrics"),),
            ),
        ),
    )
    assert (cfg.server_name, cfg.workers, cfg.source) == ("eXpServer", 1, None)
    assert (cfg.keepalive_timeout, cfg.header_timeout, cfg.send_timeout) == (75.0, 60.0, 60.0)
    assert cfg.max_body_size == 1048576
    route = cfg.servers[0].routes[0]
    assert route.index == ("index.html",) and route.autoindex and route.dotfiles == "deny"
    assert (route.gzip_enable, route.gzip_level) == (False, 6)
    assert (route.brotli_enable, route.brotli_level, route.compress_min_length) == (False, 4, 256)
    assert route.http_status_code == 302 and route.upstreams == ()


def test_values_are_converted() -> None:
    cfg = parse(
        {
            "servers": [
                {
                    "listeners": [{"host": "::1", "port": 1}, {"host": "localhost", "port": 65535}],
                    "hostnames": ["Example.COM", "www.example.com"],
                    "ip_whitelist": ["10.0.0.0/8"],
                    "routes": [
                        {
                            "req_path": "/api/",
                            "type": "reverse_proxy",
                            "upstreams": ["[::1]:8080", "127.0.0.1:9000", "backend-1.internal:80"],
                        },
                        {"req_path": "//docs//v1//", "type": "metrics"},
                        {
                            "req_path": "///",
                            "type": "redirect",
                            "redirect_url": "/api",
                            "http_status_code": 308,
                        },
                    ],
                }
            ],
            "workers": 3,
            "keepalive_timeout": 5,
            "max_body_size": 0,
        },
        "/",
    )
    server = cfg.servers[0]
    assert server.hostnames == ("example.com", "www.example.com")
    assert [r.req_path for r in server.routes] == ["/api", "/docs/v1", "/"]
    assert server.routes[0].upstreams == (
        UpstreamConfig("::1", 8080),
        UpstreamConfig("127.0.0.1", 9000),
        UpstreamConfig("backend-1.internal", 80),
    )
    assert [u.address for u in server.routes[0].upstreams] == [
        "[::1]:8080",
        "127.0.0.1:9000",
        "backend-1.internal:80",
    ]
    assert server.ip_whitelist == ("10.0.0.0/8",)
    assert cfg.keepalive_timeout == 5.0 and isinstance(cfg.keepalive_timeout, float)
    assert (cfg.workers, cfg.max_body_size) == (3, 0)


def test_dataclasses_are_frozen() -> None:
    cfg = parse(one_route(req_path="/", type="metrics"), "/")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.workers = 2  # type: ignore[misc]
    assert isinstance(cfg.servers, tuple) and isinstance(cfg.servers[0].routes, tuple)


@pytest.mark.parametrize(("cpus", "expected"), [(7, 7), (None, 1)])
def test_auto_workers(monkeypatch: pytest.MonkeyPatch, cpus: int | None, expected: int) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert (
        parse(
            {"servers": [{"listeners": [{"host": "h", "port": 1}]}], "workers": "auto"}, "/"
        ).workers
        == expected
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("h:1", ("h", 1)), ("[::1]:8080", ("::1", 8080)), ("10.0.0.1:65535", ("10.0.0.1", 65535))],
)
def test_split_host_port(text: str, expected: tuple[str, int]) -> None:
    assert split_host_port(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "x",
        "h:",
        ":80",
        "::1:8080",
        "[::1]",
        "[x]:80",
        "h:+80",
        "h:8_0",
        "h:٨٠",
        "h :80",
        "h:123456",
        "a/b:80",
        "user@h:80",
    ],
)
def test_split_host_port_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not host:port"):
        split_host_port(text)


def test_toml(tmp_path: Path) -> None:
    (tmp_path / "public").mkdir()
    path = tmp_path / "c.toml"
    path.write_text(
        'workers = "auto"\nkeepalive_timeout = 2.5\n\n'
        '[[servers]]\nlisteners = [{host = "127.0.0.1", port = 8080}]\n\n'
        '[[servers.routes]]\nreq_path = "/"\ntype = "file_serve"\ndir_path = "public"\n'
    )
    cfg = load(str(path))
    assert cfg.keepalive_timeout == 2.5 and cfg.workers >= 1
    assert cfg.servers[0].routes[0].dir_path == str(tmp_path / "public")
    path.write_text('[[servers]]\nlisteners = [{host = "h", port = 0}]\n')
    with pytest.raises(ConfigError, match=r"^servers\[0\]\.listeners\[0\]\.port: must be between"):
        load(str(path))
    path.write_text("workers = 4\nservers = [\nx")
    with pytest.raises(ConfigError, match=r"^\$: invalid TOML: .*line 3"):
        load(str(path))
    path.write_text('keepalive_timeout = nan\n[[servers]]\nlisteners = [{host = "h", port = 1}]')
    with pytest.raises(ConfigError, match=r"^keepalive_timeout: must be a finite number"):
        load(str(path))


# --- default() and summary() -----------------------------------------------------------------


def test_default_serves_one_directory(tmp_path: Path) -> None:
    cfg = default(str(tmp_path))
    log = config.AccessLogConfig("stdout", "combined")      # as python -m http.server does
    assert cfg == Config(
        servers=(
            ServerConfig(
                listeners=(ListenerConfig("127.0.0.1", 8080),),
                routes=(RouteConfig(req_path="/", type="file_serve", dir_path=str(tmp_path),
                                    charset="utf-8"),),
                access_log=log,
                charset="utf-8",
            ),
        ),
        access_log=log,
        charset="utf-8",
    )
    assert cfg.servers[0].routes[0].autoindex
    assert default(str(tmp_path), host="::", port=9000).servers[0].listeners == (
        ListenerConfig("::", 9000),
    )
    with pytest.raises(ConfigError, match="does not exist"):
        default(str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match="must be between 1 and 65535"):
        default(str(tmp_path), port=0)


def test_summary(example: Path) -> None:
    cfg = load(str(example))
    text = summary(cfg)
    public = example.parent.parent / "public"
    assert str(example) in text and "4 worker(s)" in text
    assert "servers[0]: listen 0.0.0.0:8001; hostnames any" in text
    assert f"  /         -> file_serve {public}, index index.html, autoindex, gzip 8" in text
    assert "  /redirect -> redirect 302 http://localhost:8002/" in text
    assert "  / -> reverse_proxy localhost:3000" in text
    assert text.endswith(
        "servers[3]: listen 0.0.0.0:8004; hostnames any\n  (no routes: every request answers 404)"
    )
    ipv6 = parse(
        {
            "servers": [
                {
                    "listeners": [{"host": "::1", "port": 80}],
                    "hostnames": ["a.example"],
                    "ip_blacklist": ["10.0.0.0/8"],
                }
            ]
        },
        "/",
    )
    assert "servers[0]: listen [::1]:80; hostnames a.example; deny 10.0.0.0/8" in summary(ipv6)


# --- reverse proxy: upstreams, balancing keys ---------------------------------------------------


def proxy(*upstreams: object, **route: Any) -> dict[str, Any]:
    """A config with one reverse_proxy route on "/"."""
    return one_route(req_path="/", type="reverse_proxy", upstreams=list(upstreams), **route)


def proxy_route(*upstreams: object, **route: Any) -> RouteConfig:
    return parse(proxy(*upstreams, **route), "/").servers[0].routes[0]


def test_upstream_string_and_object_forms_are_one_thing() -> None:
    route = proxy_route("a:1", {"address": "a:1"}, "[::1]:8080", {"address": "[::1]:8080"})
    assert route.upstreams == (UpstreamConfig("a", 1),) * 2 + (UpstreamConfig("::1", 8080),) * 2


def test_upstream_object_parameters() -> None:
    route = proxy_route(
        {"address": "10.0.0.1:80", "weight": 5, "max_fails": 0, "fail_timeout": 2.5},
        {"address": "backup.internal:8080", "backup": True, "fail_timeout": 3},
    )
    assert route.upstreams == (
        UpstreamConfig("10.0.0.1", 80, weight=5, max_fails=0, fail_timeout=2.5),
        UpstreamConfig("backup.internal", 8080, backup=True, fail_timeout=3.0),
    )
    assert isinstance(route.upstreams[1].fail_timeout, float)
    assert route.upstreams[0] == UpstreamConfig("10.0.0.1", 80, 5, 0, 2.5, False)


def test_proxy_defaults() -> None:
    route = proxy_route("a:1")
    assert route.upstreams == (UpstreamConfig("a", 1, 1, 1, 10.0, False),)
    # proxy_host_header unset: the client's Host for plain upstreams (expserver.proxy)
    assert (route.lb_method, route.proxy_host_header, route.health_check) == (
        "round_robin",
        None,
        None,
    )
    assert (route.retries, route.upstream_keepalive) == (None, 32)


@pytest.mark.parametrize("method", config.LB_METHODS)
def test_lb_methods(method: str) -> None:
    assert proxy_route("a:1", lb_method=method).lb_method == method


@pytest.mark.parametrize("value", ["client", "upstream", "api.internal", "api.internal:8080"])
def test_proxy_host_header(value: str) -> None:
    assert proxy_route("a:1", proxy_host_header=value).proxy_host_header == value


def test_health_check() -> None:
    assert proxy_route("a:1", health_check=None).health_check is None
    assert proxy_route("a:1", health_check={}).health_check == HealthCheckConfig(
        "/", 5.0, 2.0, 200, 1, 1
    )
    check = {
        "path": "/healthz?full=1",
        "interval": 1,
        "timeout": 0.5,
        "expect_status": 204,
        "passes": 3,
        "fails": 2,
    }
    assert proxy_route("a:1", health_check=check).health_check == HealthCheckConfig(
        "/healthz?full=1", 1.0, 0.5, 204, 3, 2
    )


def test_retries_and_upstream_keepalive() -> None:
    route = proxy_route("a:1", "b:2", retries=0, upstream_keepalive=0)
    assert (route.retries, route.upstream_keepalive) == (0, 0)
    assert proxy_route("a:1", retries=5).retries == 5  # more than peers: each is tried once


# Every error below names the exact JSON path of the value at fault.
UP = "servers[0].routes[0].upstreams"
R = "servers[0].routes[0]"
PROXY_ERRORS: list[tuple[str, object, str]] = [
    (
        "weight-0",
        proxy({"address": "a:1", "weight": 0}),
        f"{UP}[0].weight: must be between 1 and 1000, got 0",
    ),
    (
        "weight-1001",
        proxy("a:1", {"address": "b:1", "weight": 1001}),
        f"{UP}[1].weight: must be between 1 and 1000, got 1001",
    ),
    (
        "weight-float",
        proxy({"address": "a:1", "weight": 1.5}),
        f"{UP}[0].weight: expected an integer, got number 1.5",
    ),
    (
        "max-fails-negative",
        proxy({"address": "a:1", "max_fails": -1}),
        f"{UP}[0].max_fails: must be at least 0, got -1",
    ),
    (
        "fail-timeout-0",
        proxy({"address": "a:1", "fail_timeout": 0}),
        f"{UP}[0].fail_timeout: must be a finite number greater than 0, got 0",
    ),
    (
        "backup-string",
        proxy("a:1", {"address": "b:1", "backup": "yes"}),
        f'{UP}[1].backup: expected a boolean, got string "yes"',
    ),
    ("address-missing", proxy("a:1", {"weight": 2}), f"{UP}[1]: address is required"),
    (
        "address-bad",
        proxy({"address": "gopher://a:1"}),
        f'{UP}[0].address: "gopher://a:1" is not host:port, "http://host[:port]" or '
        '"https://host[:port]"',
    ),
    (
        "address-not-string",
        proxy({"address": 80}),
        f"{UP}[0].address: expected a string, got number 80",
    ),
    (
        "upstream-key-typo",
        proxy({"address": "a:1", "wieght": 2}),
        f'{UP}[0].wieght: unknown key, did you mean "weight"?',
    ),
    (
        "upstream-array",
        proxy(["a", 1]),
        f'{UP}[0]: expected a "host:port" string or an object, got an array',
    ),
    (
        "only-backups",
        proxy({"address": "a:1", "backup": True}),
        f"{UP}: at least one upstream must not be a backup",
    ),
    (
        "lb-method-typo",
        proxy("a:1", lb_method="least_connections"),
        f'{R}.lb_method: must be one of "round_robin", "least_conn", "ip_hash", "random_two", '
        'got "least_connections", did you mean "least_conn"?',
    ),
    (
        "host-header-space",
        proxy("a:1", proxy_host_header="a b"),
        f'{R}.proxy_host_header: must be "client", "upstream" or a Host value (printable ASCII, '
        'no spaces), got "a b"',
    ),
    (
        "host-header-empty",
        proxy("a:1", proxy_host_header=""),
        f'{R}.proxy_host_header: must be "client", "upstream" or a Host value (printable ASCII, '
        'no spaces), got ""',
    ),
    (
        "health-check-true",
        proxy("a:1", health_check=True),
        f"{R}.health_check: expected an object, got boolean true",
    ),
    (
        "health-path-relative",
        proxy("a:1", health_check={"path": "health"}),
        f'{R}.health_check.path: must start with "/" and not contain spaces, control characters '
        'or "#", got "health"',
    ),
    (
        "health-path-crlf",
        proxy("a:1", health_check={"path": "/h\r\nX: y"}),
        f'{R}.health_check.path: must start with "/" and not contain spaces, control characters '
        'or "#", got "/h\\r\\nX: y"',
    ),
    (
        "health-status-600",
        proxy("a:1", health_check={"expect_status": 600}),
        f"{R}.health_check.expect_status: must be between 100 and 599, got 600",
    ),
    (
        "health-interval-0",
        proxy("a:1", health_check={"interval": 0}),
        f"{R}.health_check.interval: must be a finite number greater than 0, got 0",
    ),
    (
        "health-passes-0",
        proxy("a:1", health_check={"passes": 0}),
        f"{R}.health_check.passes: must be at least 1, got 0",
    ),
    (
        "health-key-typo",
        proxy("a:1", health_check={"fail": 2}),
        f'{R}.health_check.fail: unknown key, did you mean "fails"?',
    ),
    ("retries-negative", proxy("a:1", retries=-1), f"{R}.retries: must be at least 0, got -1"),
    (
        "retries-null",
        proxy("a:1", retries=None),
        f"{R}.retries: expected an integer, got null",
    ),
    (
        "keepalive-pool-negative",
        proxy("a:1", upstream_keepalive=-1),
        f"{R}.upstream_keepalive: must be at least 0, got -1",
    ),
]


@pytest.mark.parametrize(
    ("obj", "expected"), [e[1:] for e in PROXY_ERRORS], ids=[e[0] for e in PROXY_ERRORS]
)
def test_proxy_error_names_path_and_reason(obj: object, expected: str) -> None:
    assert error(obj) == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("connect_timeout", 1),
        ("upstream_read_timeout", 1),
        ("upstream_send_timeout", 1),
        ("lb_method", "round_robin"),
        ("proxy_host_header", "client"),
        ("health_check", None),
        ("retries", 1),
        ("upstream_keepalive", 1),
    ],
)
def test_proxy_keys_only_on_proxy_routes(key: str, value: object) -> None:
    assert key in config.PROXY_KEYS
    route = {"req_path": "/", "type": "redirect", "redirect_url": "/x", key: value}
    expected = f"servers[0].routes[0].{key}: only applies to a reverse_proxy route"
    assert error(one_route(**route)) == expected


# --- cascading limits: route > server > top level ------------------------------------------------

LIMITS = {
    "keepalive_timeout": 75.0,
    "header_timeout": 60.0,
    "send_timeout": 60.0,
    "max_body_size": 1048576,
    "body_timeout": 60.0,
    "connect_timeout": 60.0,
    "upstream_read_timeout": 60.0,
    "upstream_send_timeout": 60.0,
}
ROUTE_LIMITS = [
    "max_body_size",
    "body_timeout",
    "connect_timeout",
    "upstream_read_timeout",
    "upstream_send_timeout",
]


def limits(obj: object, names: list[str]) -> dict[str, object]:
    return {name: getattr(obj, name) for name in names}


def test_limit_defaults_everywhere() -> None:
    cfg = parse(proxy("a:1"), "/")
    server, route = cfg.servers[0], cfg.servers[0].routes[0]
    assert limits(cfg, list(LIMITS)) == LIMITS
    assert limits(server, list(LIMITS)) == LIMITS
    # a reverse_proxy route streams bodies: no limit unless one is set above it
    assert limits(route, ROUTE_LIMITS) == {**{k: LIMITS[k] for k in ROUTE_LIMITS},
                                           "max_body_size": 0}
    assert (cfg.max_connections, cfg.drain_timeout) == (10000, 30.0)


def test_proxy_routes_take_a_body_limit_set_above_them() -> None:
    doc = proxy("a:1")
    doc["max_body_size"] = 500
    assert parse(doc, "/").servers[0].routes[0].max_body_size == 500
    doc = proxy("a:1")
    doc["servers"][0]["max_body_size"] = 700
    assert parse(doc, "/").servers[0].routes[0].max_body_size == 700
    doc = proxy("a:1")
    doc["servers"][0]["routes"].append({"req_path": "/m", "type": "metrics"})
    assert parse(doc, "/").servers[0].routes[1].max_body_size == 1048576


def test_limit_precedence_route_over_server_over_top_level() -> None:
    route_a = {"req_path": "/a", "type": "reverse_proxy", "upstreams": ["a:1"]}
    route_b = {**route_a, "req_path": "/b", "connect_timeout": 1, "max_body_size": 0}
    route_c = {"req_path": "/c", "type": "metrics", "body_timeout": 2}
    cfg = parse(
        {
            "connect_timeout": 30,
            "body_timeout": 20,
            "upstream_read_timeout": 10,
            "keepalive_timeout": 5,
            "max_body_size": 100,
            "servers": [
                {
                    "listeners": [{"host": "h", "port": 1}],
                    "connect_timeout": 3,
                    "header_timeout": 4,
                    "max_body_size": 200,
                    "routes": [route_a, route_b, route_c],
                },
                {"listeners": [{"host": "h", "port": 2}], "routes": [route_a]},
            ],
        },
        "/",
    )
    first, second = cfg.servers
    a, b, c = first.routes
    assert (cfg.connect_timeout, cfg.body_timeout, cfg.max_body_size) == (30.0, 20.0, 100)
    assert (cfg.header_timeout, cfg.keepalive_timeout) == (60.0, 5.0)
    # The first server overrides some keys and inherits the rest from the top level.
    assert limits(first, list(LIMITS)) == {
        **LIMITS,
        "keepalive_timeout": 5.0,
        "header_timeout": 4.0,
        "max_body_size": 200,
        "body_timeout": 20.0,
        "connect_timeout": 3.0,
        "upstream_read_timeout": 10.0,
    }
    # Its routes inherit from it, unless they set their own.
    assert limits(a, ROUTE_LIMITS) == limits(first, ROUTE_LIMITS)
    assert (b.connect_timeout, b.max_body_size, b.body_timeout) == (1.0, 0, 20.0)
    assert (c.body_timeout, c.connect_timeout, c.max_body_size) == (2.0, 3.0, 200)
    # The second server sets nothing: it and its route carry the top-level values.
    assert limits(second, list(LIMITS)) == limits(cfg, list(LIMITS))
    assert limits(second.routes[0], ROUTE_LIMITS) == limits(cfg, ROUTE_LIMITS)
    assert isinstance(b.connect_timeout, float)


def test_limits_on_the_wrong_level() -> None:
    # The head is read before a route is chosen: header/keep-alive/send limits stop at servers.
    for key in ("header_timeout", "keepalive_timeout", "send_timeout"):
        route = {"req_path": "/", "type": "metrics", key: 1}
        assert error(one_route(**route)) == (
            f"servers[0].routes[0].{key}: unknown key here (allowed in the top level and a server)"
        )
    for key in ("max_connections", "drain_timeout"):
        expected = f"servers[0].{key}: unknown key here (allowed in the top level)"
        assert error(one_server(**{key: 5})) == expected
    assert error(proxy({"address": "a:1", "port": 1})) == (
        "servers[0].routes[0].upstreams[0].port: unknown key here (allowed in a listener)"
    )


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            one_server(connect_timeout=0),
            "servers[0].connect_timeout: must be a finite number greater than 0, got 0",
        ),
        (
            one_server(keepalive_timeout="5"),
            'servers[0].keepalive_timeout: expected a number of seconds, got string "5"',
        ),
        (one_server(max_body_size=-1), "servers[0].max_body_size: must be at least 0, got -1"),
        (
            proxy("a:1", upstream_send_timeout=-1),
            "servers[0].routes[0].upstream_send_timeout: "
            "must be a finite number greater than 0, got -1",
        ),
        (
            one_route(req_path="/", type="metrics", max_body_size=1.5),
            "servers[0].routes[0].max_body_size: expected an integer, got number 1.5",
        ),
        (
            {"servers": SERVERS, "body_timeout": 0},
            "body_timeout: must be a finite number greater than 0, got 0",
        ),
        ({"servers": SERVERS, "max_connections": 0}, "max_connections: must be at least 1, got 0"),
        (
            {"servers": SERVERS, "max_connections": True},
            "max_connections: expected an integer, got boolean true",
        ),
        (
            {"servers": SERVERS, "drain_timeout": 0},
            "drain_timeout: must be a finite number greater than 0, got 0",
        ),
        # A bad limit is reported even when a server below it is bad too.
        (
            {"servers": [{"listeners": []}], "connect_timeout": 0},
            "connect_timeout: must be a finite number greater than 0, got 0",
        ),
    ],
    ids=[
        "server-connect-0",
        "server-keepalive-string",
        "server-max-body-negative",
        "route-upstream-send-negative",
        "route-max-body-float",
        "body-timeout-0",
        "max-connections-0",
        "max-connections-bool",
        "drain-timeout-0",
        "limit-before-servers",
    ],
)
def test_limit_errors(obj: object, expected: str) -> None:
    assert error(obj) == expected


def test_full_proxy_config_pickles() -> None:
    # Workers are separate processes: a config must cross to them intact.
    cfg = parse(
        proxy(
            "a:1",
            {"address": "b:2", "weight": 3, "backup": True},
            health_check={"path": "/h"},
            connect_timeout=2,
        ),
        "/",
    )
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_summary_of_a_proxy() -> None:
    cfg = parse(
        {
            "connect_timeout": 5,
            "servers": [
                {
                    "listeners": [{"host": "h", "port": 1}],
                    "keepalive_timeout": 10,
                    "routes": [
                        {
                            "req_path": "/",
                            "type": "reverse_proxy",
                            "upstreams": [
                                "a:1",
                                {"address": "[::1]:2", "weight": 3},
                                {"address": "c:3", "backup": True},
                            ],
                            "lb_method": "least_conn",
                            "health_check": {"path": "/health", "interval": 2},
                            "upstream_read_timeout": 3,
                            "max_body_size": 0,
                        }
                    ],
                }
            ],
        },
        "/",
    )
    lines = summary(cfg).splitlines()
    assert lines[1] == (
        "timeouts: keepalive 75s, header 60s, send 60s, body 60s, connect 5s, "
        "upstream read 60s, upstream send 60s; max_body_size 1048576 bytes"
    )
    assert lines[2] == "max_connections 10000 per worker, drain_timeout 30s"
    assert lines[3] == "servers[0]: listen h:1; hostnames any; timeouts keepalive 10s"
    assert lines[4] == (
        "  / -> reverse_proxy a:1 [::1]:2 (weight 3) c:3 (backup), least_conn, "
        "health check /health every 2s; timeouts upstream read 3s; max_body_size unlimited"
    )


# --- schema.json and real validators -------------------------------------------------------------


SCHEMA_VALID = {
    "example": json.loads(EXAMPLE_TEXT),
    "upstream-forms": proxy("a:1", {"address": "b:2", "weight": 2, "backup": True}),
    "proxy-keys": proxy("a:1", lb_method="ip_hash", health_check=None, retries=0),
    "health-check": proxy("a:1", health_check={"path": "/h", "expect_status": 204}),
    "limits": {"servers": SERVERS, "connect_timeout": 1, "max_connections": 5, "drain_timeout": 1},
    "server-limits": one_server(header_timeout=1, upstream_read_timeout=2, max_body_size=0),
}
SCHEMA_INVALID = {
    "only-backups": proxy({"address": "a:1", "backup": True}),
    "weight-0": proxy({"address": "a:1", "weight": 0}),
    "no-address": proxy({"weight": 1}),
    "proxy-key-on-metrics": one_route(req_path="/", type="metrics", lb_method="ip_hash"),
    "header-timeout-on-route": one_route(req_path="/", type="metrics", header_timeout=1),
    "expect-status-99": proxy("a:1", health_check={"expect_status": 99}),
    "retries-null": proxy("a:1", retries=None),
}


@pytest.mark.parametrize(
    ("doc", "valid"),
    [(d, True) for d in SCHEMA_VALID.values()] + [(d, False) for d in SCHEMA_INVALID.values()],
    ids=list(SCHEMA_VALID) + list(SCHEMA_INVALID),
)
def test_schema_agrees_with_the_loader(conf_dir: str, doc: dict[str, Any], valid: bool) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(config.schema())
    assert validator.is_valid(doc) is valid
    if valid:
        parse(doc, conf_dir)  # conf_dir has ../public for the example
    else:
        with pytest.raises(ConfigError):
            parse(doc, conf_dir)


def test_schema_is_a_valid_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.Draft202012Validator.check_schema(config.schema())


# --- schema.json and the field tables ------------------------------------------------------------


def _schema_object(schema: dict[str, Any], table: config.Table[Any]) -> dict[str, Any]:
    return schema if not table.name else schema["$defs"][table.name]


from expserver.config.docs import _jsonable  # noqa: E402


def test_schema_is_draft_2020_12() -> None:
    schema = config.schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["$defs"]) == {t.name for t in config.TABLES if t.name}


@pytest.mark.parametrize("table", config.TABLES, ids=lambda t: t.name or "root")
def test_schema_matches_table(table: config.Table[Any]) -> None:
    obj = _schema_object(config.schema(), table)
    assert obj["type"] == "object" and obj["additionalProperties"] is False
    assert list(obj["properties"]) == list(table.names)
    assert obj.get("required", []) == list(table.required)
    defaults = table.defaults
    for field in table.fields:
        prop = dict(obj["properties"][field.name])
        assert prop.pop("description").strip(), f"{field.name} has no description"
        # Below the top level a cascading key defaults to its parent's value, not a constant.
        if defaults.get(field.name) is None or (field.cascade and table.name):
            assert "default" not in prop, field.name
        else:
            assert prop.pop("default") == _jsonable(defaults[field.name]), field.name
        assert prop == field.spec.schema(), field.name


@pytest.mark.parametrize("table", config.TABLES, ids=lambda t: t.name or "root")
def test_table_matches_dataclass(table: config.Table[Any]) -> None:
    # every dataclass field is a key, but for the one key split in three ("address" is host,
    # port and tls) and the loader's own "source"
    names = {f.name for f in dataclasses.fields(table.cls)} - {"source"}
    if table.cls is UpstreamConfig:
        names = names - {"host", "port", "tls"} | {"address"}
    assert names == set(table.names)
    assert len(table.names) == len(names)


def test_cascading_keys_share_one_default() -> None:
    cascading: dict[str, set[object]] = {}
    for table in config.TABLES:
        for field in table.fields:
            if field.cascade:
                cascading.setdefault(field.name, set()).add(table.defaults[field.name])
    assert set(cascading) == {
        "keepalive_timeout",
        "header_timeout",
        "send_timeout",
        "max_body_size",
        "body_timeout",
        "connect_timeout",
        "upstream_read_timeout",
        "upstream_send_timeout",
        "access_log",
        "charset",
        "request_id",
    }
    assert all(len(values) == 1 for values in cascading.values()), cascading


def test_schema_conditional_requirements() -> None:
    conditions = config.schema()["$defs"]["route"]["allOf"]
    found = {
        c["if"]["properties"]["type"]["const"]: c["then"]["required"]
        for c in conditions
        if "required" in c["then"]
    }
    assert found == {kind: list(keys) for kind, keys in config.REQUIRED_BY_TYPE.items()}
    assert set(config.REQUIRED_BY_TYPE) <= set(config.ROUTE_TYPES)
    (refused,) = [
        c["then"]["properties"] for c in conditions if "not" in c["if"]["properties"]["type"]
    ]
    assert refused == {key: False for key in config.PROXY_KEYS}
    assert set(config.PROXY_KEYS) <= set(config.ROUTE.names)


def test_schema_additional_properties_false_everywhere() -> None:
    def objects(node: object) -> list[dict[str, Any]]:
        if isinstance(node, dict):
            found = [node] if "properties" in node and "type" in node else []
            return found + [o for v in node.values() for o in objects(v)]
        if isinstance(node, list):
            return [o for v in node for o in objects(v)]
        return []

    described = objects(config.schema())
    assert len(described) == len(config.TABLES)
    assert all(o["additionalProperties"] is False for o in described)


# --- bad input never escapes as anything but ConfigError ----------------------------------------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def _slots(node: object, trail: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Every place in a JSON document a value can be swapped: (path..., key or index)."""
    out: list[tuple[object, ...]] = []
    items = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for key, child in items:
        out.append((*trail, key))
        out.extend(_slots(child, (*trail, key)))
    return out


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("mutated")
    (root / "conf").mkdir()
    (root / "public").mkdir()
    return str(root / "conf")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_mutated_example_fails_only_with_config_error(conf_dir: str, data: st.DataObject) -> None:
    base = json.loads(EXAMPLE_TEXT)
    doc = copy.deepcopy(base)
    slot = data.draw(st.sampled_from(_slots(base)))
    parent: Any = doc
    for key in slot[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=12))] = data.draw(_json_values)  # an extra key
    else:
        parent[slot[-1]] = data.draw(_json_values)
    try:
        parse(doc, conf_dir)
    except ConfigError as exc:
        assert str(exc).startswith(f"{exc.path}: ") and exc.reason
