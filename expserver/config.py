"""Load and validate eXpServer configs (JSON, or TOML) into frozen dataclasses.

Theory of operation: each kind of config object (the root, a server, a listener, a route) has
one :class:`Table` of :class:`Field` rows. A row names a key - which is also the dataclass field
and the schema.json property - and a :class:`Spec` that checks the JSON value and converts it
(lists become tuples, relative paths become absolute). Defaults and "required" come from the
dataclass itself: a field without a default is a required key. The tables drive validation,
and tests compare them with the published schema.json, so the three cannot drift apart.

Cascading keys (timeouts, max_body_size) may be set at the top level, per server and per route:
an object that does not set one takes its parent's value, resolved here at load time, so every
ServerConfig and RouteConfig carries the effective values and nothing downstream walks up.

Errors: the first problem found raises :class:`ConfigError` with the JSON path of the value
(``servers[0].routes[2].upstreams[1]``, or ``$`` for the document itself) and a reason. Bad
input never escapes as any other exception: ``expserver check`` prints the error and exits 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, TypeVar

from .acl import parse_network

ROUTE_TYPES = ("file_serve", "redirect", "reverse_proxy", "metrics")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Keys a route of a given type cannot do without (eXpServer has the same rules).
REQUIRED_BY_TYPE: dict[str, tuple[str, ...]] = {
    "file_serve": ("dir_path",),
    "redirect": ("redirect_url",),
    "reverse_proxy": ("upstreams",),
}
LB_METHODS = ("round_robin", "least_conn", "ip_hash", "random_two")
# Route keys that only mean something to a proxy: on another route type they are a mistake
# (most likely a wrong "type"), so they are refused rather than silently ignored.
PROXY_KEYS = (
    "connect_timeout",
    "upstream_read_timeout",
    "upstream_send_timeout",
    "lb_method",
    "proxy_host_header",
    "health_check",
    "retries",
    "upstream_keepalive",
)


class ConfigError(Exception):
    """An invalid config: ``path`` is the JSON path of the offending value, ``reason`` why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)  # both in args, so it pickles across worker processes
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class ListenerConfig:
    host: str
    port: int


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream server, with nginx's ``server`` parameters (weight, max_fails, ...)."""

    host: str  # IPv6 without brackets
    port: int
    weight: int = 1
    max_fails: int = 1  # 0: never marked down by failures
    fail_timeout: float = 10.0
    backup: bool = False

    @property
    def address(self) -> str:
        """``host:port`` as a config spells it (IPv6 in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HealthCheckConfig:
    path: str = "/"
    interval: float = 5.0
    timeout: float = 2.0
    expect_status: int = 200
    passes: int = 1  # consecutive successes that bring an unhealthy peer back
    fails: int = 1  # consecutive failures that take a healthy peer out


@dataclass(frozen=True)
class RouteConfig:
    req_path: str
    type: str
    dir_path: str | None = None
    index: tuple[str, ...] = ("index.html",)
    autoindex: bool = True
    dotfiles: str = "deny"
    upstreams: tuple[UpstreamConfig, ...] = ()
    http_status_code: int = 302
    redirect_url: str | None = None
    ip_whitelist: tuple[str, ...] = ()
    ip_blacklist: tuple[str, ...] = ()
    gzip_enable: bool = False
    gzip_level: int = 6
    brotli_enable: bool = False
    brotli_level: int = 4
    compress_min_length: int = 256
    max_body_size: int = 1048576
    body_timeout: float = 60.0
    connect_timeout: float = 60.0
    upstream_read_timeout: float = 60.0
    upstream_send_timeout: float = 60.0
    lb_method: str = "round_robin"
    proxy_host_header: str = "client"
    health_check: HealthCheckConfig | None = None
    retries: int | None = None  # None: one attempt per upstream (len(upstreams) - 1 retries)
    upstream_keepalive: int = 32


@dataclass(frozen=True)
class ServerConfig:
    listeners: tuple[ListenerConfig, ...]
    hostnames: tuple[str, ...] = ()
    routes: tuple[RouteConfig, ...] = ()
    ip_whitelist: tuple[str, ...] = ()
    ip_blacklist: tuple[str, ...] = ()
    keepalive_timeout: float = 75.0
    header_timeout: float = 60.0
    send_timeout: float = 60.0
    max_body_size: int = 1048576
    body_timeout: float = 60.0
    connect_timeout: float = 60.0
    upstream_read_timeout: float = 60.0
    upstream_send_timeout: float = 60.0


@dataclass(frozen=True)
class Config:
    servers: tuple[ServerConfig, ...]
    server_name: str = "eXpServer"
    workers: int = 1
    keepalive_timeout: float = 75.0
    header_timeout: float = 60.0
    send_timeout: float = 60.0
    max_body_size: int = 1048576
    body_timeout: float = 60.0
    connect_timeout: float = 60.0
    upstream_read_timeout: float = 60.0
    upstream_send_timeout: float = 60.0
    max_connections: int = 10000
    drain_timeout: float = 30.0
    source: str | None = None  # not a key: set by load()


# --- messages ---------------------------------------------------------------------------------


def _show(value: object) -> str:
    """A value as the user wrote it in JSON, cut short so one line stays one line."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):  # TOML dates, or an int too long to print
        text = type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {_show(value)}"
    if isinstance(value, int | float):
        return f"number {_show(value)}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


