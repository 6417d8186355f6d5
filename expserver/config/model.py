"""Every config key, declared once: the frozen dataclasses the server is built from.

Each field is a key (see :func:`.keys.key`): its default, its Spec (type and bounds), whether
it cascades, and the sentence that documents it in schema.json and the README. The tables
the loader walks are derived from these classes at the bottom of this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import checks
from .checks import split_upstream
from .keys import ALL_TABLES, Field, Nested, Table, build, key
from .specs import (
    INT32_MAX,
    Array,
    Boolean,
    ConfigError,
    Integer,
    MapOf,
    Nullable,
    OneOrMany,
    Seconds,
    Spec,
    String,
    Workers,
    _Context,
    _expected,
    _join,
    _show,
)

ROUTE_TYPES = ("file_serve", "redirect", "reverse_proxy", "metrics", "health", "respond")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# Keys a route of a given type cannot do without (eXpServer has the same rules).
REQUIRED_BY_TYPE: dict[str, tuple[str, ...]] = {
    "file_serve": ("dir_path",),
    "redirect": ("redirect_url",),
    "reverse_proxy": ("upstreams",),
    "respond": ("status",),
}
LB_METHODS = ("round_robin", "least_conn", "ip_hash", "random_two")
PROXY = ("reverse_proxy",)
FILES = ("file_serve",)
RESPOND = ("respond",)
declare = key   # for classes with a field named "key" (TLSConfig)


def _acl(doc: str) -> Any:
    return key((), spec=Array(checks.NETWORK), doc=doc, ours=False)


# --- logs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessLogConfig:
    path: str = key(
        "stdout", spec=checks.LOG_PATH,
        doc='Where lines go: "stdout", "stderr" or a file (appended to; reopened on SIGUSR1, '
            "after logrotate moves it).")
    format: str = key(
        "combined", spec=checks.LOG_FORMAT,
        doc='"combined" (nginx\'s, exactly), "json" (one object per line with Caddy\'s field '
            "names: request.remote_ip/method/host/uri/proto/headers/tls, status, size, "
            "duration, upstream, request_id), or a template of nginx-style variables: "
            "$remote_addr $time_local $time_iso8601 $msec $request $request_method "
            "$request_uri $server_protocol $host $status $body_bytes_sent $bytes_sent "
            "$http_referer $http_user_agent $request_time $upstream_addr "
            "$upstream_response_time $ssl_protocol $request_id.")


@dataclass(frozen=True)
class ErrorLogConfig:
    path: str = key("stderr", spec=checks.LOG_PATH,
                    doc='"stdout", "stderr" or a file (reopened on SIGUSR1).')
    level: str = key(
        "warn", spec=String(choices=("debug", "info", "warn", "error")),
        doc='The least severe messages written: "error" (internal faults, refused '
            'configs), "warn" (failing upstreams, worker deaths, reloads), "info" (TLS '
            'handshake failures, timeouts), "debug" (tracebacks).')


@dataclass(frozen=True, kw_only=True)
class Logging:
    """Keys of the top level and servers."""

    access_log: AccessLogConfig | None = key(
        None, spec=Nullable(Nested(Table("access_log", AccessLogConfig, ()))), cascade=True,
        default_doc="none (`expserver serve DIR`: stdout, combined)",
        doc="One line per response, written in batches (at 64 KiB, every second and at "
            "exit) by a thread of each worker, so the loop never waits on the disk; lines "
            "the disk cannot take are dropped and counted rather than slow the server. null "
            "or unset: no access log (eXpServer configs keep eXpServer's quiet).")


# --- cascading keys: declared once, inherited top level -> server -> route ----------------------


@dataclass(frozen=True, kw_only=True)
class ConnectionLimits:
    """Keys of a connection: the top level and servers (a head is read before any route is
    known, so these are the listener's first server's)."""

    keepalive_timeout: float = key(
        75.0, spec=Seconds(), cascade=True,
        doc="Seconds an idle keep-alive connection is kept open waiting for the next request "
            "(nginx's keepalive_timeout).")
    header_timeout: float = key(
        60.0, spec=Seconds(), cascade=True,
        doc="Seconds allowed to receive a complete request head; 408 after that (nginx's "
            "client_header_timeout).")
    send_timeout: float = key(
        60.0, spec=Seconds(), cascade=True,
        doc="Seconds a write to the client may make no progress before the connection is "
            "closed (nginx's send_timeout).")


@dataclass(frozen=True, kw_only=True)
class RequestLimits:
    """Keys of a request: the top level, servers and routes."""

    charset: str | None = key(
        None, spec=checks.CHARSET, cascade=True,
        default_doc="none (`expserver serve DIR`: utf-8)",
        doc='Adds "; charset=..." to the Content-Type of text files and listings ("utf-8"); '
            "unset, text types carry no charset, as eXpServer and nginx send them.")
    request_id: bool = key(
        False, spec=Boolean(), cascade=True,
        doc="Give every request an X-Request-ID: the client's when it sends a valid one "
            "(1 to 200 of A-Z a-z 0-9 - _ . : ; =), else a new random one; sent upstream by "
            "reverse_proxy routes and logged as $request_id.")

    max_body_size: int = key(
        1048576, spec=Integer(0), cascade=True, type_defaults={"reverse_proxy": 0},
        default_doc="`1048576`; `0` on reverse_proxy routes",
        doc="Largest request body accepted, in bytes; larger bodies get 413. 0 means no limit. "
            "Routes that do not stream the body default to 1 MiB (nginx's "
            "client_max_body_size); reverse_proxy routes, which stream it with backpressure, "
            "default to no limit (as Caddy, HAProxy and eXpServer) unless a value is set "
            "here, on their server or at the top level.")
    body_timeout: float = key(
        60.0, spec=Seconds(), cascade=True,
        doc="Seconds a request body may go without a new byte arriving before the connection "
            "is closed (nginx's client_body_timeout).")
    connect_timeout: float = key(
        60.0, spec=Seconds(), cascade=True, only=PROXY,
        doc="reverse_proxy: seconds allowed to connect to an upstream; a peer that does not "
            "connect in time counts as failed and the request may go to the next one (nginx's "
            "proxy_connect_timeout).")
    upstream_read_timeout: float = key(
        60.0, spec=Seconds(), cascade=True, only=PROXY,
        doc="reverse_proxy: seconds an upstream may go without sending a byte while its "
            "response is awaited or relayed: 504 if the client has not had a byte of the "
            "response yet, else its connection is closed (nginx's proxy_read_timeout).")
    upstream_send_timeout: float = key(
        60.0, spec=Seconds(), cascade=True, only=PROXY,
        doc="reverse_proxy: seconds a write of the request to an upstream may make no "
            "progress before the exchange is abandoned (nginx's proxy_send_timeout).")


# --- policies: per server and per route, merged down (expserver/policy.py) ---------------------


@dataclass(frozen=True)
class HeadersConfig:
    set: tuple[tuple[str, str], ...] = key(
        (), spec=MapOf(checks.FIELD_NAME, checks.FIELD_VALUE),
        doc="Fields set on every response: a field of the same name that the answer had "
            "(the upstream's included) is replaced.")
    add: tuple[tuple[str, tuple[str, ...]], ...] = key(
        (), spec=MapOf(checks.FIELD_NAME, OneOrMany(checks.FIELD_VALUE)),
        doc="Fields added to every response after the ones it has; a list adds the field "
            "once per value (nginx's add_header ... always).")
    remove: tuple[str, ...] = key(
        (), spec=Array(checks.FIELD_NAME),
        doc="Fields removed from every response, whatever made it (nginx's "
            "proxy_hide_header, for every route type).")


@dataclass(frozen=True)
class CorsConfig:
    allow_origins: tuple[str, ...] = key(
        spec=OneOrMany(checks.ORIGIN),
        doc='Origins allowed to read the answers ("https://app.example.test"), or "*" for '
            "any (then never with credentials).")
    allow_methods: tuple[str, ...] = key(
        ("GET", "HEAD", "POST"), spec=Array(checks.METHOD),
        doc="Methods a preflight admits (Access-Control-Allow-Methods).")
    allow_headers: tuple[str, ...] = key(
        (), spec=Array(checks.METHOD),
        doc='Request fields a preflight admits; ["*"] admits whatever it asks for.')
    expose_headers: tuple[str, ...] = key(
        (), spec=Array(checks.METHOD),
        doc="Response fields scripts may read (Access-Control-Expose-Headers).")
    allow_credentials: bool = key(
        False, spec=Boolean(),
        doc="Let requests with cookies or HTTP authentication read the answers "
            "(Access-Control-Allow-Credentials).")
    max_age: int = key(600, spec=Integer(0, INT32_MAX),
                       doc="Seconds a browser may keep a preflight's answer.")


@dataclass(frozen=True)
class BasicAuthConfig:
    users_file: str = key(
        spec=checks.FILE_PATH,
        doc="htpasswd file of user:hash lines with bcrypt hashes (`htpasswd -B`); older "
            "hash kinds ({SHA}, $apr1$, crypt) are refused: they fall to a laptop's GPU.")
    realm: str = key("Restricted", spec=checks.HEADER_VALUE,
                     doc="Shown by browsers in the password prompt.")
    forward_authorization: bool = key(
        False, spec=Boolean(),
        doc="reverse_proxy: also send the client's Authorization field upstream (by default "
            "it stays here: the password is this server's business).")


@dataclass(frozen=True)
class RateLimitConfig:
    rate: str = key(spec=checks.RATE,
                    doc='Requests per second or minute per key: "10r/s", "600r/m".')
    burst: int = key(
        0, spec=Integer(0, INT32_MAX),
        doc="Requests over the rate a key may have queued; beyond them: 429 with "
            "Retry-After (nginx's burst).")
    key: str = key('client_ip', spec=checks.LIMIT_KEY,
                   doc='What is limited: "client_ip", or "header:NAME" (an API key); a '
                       "request without the field is not limited.")
    nodelay: bool = declare(
        False, spec=Boolean(),
        doc="Answer requests within the burst at once instead of spacing them at the rate "
            "(requests with a body are never held).")
    size: int = declare(
        10000, spec=Integer(16, 10_000_000),
        doc="Keys tracked at once (about 24 bytes each, in memory shared by the workers); "
            "the one seen longest ago makes room for a new one.")


@dataclass(frozen=True, kw_only=True)
class Policies:
    """Keys of servers and routes; a route's are merged over its server's."""

    cors: CorsConfig | None = key(
        None, spec=Nullable(Nested(Table("cors", CorsConfig, ()))),
        doc="Cross-origin requests: preflights (OPTIONS with Access-Control-Request-Method) "
            "are answered here, before any password is asked; other answers get the CORS "
            "fields for allowed origins, and Vary: Origin where they depend on it. A route's "
            "replaces its server's.")
    basic_auth: BasicAuthConfig | None = key(
        None, spec=Nullable(Nested(Table("basic_auth", BasicAuthConfig, ()))),
        doc="HTTP Basic authentication: 401 with WWW-Authenticate until a user of the file "
            "gives its password. Verified credentials are remembered for a while (bcrypt per "
            "request would cost milliseconds of CPU). A route's replaces its server's.")
    rate_limit: RateLimitConfig | None = key(
        None, spec=Nullable(Nested(Table("rate_limit", RateLimitConfig, ()))),
        doc="nginx's leaky bucket per key, counted across all workers: over the rate and "
            "the burst, 429 with Retry-After. A server's counts all its routes together; a "
            "route's replaces it.")
    limit_conn: int | None = key(
        None, spec=Integer(1, INT32_MAX),
        doc="Requests one client address may have in flight at once, across all workers; "
            "more get 429 with Retry-After (nginx's limit_conn).")

    headers: HeadersConfig | None = key(
        None, spec=Nullable(Nested(Table("headers", HeadersConfig, ()))),
        doc="Header rules for every response of every route type (files, redirects, proxied "
            "answers, errors). A route's rules are merged over its server's: its `set` and "
            "`remove` win for the fields they name, its `add` comes after the server's "
            "(unlike nginx's add_header, a route's rules never silently drop the server's).")
    error_pages: tuple[tuple[str, str], ...] = key(
        (), spec=MapOf(checks.ERROR_STATUS, checks.PAGE_PATH),
        doc='Pages sent instead of the built-in ones for errors, by status ("404") or class '
            '("5xx"): a path served by a file_serve route of the same server, read when the '
            "server starts or reloads. They answer the server's own errors on every route "
            "type, the proxy's 502 and 504 included; an upstream's own error answers are "
            "relayed as they are. A route's entries are merged over its server's.")


# --- objects ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ListenerConfig:
    host: str = key(
        spec=checks.LISTEN_HOST, ours=False,
        doc='Address to bind: an IPv4 or IPv6 address, or a host name such as "localhost". '
            '"0.0.0.0" accepts on every IPv4 interface.')
    port: int = key(spec=Integer(1, 65535), ours=False,
                    doc="TCP port to listen on (1-65535).")
    tls: bool = key(
        False, spec=Boolean(),
        doc="Speak TLS (HTTPS) on this listener. Every server on it needs a `tls` object; "
            "SNI picks among them by their hostnames.")


# Mozilla's "intermediate" TLS 1.2 suites (TLS 1.3's are OpenSSL's, all AEAD).
INTERMEDIATE_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305")


@dataclass(frozen=True)
class TLSConfig:
    cert: str = key(
        spec=checks.FILE_PATH,
        doc="PEM file of the certificate, followed by its chain (relative paths resolve "
            "against the config's directory).")
    key: str = key(spec=checks.FILE_PATH, doc="PEM file of the certificate's private key.")
    password_env: str | None = declare(
        None, spec=checks.ENV_NAME,
        doc="Name of the environment variable holding the key's password, if it has one "
            "(read when the server starts or reloads, never written in the config).")
    protocols: tuple[str, ...] = declare(
        ("TLSv1.2", "TLSv1.3"), spec=Array(String(choices=("TLSv1.2", "TLSv1.3")), min_items=1),
        doc="TLS versions accepted (Mozilla intermediate: 1.2 and 1.3; older ones are always "
            "refused).")
    ciphers: str = declare(
        INTERMEDIATE_CIPHERS, spec=checks.HEADER_VALUE, default_doc="Mozilla intermediate",
        doc="OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are all AEAD and not "
            "configured). The client's preference is followed, as Mozilla intermediate says.")
    groups: str = declare(
        "X25519:prime256v1:secp384r1", spec=checks.HEADER_VALUE,
        doc="Key exchange groups, in order of preference (Mozilla intermediate's; OpenSSL's "
            "defaults would also offer X448 and P-521).")
    session_tickets: bool = declare(
        True, spec=Boolean(),
        doc="Session resumption with tickets; their keys are shared by all workers and "
            "renewed at each reload.")
    hsts: int = declare(
        0, spec=Integer(0, INT32_MAX),
        doc="Strict-Transport-Security max-age in seconds on every TLS response of this "
            "server; 0 sends none (plain HTTP responses never carry it).")
    hsts_subdomains: bool = declare(False, spec=Boolean(),
                                doc="Add includeSubDomains to Strict-Transport-Security.")


@dataclass(frozen=True)
class UpstreamTLSConfig:
    verify: bool = key(
        True, spec=Boolean(),
        doc="Verify an https:// upstream's certificate and name against the CAs (the "
            "system's, or ca_file); false accepts any certificate (a test setup, not "
            "production).")
    ca_file: str | None = key(None, spec=checks.FILE_PATH,
                              doc="PEM file of the CAs to trust instead of the system's.")
    server_name: str | None = key(
        None, spec=checks.HOSTNAME,
        doc="Name sent in SNI and checked against the certificate; default: the upstream's "
            "host.")


@dataclass(frozen=True)
class UpstreamConfig:
    """One upstream server, with nginx's ``server`` parameters (weight, max_fails, ...)."""

    host: str  # IPv6 without brackets; "address" in the config (see UPSTREAM below)
    port: int
    weight: int = key(1, spec=Integer(1, 1000), ours=False,
                      doc="Share of requests relative to the route's other upstreams (nginx's "
                          "weight).")
    max_fails: int = key(
        1, spec=Integer(0, INT32_MAX), ours=False,
        doc="Failed attempts (refused, reset, timed out, invalid reply), each within "
            "fail_timeout of the one before, that mark this upstream down for fail_timeout; "
            "then a single request tries it again. 0: never marked down. Ignored when the "
            "route has a single upstream (nginx's max_fails).")
    fail_timeout: float = key(
        10.0, spec=Seconds(), ours=False,
        doc="Seconds that count failures together, and that a down upstream stays down "
            "(nginx's fail_timeout).")
    backup: bool = key(
        False, spec=Boolean(), ours=False,
        doc="Requests go here only while no primary (non-backup) upstream is available "
            "(nginx's backup).")
    tls: bool = False   # "https://" in the address; not a key of its own

    @property
    def address(self) -> str:
        """``host:port`` as a config spells it (IPv6 in brackets), after its scheme if TLS."""
        hostport = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return "https://" + hostport if self.tls else hostport