def _expected(path: str, what: str, value: object) -> ConfigError:
    return ConfigError(path, f"expected {what}, got {_describe(value)}")


def _list(choices: tuple[object, ...]) -> str:
    return ", ".join(_show(c) for c in choices)


def _did_you_mean(word: str, choices: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f', did you mean "{close[0]}"?' if close else ""


def _join(path: str, key: str) -> str:
    if not key.isidentifier():
        return f"{path}[{json.dumps(key)}]"
    return key if path == "$" else f"{path}.{key}"


# --- specs: one per kind of value ---------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    base_dir: str  # absolute; relative paths in the config resolve against it
    # Effective values of the cascading keys of the enclosing objects.
    inherited: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Spec:
    """Checks one JSON value, returns the dataclass value, and describes itself as JSON Schema."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError


class Boolean(Spec):
    def check(self, value: object, path: str, ctx: _Context) -> object:
        if not isinstance(value, bool):
            raise _expected(path, "a boolean", value)
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Integer(Spec):
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[int, ...] = ()

    def check(self, value: object, path: str, ctx: _Context) -> object:
        # bool is an int in Python, but `"port": true` is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(path, "an integer", value)
        if self.choices and value not in self.choices:
            raise ConfigError(path, f"must be one of {_list(self.choices)}, got {_show(value)}")
        low, high = self.minimum, self.maximum
        if low is not None and high is not None and not low <= value <= high:
            raise ConfigError(path, f"must be between {low} and {high}, got {_show(value)}")
        if low is not None and value < low:
            raise ConfigError(path, f"must be at least {low}, got {_show(value)}")
        if high is not None and value > high:
            raise ConfigError(path, f"must be at most {high}, got {_show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        if self.choices:
            out["enum"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out


class Seconds(Spec):
    """A duration: any JSON number greater than zero."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _expected(path, "a number of seconds", value)
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf
        if not math.isfinite(seconds) or seconds <= 0:  # TOML can spell inf and nan
            raise ConfigError(path, f"must be a finite number greater than 0, got {_show(value)}")
        return seconds

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": 0}


# A String's extra check: takes the string, its path and the context; returns the value to
# store or raises ConfigError.
StringCheck = Callable[[str, str, _Context], str]


@dataclass(frozen=True)
class String(Spec):
    choices: tuple[str, ...] = ()
    extra: StringCheck | None = None
    keywords: tuple[tuple[str, Any], ...] = ()  # schema keywords that describe `extra`

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if not isinstance(value, str):
            raise _expected(path, "a string", value)
        if self.choices and value not in self.choices:
            hint = _did_you_mean(value, self.choices)
            reason = f"must be one of {_list(self.choices)}, got {_show(value)}{hint}"
            raise ConfigError(path, reason)
        return self.extra(value, path, ctx) if self.extra else value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.choices:
            out["enum"] = list(self.choices)
        out.update(self.keywords)
        return out


@dataclass(frozen=True)
class Array(Spec):
    item: Spec
    min_items: int = 0

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if not isinstance(value, list):
            raise _expected(path, "an array", value)
        if len(value) < self.min_items:
            raise ConfigError(path, "must not be empty")
        return tuple(self.item.check(v, f"{path}[{i}]", ctx) for i, v in enumerate(value))

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            out["minItems"] = self.min_items
        return out


@dataclass(frozen=True)
class Nullable(Spec):
    """A value that may also be null, meaning "off" (the dataclass default None)."""

    inner: Spec

    def check(self, value: object, path: str, ctx: _Context) -> object:
        return None if value is None else self.inner.check(value, path, ctx)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "null"}, self.inner.schema()]}


class Workers(Spec):
    """eXpServer's worker count, or "auto" for one per CPU (as nginx's worker_processes)."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if isinstance(value, str) and value == "auto":
            return os.cpu_count() or 1
        if isinstance(value, bool) or not isinstance(value, int):
            raise _expected(path, 'an integer or "auto"', value)
        if value < 1:
            raise ConfigError(path, f"must be at least 1, got {_show(value)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "integer", "minimum": 1}, {"const": "auto"}]}


# --- string checks --------------------------------------------------------------------------

# Bytes that would end up raw in a status line or header (Server, Location): CR/LF would let a
# config inject headers, and a space or control byte would break the URL for clients.
_UNSAFE = re.compile(r"[\x00-\x20\x7f]")


def _req_path(text: str, path: str, ctx: _Context) -> str:
    if not text.startswith("/"):
        raise ConfigError(path, f'must start with "/", got {_show(text)}')
    if _UNSAFE.search(text) or "?" in text or "#" in text:
        reason = f'must not contain spaces, control characters, "?" or "#", got {_show(text)}'
        raise ConfigError(path, reason)
    # Requests have "//" collapsed and are matched on "/" boundaries, so "/api/" and "/api//"
    # mean "/api"; normalising here keeps route matching a plain prefix comparison.
    return re.sub("/{2,}", "/", text).rstrip("/") or "/"


def _dir_path(text: str, path: str, ctx: _Context) -> str:
    if not text or "\x00" in text:
        raise ConfigError(path, f"must be a directory path, got {_show(text)}")
    # Resolved once here, so the server never depends on its working directory.
    return os.path.abspath(os.path.join(ctx.base_dir, text))


def _file_name(text: str, path: str, ctx: _Context) -> str:
    if not text or "/" in text or "\x00" in text or text in (".", ".."):
        raise ConfigError(path, f'must be a file name (no "/", not "." or ".."), got {_show(text)}')
    return text


def _hostname(text: str, path: str, ctx: _Context) -> str:
    # ASCII only: Host headers carry IDNs as punycode, and str.lower() on Unicode folds
    # look-alikes (KELVIN SIGN -> "k") that no client would send.
    if not text or not text.isascii() or _UNSAFE.search(text):
        raise ConfigError(path, f"must be an ASCII host name (punycode for IDN), got {_show(text)}")
    return text.lower()


def _upstream(text: str, path: str, ctx: _Context) -> str:
    try:
        split_host_port(text)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None
    return text


def _check_path(text: str, path: str, ctx: _Context) -> str:
    # Sent raw in a request line: CR/LF would inject fields, a space would split the line.
    if not text.startswith("/") or _UNSAFE.search(text) or "#" in text:
        reason = 'must start with "/" and not contain spaces, control characters or "#", got '
        raise ConfigError(path, reason + _show(text))
    return text


def _host_header(text: str, path: str, ctx: _Context) -> str:
    if not text or not all("!" <= c <= "~" for c in text):
        reason = '"client", "upstream" or a Host value (printable ASCII, no spaces)'
        raise ConfigError(path, f"must be {reason}, got {_show(text)}")
    return text


def _network(text: str, path: str, ctx: _Context) -> str:
    try:
        parse_network(text)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None
    return text


def _header_value(text: str, path: str, ctx: _Context) -> str:
    if not text or not all(" " <= c <= "~" for c in text):
        raise ConfigError(path, f"must be printable ASCII, got {_show(text)}")
    return text


def _url(text: str, path: str, ctx: _Context) -> str:
    if not text or _UNSAFE.search(text):
        reason = f"must be a URL without spaces or control characters, got {_show(text)}"
        raise ConfigError(path, reason)
    return text


_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT = re.compile(r"[0-9]{1,5}")  # ASCII digits: int() alone would take "+80", "8_0", " 80"


def split_host_port(text: str) -> tuple[str, int]:
    """Split an upstream ``"host:port"`` (IPv6 as ``"[::1]:8080"``). Raises ValueError."""
    bad = ValueError(f"{_show(text)} is not host:port")
    if "://" in text:
        bad = ValueError(f"{_show(text)} is not host:port (write it without the scheme)")
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = text.rpartition(":")
        if not _HOST_NAME.fullmatch(host):  # also refuses an unbracketed IPv6 address
            raise bad
    if not sep or not _PORT.fullmatch(port):
        raise bad
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{_show(text)}: port must be between 1 and 65535")
    return host, int(port)


# --- tables ------------------------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class Field:
    name: str  # the JSON key and the dataclass field
    spec: Spec
    # Cascading: when absent, the value of the enclosing object (route < server < top level);
    # checked before the object's other keys, as the objects nested in it inherit it.
    cascade: bool = False


@dataclass(frozen=True)
class Table(Generic[T]):
    name: str  # the object's name under "$defs" in schema.json ("" for the root)
    cls: type[T]
    fields: tuple[Field, ...]
    # Checks across fields, run once all fields are valid: (values, path of the object).
    finish: Callable[[dict[str, Any], str], None] | None = None
    # Builds the dataclass from the checked values, where keys and fields differ (an upstream's
    # "address" becomes host and port); default: cls(**values).
    make: Callable[[dict[str, Any]], T] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    @property
    def defaults(self) -> dict[str, Any]:
        """Defaults from the dataclass; a field with none is a required key."""
        return {
            f.name: f.default
            for f in dataclasses.fields(self.cls)  # type: ignore[arg-type]
            if f.default is not dataclasses.MISSING
        }

    @property
    def required(self) -> tuple[str, ...]:
        defaults = self.defaults
        return tuple(n for n in self.names if n not in defaults)


class Nested(Spec, Generic[T]):
    """A JSON object described by another table."""

    def __init__(self, table: Table[T]) -> None:
        self.table = table

    def check(self, value: object, path: str, ctx: _Context) -> object:
        return _build(self.table, value, path, ctx)

    def schema(self) -> dict[str, Any]:
        return {"$ref": f"#/$defs/{self.table.name}"}


class Upstream(Spec):
    """An upstream: eXpServer's ``"host:port"`` string, or an object with nginx's parameters."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if isinstance(value, str):
            return _make_upstream({"address": _upstream(value, path, ctx)})
        if isinstance(value, dict):
            return _build(UPSTREAM, value, path, ctx)
        raise _expected(path, 'a "host:port" string or an object', value)

    def schema(self) -> dict[str, Any]:
        string = {"type": "string", "pattern": _UPSTREAM_PATTERN}
        return {"oneOf": [string, {"$ref": f"#/$defs/{UPSTREAM.name}"}]}