@dataclass(frozen=True)
class HealthCheckConfig:
    path: str = key("/", spec=checks.CHECK_PATH, ours=False,
                    doc="Path (and query) of the GET sent to each upstream.")
    interval: float = key(5.0, spec=Seconds(), ours=False,
                          doc="Seconds between two checks of one upstream.")
    timeout: float = key(2.0, spec=Seconds(), ours=False,
                         doc="Seconds a check may take; a slower one fails.")
    expect_status: int = key(
        200, spec=Integer(100, 599), ours=False,
        doc="Status of a passing check; any other status, a connection error or a timeout "
            "fails it.")
    passes: int = key(1, spec=Integer(1, INT32_MAX), ours=False,
                      doc="Passing checks in a row that bring an unhealthy upstream back.")
    fails: int = key(1, spec=Integer(1, INT32_MAX), ours=False,
                     doc="Failing checks in a row that take a healthy upstream out.")


class UpstreamSpec(Spec):
    """An upstream: eXpServer's ``"host:port"`` string, or an object with nginx's parameters."""

    def check(self, value: object, path: str, ctx: _Context) -> object:
        if isinstance(value, str):
            return _make_upstream({"address": checks.upstream(value, path, ctx)})
        if isinstance(value, dict):
            return build(UPSTREAM, value, path, ctx)
        raise _expected(path, 'a "host:port" string or an object', value)

    def schema(self) -> dict[str, Any]:
        string = {"type": "string", "pattern": checks.UPSTREAM_PATTERN}
        return {"oneOf": [string, {"$ref": "#/$defs/upstream"}]}

    def words(self) -> str:
        return "string or upstream object"