def _make_upstream(values: dict[str, Any]) -> UpstreamConfig:
    host, port = split_host_port(values.pop("address"))  # checked by _upstream already
    return UpstreamConfig(host, port, **values)


def _finish_route(values: dict[str, Any], path: str) -> None:
    kind = values["type"]
    for key in REQUIRED_BY_TYPE.get(kind, ()):
        if key not in values:
            raise ConfigError(path, f"{key} is required for a {kind} route")
    if kind == "reverse_proxy" and not values["upstreams"]:
        raise ConfigError(_join(path, "upstreams"), "must not be empty for a reverse_proxy route")
    if kind == "reverse_proxy" and all(u.backup for u in values["upstreams"]):
        # Backups stand in for primaries that are down; with no primary nothing is backed up.
        reason = "at least one upstream must not be a backup"
        raise ConfigError(_join(path, "upstreams"), reason)
    if kind != "reverse_proxy":
        for key in PROXY_KEYS:
            if key in values:
                raise ConfigError(_join(path, key), "only applies to a reverse_proxy route")
    if kind == "file_serve":
        directory = values["dir_path"]
        if not os.path.exists(directory):
            reason = f"directory {_show(directory)} does not exist"
            raise ConfigError(_join(path, "dir_path"), reason)
        if not os.path.isdir(directory):
            raise ConfigError(_join(path, "dir_path"), f"{_show(directory)} is not a directory")


def _finish_server(values: dict[str, Any], path: str) -> None:
    # Two routes with one req_path: the second could never be chosen (nginx refuses this too).
    seen: dict[str, int] = {}
    for i, route in enumerate(values.get("routes", ())):
        if route.req_path in seen:
            first = f"{path}.routes[{seen[route.req_path]}]"
            reason = f"{_show(route.req_path)} is already used by {first}"
            raise ConfigError(f"{path}.routes[{i}].req_path", reason)
        seen[route.req_path] = i


# Schema patterns for what the string checks above enforce (ECMA-262 regex, as JSON Schema has).
_REQ_PATH_PATTERN = "^/[^\\x00-\\x20\\x7f?#]*$"
_FILE_NAME_PATTERN = "^(?!\\.\\.?$)[^/\\x00]+$"
_UPSTREAM_PATTERN = "^(\\[[^\\]]+\\]|[A-Za-z0-9._-]+):[0-9]{1,5}$"
_URL_PATTERN = "^[^\\x00-\\x20\\x7f]+$"
_HOSTNAME_PATTERN = "^[\\x21-\\x7e]+$"
_HEADER_PATTERN = "^[\\x20-\\x7e]+$"
_CHECK_PATH_PATTERN = "^/[^\\x00-\\x20\\x7f#]*$"


def _pattern(check: StringCheck, pattern: str) -> String:
    return String(extra=check, keywords=(("pattern", pattern),))


def _acl_list() -> Array:
    return Array(String(extra=_network))


def _cascading(name: str, spec: Spec) -> Field:
    return Field(name, spec, cascade=True)


# Cascading keys of a connection (server level and up: the head is read before any route is
# known) and of a request (route level and up).
CONNECTION_LIMITS = (
    _cascading("keepalive_timeout", Seconds()),
    _cascading("header_timeout", Seconds()),
    _cascading("send_timeout", Seconds()),
)
REQUEST_LIMITS = (
    _cascading("max_body_size", Integer(0)),
    _cascading("body_timeout", Seconds()),
    _cascading("connect_timeout", Seconds()),
    _cascading("upstream_read_timeout", Seconds()),
    _cascading("upstream_send_timeout", Seconds()),
)

LISTENER = Table(
    "listener",
    ListenerConfig,
    (
        Field("host", String()),
        Field("port", Integer(1, 65535)),
    ),
)