@dataclass(frozen=True)
class RouteConfig(RequestLimits, Policies):
    req_path: str = key(
        spec=checks.REQ_PATH, ours=False,
        doc='Path prefix this route serves; starts with "/". Matched on "/" boundaries: "/api" '
            'matches "/api" and "/api/x" but not "/api2". A trailing "/" is ignored.')
    type: str = key(
        spec=String(choices=ROUTE_TYPES), ours=False,
        doc='What the route does: "file_serve" serves files from dir_path, "redirect" answers '
            'with a redirect to redirect_url, "reverse_proxy" forwards to upstreams, "metrics" '
            'serves the server\'s metrics, "health" answers load balancers\' and Kubernetes\' '
            'probes: 200 "ok" while serving, 503 "draining" once a stop or reload began (not '
            "an eXpServer type).")
    dir_path: str | None = key(
        None, spec=checks.DIR_PATH, ours=False,
        doc="file_serve: directory to serve files from (required). A relative path resolves "
            "against the directory of the config file; the directory must exist.")
    index: tuple[str, ...] = key(
        ("index.html",), spec=Array(checks.FILE_NAME), ours=False,
        doc='file_serve: file names tried, in order, when a directory is requested. Names '
            'only: no "/", not "." or "..".')
    autoindex: bool = key(
        True, spec=Boolean(),
        doc="file_serve: list the directory's contents when it has no index file; when false "
            "such a request gets 403 (nginx's autoindex).")
    dotfiles: str = key(
        "deny", spec=String(choices=("deny", "allow")),
        doc='file_serve: "deny" answers 404 for names starting with "." (such as .git or '
            '.env); "allow" serves them.')
    upstreams: tuple[UpstreamConfig, ...] = key(
        (), spec=Array(UpstreamSpec()), ours=False,
        doc='reverse_proxy: the upstream servers, at least one (required), each as '
            'eXpServer\'s "host:port" (IPv6 as "[::1]:8080"), as "https://host[:port]" to '
            "reach it over TLS, or as an object with an address and nginx's server "
            "parameters (weight, max_fails, fail_timeout, backup). At least one must not be a "
            "backup.")
    upstream_tls: UpstreamTLSConfig = key(
        UpstreamTLSConfig(), spec=Nested(Table("upstream_tls", UpstreamTLSConfig, ())),
        only=PROXY, default_doc="verify against the system CAs",
        doc="reverse_proxy: how https:// upstreams are verified. Pooled keep-alive "
            "connections work over TLS as over plain TCP.")
    http_status_code: int = key(302, spec=Integer(choices=REDIRECT_CODES), ours=False,
                                doc="redirect: status code of the redirect.")
    status: int | None = key(
        None, spec=Integer(200, 599), only=RESPOND,
        doc="respond: the status of the fixed answer (required), e.g. 503 for a maintenance "
            "page or 204 for a ping.")
    body: str = key("", spec=String(), only=RESPOND,
                    doc="respond: the answer's body (UTF-8 text).")
    content_type: str = key("text/plain; charset=utf-8", spec=checks.HEADER_VALUE,
                            only=RESPOND, doc="respond: the answer's Content-Type.")
    cache_control: str | None = key(
        None, spec=checks.HEADER_VALUE, only=FILES,
        doc='file_serve: Cache-Control of files (200, 206 and 304), e.g. "public, '
            'max-age=31536000, immutable".')
    expires: int | None = key(
        None, spec=Integer(0, INT32_MAX), only=FILES,
        doc="file_serve: seconds from now a file stays fresh: Expires and, unless "
            "cache_control is set, Cache-Control: max-age (nginx's expires).")
    fallback: str | None = key(
        None, spec=checks.PAGE_PATH, only=FILES,
        doc='file_serve: the file answered (200) for a path that names no file, for '
            'single-page apps ("/index.html"): a path under the route\'s own directory '
            "(nginx's try_files $uri /index.html).")
    redirect_url: str | None = key(None, spec=checks.URL, ours=False,
                                   doc="redirect: URL sent in the Location header (required).")
    ip_whitelist: tuple[str, ...] = _acl(
        "Client addresses (IPv4/IPv6 addresses or CIDR blocks) admitted to this route; empty "
        "admits all. An IPv4-mapped IPv6 client (::ffff:a.b.c.d) matches IPv4 entries. "
        "Refused clients get 403.")
    ip_blacklist: tuple[str, ...] = _acl(
        "Client addresses (IPv4/IPv6 addresses or CIDR blocks) refused with 403 on this route, "
        "checked after the whitelist.")
    gzip_enable: bool = key(False, spec=Boolean(), ours=False,
                            doc="Compress responses with gzip for clients that accept it.")
    gzip_level: int = key(6, spec=Integer(1, 9), ours=False,
                          doc="gzip compression level, 1 (fastest) to 9 (smallest).")
    brotli_enable: bool = key(False, spec=Boolean(),
                              doc="Compress responses with brotli for clients that accept it.")
    brotli_level: int = key(4, spec=Integer(0, 11),
                            doc="brotli compression level, 0 (fastest) to 11 (smallest).")
    compress_min_length: int = key(
        256, spec=Integer(0),
        doc="Smallest response body, in bytes, that is compressed (nginx's gzip_min_length).")
    lb_method: str = key(
        "round_robin", spec=String(choices=LB_METHODS), only=PROXY,
        doc='reverse_proxy: how a request picks its upstream. "round_robin": smooth weighted '
            'round-robin (nginx\'s default); "least_conn": fewest active connections relative '
            "to weight, ties in round-robin order (nginx's least_conn); \"ip_hash\": a "
            "consistent hash ring on the client address, so a client keeps its upstream and "
            "adding one moves about 1/n of the clients (nginx's hash $remote_addr consistent); "
            '"random_two": the less busy of two weighted random picks (nginx\'s random two '
            "least_conn).")
    proxy_host_header: str | None = key(
        None, spec=checks.HOST_VALUE, only=PROXY,
        default_doc='"client"; "upstream" for https:// upstreams',
        doc='reverse_proxy: the Host field sent upstream. "client" keeps the client\'s; '
            "\"upstream\" sends the chosen upstream's host:port (nginx's default, $proxy_host); "
            "any other value is sent as written (nginx's proxy_set_header Host). Unset: the "
            "client's for plain upstreams, the upstream's name for https:// ones (whose "
            "certificate names that host).")
    health_check: HealthCheckConfig | None = key(
        None, spec=Nullable(Nested(Table("health_check", HealthCheckConfig, ()))), only=PROXY,
        doc="reverse_proxy: active health checks, or null (the default) for none. Each "
            "upstream gets a GET for the check's path every interval; one that fails `fails` "
            "checks in a row gets no requests until it passes `passes` in a row. Passive "
            "failure counting (max_fails) applies either way (nginx Plus's health_check).")
    # None: one attempt per upstream (len(upstreams) - 1 retries)
    retries: int | None = key(
        None, spec=Integer(0, INT32_MAX), only=PROXY, default_doc="upstreams − 1",
        doc="reverse_proxy: how many more upstreams a failed request may try, each at most "
            "once: after a failed connect always, after the request was sent only if it is "
            "idempotent (GET, HEAD, PUT, DELETE, OPTIONS, TRACE). Default: every other "
            "upstream; 0: no retries (nginx's proxy_next_upstream_tries, which counts the "
            "first try too).")
    upstream_keepalive: int = key(
        32, spec=Integer(0, INT32_MAX), only=PROXY,
        doc="reverse_proxy: idle connections to each upstream kept for reuse, at least this "
            "many; the pool grows to the most requests that upstream had in flight at once (up "
            "to 1024), so a burst larger than the pool does not make every request connect "
            "anew (nginx's fixed keepalive pool does). Idle connections close after 60 s; 0 "
            "closes each connection after its response.")


@dataclass(frozen=True)
class ServerConfig(ConnectionLimits, RequestLimits, Policies, Logging):
    listeners: tuple[ListenerConfig, ...] = key(
        spec=Array(Nested(Table("listener", ListenerConfig, ())), min_items=1), ours=False,
        doc="Addresses this server accepts connections on. Several servers may share one "
            "listener and are then told apart by hostnames.")
    hostnames: tuple[str, ...] = key(
        (), spec=Array(checks.HOSTNAME), ours=False,
        doc="Host names (the Host header without its port, compared case-insensitively) this "
            "server answers; empty means any host. ASCII only: write internationalised names "
            "in punycode.")
    routes: tuple[RouteConfig, ...] = key(
        (), spec=Array(Nested(Table("route", RouteConfig, ()))), ours=False,
        doc="The routes of this server. A request takes the route with the longest req_path "
            'that is a prefix of its path on a "/" boundary; with no matching route it gets '
            "404. A server without routes answers eXpServer's dashboard at /api (the metrics "
            "JSON) and 404 elsewhere.")
    ip_whitelist: tuple[str, ...] = _acl(
        "Client addresses (IPv4/IPv6 addresses or CIDR blocks) admitted to every route of "
        "this server; empty admits all. Checked before the route's own lists; refused clients "
        "get 403.")
    ip_blacklist: tuple[str, ...] = _acl(
        "Client addresses (IPv4/IPv6 addresses or CIDR blocks) refused with 403 on every route "
        "of this server, after the whitelist.")
    tls: TLSConfig | None = key(
        None, spec=Nullable(Nested(Table("tls", TLSConfig, ()))),
        doc="The server's certificate and TLS settings, for its listeners with `\"tls\": "
            "true`. `expserver check` loads them and shows the certificate's names and expiry.")
    https_redirect: bool = key(
        False, spec=Boolean(),
        doc="Answer every request that came over a plain listener with a redirect to the "
            "same host and target over https (301; 308 for methods other than GET and HEAD), "
            "on the server's first TLS listener's port.")