UPSTREAM = Table(
    "upstream",
    UpstreamConfig,
    (
        Field("address", _pattern(_upstream, _UPSTREAM_PATTERN)),
        Field("weight", Integer(1, 1000)),
        Field("max_fails", Integer(0)),
        Field("fail_timeout", Seconds()),
        Field("backup", Boolean()),
    ),
    make=_make_upstream,
)

HEALTH_CHECK = Table(
    "health_check",
    HealthCheckConfig,
    (
        Field("path", _pattern(_check_path, _CHECK_PATH_PATTERN)),
        Field("interval", Seconds()),
        Field("timeout", Seconds()),
        Field("expect_status", Integer(100, 599)),
        Field("passes", Integer(1)),
        Field("fails", Integer(1)),
    ),
)

ROUTE = Table(
    "route",
    RouteConfig,
    (
        Field("req_path", _pattern(_req_path, _REQ_PATH_PATTERN)),
        Field("type", String(choices=ROUTE_TYPES)),
        Field("dir_path", String(extra=_dir_path, keywords=(("minLength", 1),))),
        Field("index", Array(_pattern(_file_name, _FILE_NAME_PATTERN))),
        Field("autoindex", Boolean()),
        Field("dotfiles", String(choices=("deny", "allow"))),
        Field("upstreams", Array(Upstream())),
        Field("http_status_code", Integer(choices=REDIRECT_CODES)),
        Field("redirect_url", _pattern(_url, _URL_PATTERN)),
        Field("ip_whitelist", _acl_list()),
        Field("ip_blacklist", _acl_list()),
        Field("gzip_enable", Boolean()),
        Field("gzip_level", Integer(1, 9)),
        Field("brotli_enable", Boolean()),
        Field("brotli_level", Integer(0, 11)),
        Field("compress_min_length", Integer(0)),
        *REQUEST_LIMITS,
        Field("lb_method", String(choices=LB_METHODS)),
        Field("proxy_host_header", _pattern(_host_header, _HOSTNAME_PATTERN)),
        Field("health_check", Nullable(Nested(HEALTH_CHECK))),
        Field("retries", Integer(0)),
        Field("upstream_keepalive", Integer(0)),
    ),
    finish=_finish_route,
)

SERVER = Table(
    "server",
    ServerConfig,
    (
        Field("listeners", Array(Nested(LISTENER), min_items=1)),
        Field("hostnames", Array(_pattern(_hostname, _HOSTNAME_PATTERN))),
        Field("routes", Array(Nested(ROUTE))),
        Field("ip_whitelist", _acl_list()),
        Field("ip_blacklist", _acl_list()),
        *CONNECTION_LIMITS,
        *REQUEST_LIMITS,
    ),
    finish=_finish_server,
)

ROOT = Table(
    "",
    Config,
    (
        Field("servers", Array(Nested(SERVER), min_items=1)),
        Field("server_name", _pattern(_header_value, _HEADER_PATTERN)),
        Field("workers", Workers()),
        *CONNECTION_LIMITS,
        *REQUEST_LIMITS,
        Field("max_connections", Integer(1)),
        Field("drain_timeout", Seconds()),
    ),
)

TABLES: tuple[Table[Any], ...] = (ROOT, SERVER, LISTENER, ROUTE, UPSTREAM, HEALTH_CHECK)