@dataclass(frozen=True)
class Config(ConnectionLimits, RequestLimits, Logging):
    servers: tuple[ServerConfig, ...] = key(
        spec=Array(Nested(Table("server", ServerConfig, ())), min_items=1), ours=False,
        doc="The virtual servers. Each has its own listeners, host names and routes; a request "
            "goes to the first server with a matching listener whose hostnames are empty or "
            "contain the request's host.")
    server_name: str = key(
        "eXpServer", spec=checks.HEADER_VALUE, ours=False,
        doc="Name of this server instance (eXpServer shows it in its dashboard). Responses "
            "always carry `Server: eXpServer`.")
    workers: int = key(1, spec=Workers(), ours=False,
                       doc='Number of worker processes, or "auto" for one per CPU.')
    max_connections: int = key(
        10000, spec=Integer(1, INT32_MAX),
        doc="Most client connections one worker holds at once; at the limit it stops "
            "accepting until one closes (nginx's worker_connections).")
    drain_timeout: float = key(
        30.0, spec=Seconds(),
        doc="Seconds a graceful shutdown (QUIT) or an old worker after a reload (HUP) lets "
            "in-flight requests finish before the connections left are closed (nginx's "
            "worker_shutdown_timeout).")
    error_log: ErrorLogConfig = key(
        ErrorLogConfig(), spec=Nested(Table("error_log", ErrorLogConfig, ())),
        default_doc="stderr, warn",
        doc="Where the server says what went wrong: upstream failures (which peer, why), "
            "timeouts, worker deaths, reloads, refused configs; never a bare traceback.")
    pid_file: str | None = key(
        None, spec=checks.PLAIN_PATH,
        default_doc="a file in the temp directory named after the config",
        doc="The master's process id, for `expserver reload|stop|quit|reopen -c FILE` and "
            "service managers; removed at exit.")
    user: str | None = key(
        None, spec=checks.NAME,
        doc="Run the workers as this user (the master binds the ports, ports under 1024 "
            "too, and opens the logs as root first). Without it a server started as root "
            "keeps root and says so, unless --allow-root.")
    group: str | None = key(None, spec=checks.NAME,
                            doc="The workers' group; default: the user's own group.")
    source: str | None = None  # not a key: set by load()