def _build(table: Table[T], value: object, path: str, ctx: _Context) -> T:
    if not isinstance(value, dict):
        raise _expected(path, "an object", value)
    duplicate = getattr(value, "duplicate", None)
    if duplicate is not None:
        raise ConfigError(_join(path, duplicate), "duplicate key")
    names = table.names
    for key in value:
        if key not in names:  # a typo must not silently fall back to a default
            raise ConfigError(_join(path, str(key)), _unknown(str(key), table))
    values: dict[str, Any] = {}
    # Cascading keys first (they have defaults, so are never required): the objects nested in
    # this one take this one's effective values as theirs.
    cascading = [f for f in table.fields if f.cascade]
    for field in cascading:
        if field.name in value:
            values[field.name] = field.spec.check(value[field.name], _join(path, field.name), ctx)
    effective = {f.name: _inherit(f.name, values, ctx, table) for f in cascading}
    inner = dataclasses.replace(ctx, inherited={**ctx.inherited, **effective}) if cascading else ctx
    required = table.required
    for field in table.fields:
        if field.cascade:
            continue
        if field.name in value:
            values[field.name] = field.spec.check(value[field.name], _join(path, field.name), inner)
        elif field.name in required:
            raise ConfigError(path, f"{field.name} is required")
    if table.finish is not None:
        table.finish(values, path)  # before inheriting, so it sees only the keys given
    values.update(effective)
    return table.make(values) if table.make else table.cls(**values)


_WHERE = {"": "the top level", "health_check": "a health_check"}


def _unknown(key: str, table: Table[Any]) -> str:
    # A key of another level (header_timeout in a route) is better told where it goes than
    # offered a look-alike of this level.
    homes = [_WHERE.get(t.name, f"a {t.name}") for t in TABLES if key in t.names]
    if homes:
        return f"unknown key here (allowed in {' and '.join(homes)})"
    return "unknown key" + _did_you_mean(key, table.names)


def _inherit(name: str, values: dict[str, Any], ctx: _Context, table: Table[Any]) -> Any:
    if name in values:
        return values[name]
    return ctx.inherited.get(name, table.defaults[name])


# --- reading files ------------------------------------------------------------------------------


class _JsonObject(dict[str, Any]):
    """A JSON object that remembers a repeated key, which json.loads would silently overwrite."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                obj.duplicate = key
                break
            seen.add(key)
    return obj


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")  # Python's json takes NaN/Infinity; JSON does not


def _parse_json(text: str) -> object:
    try:
        return json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise ConfigError("$", f"invalid JSON at {where}: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # NaN, 5000-digit integers, absurd nesting
        raise ConfigError("$", f"invalid JSON: {exc}") from None


def _parse_toml(text: str) -> object:
    try:
        import tomllib  # here, not at the top: Python 3.10 can still load JSON configs
    except ImportError:
        raise ConfigError("$", "TOML configs need Python 3.11 or later") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("$", f"invalid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError("$", "invalid TOML: nested too deeply") from None


def load(path: str) -> Config:
    """Read and validate the config file at ``path`` (TOML if it ends in .toml, else JSON)."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ConfigError("$", f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # a BOM from a Windows editor is harmless
    except UnicodeDecodeError as exc:
        raise ConfigError("$", f"not UTF-8 text (bad byte at offset {exc.start})") from None
    obj = _parse_toml(text) if path.endswith(".toml") else _parse_json(text)
    source = os.path.abspath(path)
    return parse(obj, os.path.dirname(source), source=source)


def parse(obj: object, base_dir: str, source: str | None = None) -> Config:
    """Validate an already-decoded config; relative paths resolve against ``base_dir``."""
    config = _build(ROOT, obj, "$", _Context(os.path.abspath(base_dir)))
    return dataclasses.replace(config, source=source)


def default(dir_path: str, host: str = "127.0.0.1", port: int = 8080) -> Config:
    """The no-config mode: serve ``dir_path`` with directory listings on one listener."""
    raw = {
        "servers": [
            {
                "listeners": [{"host": host, "port": port}],
                "routes": [{"req_path": "/", "type": "file_serve", "dir_path": dir_path}],
            }
        ]
    }
    return parse(raw, os.getcwd())


def schema() -> dict[str, Any]:
    """The published JSON Schema (draft 2020-12) of the config file."""
    text = resources.files("expserver").joinpath("schema.json").read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(text)
    return result


# --- summary for `expserver check` ---------------------------------------------------------------


def _address(listener: ListenerConfig) -> str:
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    return f"{host}:{listener.port}"