# --- cross-field checks -------------------------------------------------------------------------


def _make_upstream(values: dict[str, Any]) -> UpstreamConfig:
    tls, host, port = split_upstream(values.pop("address"))  # checked by checks.upstream
    return UpstreamConfig(host, port, tls=tls, **values)


def _finish_tls(values: dict[str, Any], path: str) -> None:
    """The certificate and key load, match and decrypt: checked here, so that `check`
    refuses what `serve` could not start with."""
    from ..tls import server_context
    try:
        server_context(TLSConfig(**values))
    except ConfigError as e:
        raise ConfigError(_join(path, e.path.removeprefix("tls").lstrip(".")) if
                          e.path != "tls" else path, e.reason) from None


def _finish_root(values: dict[str, Any], path: str) -> None:
    """Listeners shared by servers agree on TLS, and a TLS listener's servers have
    certificates; https_redirect needs a TLS listener to point at."""
    flags: dict[tuple[str, int], tuple[bool, str]] = {}
    for i, server in enumerate(values["servers"]):
        for j, lc in enumerate(server.listeners):
            where = f"servers[{i}].listeners[{j}]"
            seen = flags.setdefault((lc.host, lc.port), (lc.tls, where))
            if seen[0] != lc.tls:
                raise ConfigError(f"{where}.tls", f"{lc.host}:{lc.port} is a "
                                  f"{'TLS' if seen[0] else 'plain'} listener in {seen[1]}")
            if lc.tls and server.tls is None:
                raise ConfigError(f"servers[{i}]", f"tls is required: {where} is a TLS "
                                                   "listener")
        if server.https_redirect and not any(lc.tls for lc in server.listeners):
            raise ConfigError(f"servers[{i}].https_redirect",
                              "the server has no TLS listener to redirect to")