def _acl_text(whitelist: tuple[str, ...], blacklist: tuple[str, ...]) -> list[str]:
    parts = []
    if whitelist:
        parts.append("allow " + " ".join(whitelist))
    if blacklist:
        parts.append("deny " + " ".join(blacklist))
    return parts


def _upstream_text(upstream: UpstreamConfig) -> str:
    params = [f"weight {upstream.weight}"] if upstream.weight != 1 else []
    params += ["backup"] if upstream.backup else []
    return upstream.address + (f" ({', '.join(params)})" if params else "")


def _route_text(route: RouteConfig) -> str:
    if route.type == "file_serve":
        parts = [f"{route.dir_path}", "index " + (" ".join(route.index) or "-")]
        parts.append("autoindex" if route.autoindex else "no autoindex")
        if route.dotfiles == "allow":
            parts.append("dotfiles allowed")
    elif route.type == "redirect":
        parts = [f"{route.http_status_code} {route.redirect_url}"]
    elif route.type == "reverse_proxy":
        parts = [" ".join(_upstream_text(u) for u in route.upstreams), route.lb_method]
        if route.health_check:
            check = route.health_check
            parts.append(f"health check {check.path} every {check.interval:g}s")
    else:
        parts = []
    if route.gzip_enable:
        parts.append(f"gzip {route.gzip_level}")
    if route.brotli_enable:
        parts.append(f"brotli {route.brotli_level}")
    parts += _acl_text(route.ip_whitelist, route.ip_blacklist)
    return route.type + (" " + ", ".join(parts) if parts else "")


_LIMIT_NAMES = {
    "keepalive_timeout": "keepalive",
    "header_timeout": "header",
    "send_timeout": "send",
    "body_timeout": "body",
    "connect_timeout": "connect",
    "upstream_read_timeout": "upstream read",
    "upstream_send_timeout": "upstream send",
}


Limited = Config | ServerConfig | RouteConfig


def _limits_text(obj: Limited, parent: Config | ServerConfig | None) -> str:
    """The cascading values of ``obj`` that differ from ``parent``'s (all of them if None)."""
    parts = []
    for name, word in _LIMIT_NAMES.items():
        value = getattr(obj, name, None)
        if value is not None and (parent is None or value != getattr(parent, name)):
            parts.append(f"{word} {value:g}s")
    text = "timeouts " + ", ".join(parts) if parts else ""
    size = obj.max_body_size
    if parent is None or size != parent.max_body_size:
        text += ("; " if text else "") + "max_body_size "
        text += f"{size} bytes" if size else "unlimited"
    return text


def summary(cfg: Config) -> str:
    """A human-readable account of ``cfg``, one line per server and per route."""
    lines = [
        (
            f"config {cfg.source or '(built in)'}: {len(cfg.servers)} server(s), "
            f"{cfg.workers} worker(s), server_name {_show(cfg.server_name)}"
        ),
        "timeouts: " + _limits_text(cfg, None).removeprefix("timeouts "),
        f"max_connections {cfg.max_connections} per worker, drain_timeout {cfg.drain_timeout:g}s",
    ]
    for i, server in enumerate(cfg.servers):
        head = [
            "listen " + " ".join(_address(listener) for listener in server.listeners),
            "hostnames " + (" ".join(server.hostnames) or "any"),
            *_acl_text(server.ip_whitelist, server.ip_blacklist),
        ]
        own = _limits_text(server, cfg)
        lines.append(f"servers[{i}]: " + "; ".join(head) + (f"; {own}" if own else ""))
        width = max((len(route.req_path) for route in server.routes), default=0)
        for route in server.routes:
            own = _limits_text(route, server)
            lines.append(f"  {route.req_path:<{width}} -> {_route_text(route)}")
            lines[-1] += f"; {own}" if own else ""
        if not server.routes:
            lines.append("  (no routes: every request answers 404)")
    return "\n".join(lines)