def _finish_route(values: dict[str, Any], path: str) -> None:
    kind = values["type"]
    for name in REQUIRED_BY_TYPE.get(kind, ()):
        if name not in values:
            raise ConfigError(path, f"{name} is required for a {kind} route")
    if kind == "reverse_proxy" and not values["upstreams"]:
        raise ConfigError(_join(path, "upstreams"), "must not be empty for a reverse_proxy route")
    if kind == "reverse_proxy" and all(u.backup for u in values["upstreams"]):
        # Backups stand in for primaries that are down; with no primary nothing is backed up.
        reason = "at least one upstream must not be a backup"
        raise ConfigError(_join(path, "upstreams"), reason)
    for field in ROUTE.fields:
        if field.only and kind not in field.only and field.name in values:
            where = " or ".join(f"a {k}" for k in field.only)
            raise ConfigError(_join(path, field.name), f"only applies to {where} route")
    if kind == "file_serve":
        directory = values["dir_path"]
        if not os.path.exists(directory):
            reason = f"directory {_show(directory)} does not exist"
            raise ConfigError(_join(path, "dir_path"), reason)
        if not os.path.isdir(directory):
            raise ConfigError(_join(path, "dir_path"), f"{_show(directory)} is not a directory")
    if kind == "file_serve" and values.get("fallback"):
        file = os.path.join(values["dir_path"], values["fallback"].lstrip("/"))
        if not os.path.isfile(file):
            raise ConfigError(_join(path, "fallback"), f"file {_show(file)} does not exist")


def _finish_server(values: dict[str, Any], path: str) -> None:
    # Two routes with one req_path: the second could never be chosen (nginx refuses this too).
    seen: dict[str, int] = {}
    routes = values.get("routes", ())
    for i, route in enumerate(routes):
        if route.req_path in seen:
            first = f"{path}.routes[{seen[route.req_path]}]"
            reason = f"{_show(route.req_path)} is already used by {first}"
            raise ConfigError(f"{path}.routes[{i}].req_path", reason)
        seen[route.req_path] = i
    pages = [(_join(path, "error_pages"), values.get("error_pages", ()))]
    pages += [(f"{path}.routes[{i}].error_pages", r.error_pages) for i, r in enumerate(routes)]
    for where, entries in pages:
        for status, page in entries:
            page_file(routes, page, _join(where, status))


MAX_ERROR_PAGE = 1 << 20


def page_file(routes: tuple[RouteConfig, ...], page: str, path: str) -> str:
    """The file an error page path names: under the file_serve route that serves it."""
    from ..routing import owner  # the rule requests follow (longest prefix)
    route = owner([(r.req_path, r) for r in routes], page)
    if route is None or route.type != "file_serve" or route.dir_path is None:
        raise ConfigError(path, f"{_show(page)} is not served by a file_serve route of this "
                                "server")
    rest = page[len(route.req_path.rstrip("/")):].lstrip("/")
    file = os.path.join(route.dir_path, rest)
    if not os.path.isfile(file):
        raise ConfigError(path, f"{_show(page)}: file {_show(file)} does not exist")
    if os.path.getsize(file) > MAX_ERROR_PAGE:
        raise ConfigError(path, f"{_show(page)}: file {_show(file)} is larger than 1 MiB")
    return file


# --- the tables, derived from the declarations above --------------------------------------------

LISTENER = Table.of("listener", ListenerConfig, "One address and port to accept connections on.")
UPSTREAM = Table.of(
    "upstream", UpstreamConfig,
    'One upstream server with nginx\'s server parameters; the string "host:port" is the same as '
    '{"address": "host:port"}.',
    extra=(Field("address", checks.UPSTREAM_ADDRESS, ours=False,
                 doc='The upstream server as "host:port" (IPv6 as "[::1]:8080").'),),
    make=_make_upstream)
HEALTH_CHECK = Table.of("health_check", HealthCheckConfig,
                        "An active health check of every upstream of a reverse_proxy route.")
ROUTE = Table.of("route", RouteConfig, "What to do with requests under one path prefix.",
                 finish=_finish_route)
SERVER = Table.of("server", ServerConfig,
                  "A virtual server: where it listens, which hosts it answers, and its routes.",
                  finish=_finish_server)
ACCESS_LOG = Table.of("access_log", AccessLogConfig, "An access log: where and in what format.")
ERROR_LOG = Table.of("error_log", ErrorLogConfig, "The error log: where and how much.")
TLS = Table.of("tls", TLSConfig, "A server's certificate and TLS settings.",
                finish=_finish_tls)
UPSTREAM_TLS = Table.of("upstream_tls", UpstreamTLSConfig,
                        "How a reverse_proxy route reaches its https:// upstreams.")
ROOT = Table.of(
    "", Config,
    "Configuration of expserver: eXpServer's JSON config format, whose keys keep their "
    'eXpServer meaning, plus keys of our own (marked "Not an eXpServer key"). The same '
    "document may be written as TOML.", finish=_finish_root)

def _finish_basic_auth(values: dict[str, Any], path: str) -> None:
    from ..auth import read_users  # the rule the server uses to read the file
    try:
        read_users(values["users_file"])
    except ValueError as e:
        raise ConfigError(_join(path, "users_file"), str(e)) from None


def _finish_cors(values: dict[str, Any], path: str) -> None:
    if values.get("allow_credentials") and "*" in values["allow_origins"]:
        raise ConfigError(_join(path, "allow_credentials"),
                          'credentials cannot be allowed to "*": name the origins')
    if "*" in values["allow_origins"] and len(values["allow_origins"]) > 1:
        raise ConfigError(_join(path, "allow_origins"), '"*" must be alone')


CORS = Table.of("cors", CorsConfig, "Which other origins may call this server from a browser.",
                finish=_finish_cors)
BASIC_AUTH = Table.of("basic_auth", BasicAuthConfig, "HTTP Basic authentication.",
                      finish=_finish_basic_auth)
RATE_LIMIT = Table.of("rate_limit", RateLimitConfig, "A request rate limit (leaky bucket).")
HEADERS = Table.of("headers", HeadersConfig,
                   "Rules that set, add and remove fields of responses.")

TABLES: tuple[Table[Any], ...] = (ROOT, SERVER, LISTENER, TLS, ROUTE, UPSTREAM, UPSTREAM_TLS,
                                  HEALTH_CHECK, HEADERS, ACCESS_LOG, ERROR_LOG, CORS, BASIC_AUTH,
                                  RATE_LIMIT)
ALL_TABLES.extend(TABLES)
# The tables the Nested specs above were declared with (before these existed) are stand-ins
# holding the name and class; point them at the real ones.
for _table in TABLES:
    for _field in _table.fields:
        _spec = _field.spec.inner if isinstance(_field.spec, Nullable) else _field.spec
        _spec = _spec.item if isinstance(_spec, Array) else _spec
        if isinstance(_spec, Nested):
            _spec.table = next(t for t in TABLES if t.cls is _spec.table.cls)

# Route keys that only mean something to a proxy: on another route type they are a mistake
# (most likely a wrong "type"), so they are refused rather than silently ignored.
PROXY_KEYS = tuple(f.name for f in ROUTE.fields if f.only == PROXY)
