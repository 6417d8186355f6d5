"""Sites and the request handler of a listener: virtual host, route, policies, handler.

A :class:`Site` is one server of the config, built once per worker: its routes' handlers,
balancers, upstream pools, health probes and caches exist once, whatever the number of
listeners (plain and TLS) it answers on. An :class:`App` is what one listener calls, once
per request (see ext/expserver/_conn.pyx): it picks the site by Host among the listener's
sites, then the route, then runs the route's policies and its handler (expserver/policy.py).
"""
from __future__ import annotations

from typing import Any

from . import acl, config, metrics, proxy, routing, static
from .auth import BasicAuth
from .pages import page
from .policy import (
    Answer,
    Check,
    Cors,
    Delayed,
    LimitConn,
    RateLimit,
    ResponsePolicy,
    acl_check,
    request_id_check,
    response_policy,
)
from .redirect import Redirect

# Methods we know (RFC 9110 + PATCH): anything else is 501, as nginx does.
KNOWN_METHODS = frozenset(
    [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"]
)
_HTML = b"Content-Type: text/html\r\n"


def error(status: int) -> tuple[int, bytes, bytes]:
    """The built-in error answer (a route's error pages replace it on the way out)."""
    return status, _HTML, page(status)


class Route:
    """A route's handler behind its policies: the checks (ACL...), the rate limit, which
    may make the request wait, the checks after it (limit_conn, CORS preflight, password,
    body size), then the handler; the response policy on whatever answers."""

    __slots__ = ("handler", "kind", "checks", "rate", "after", "policy", "loop")

    def __init__(self, handler: routing.Handler, kind: str, checks: list[Check],
                 policy: ResponsePolicy | None, rate: RateLimit | None = None,
                 after: list[Check] | None = None, loop: Any = None) -> None:
        self.handler = handler
        self.kind = kind
        self.checks = checks
        self.rate = rate
        self.after = after or []
        self.policy = policy
        self.loop = loop

    @property
    def plain(self) -> bool:
        return not self.checks and not self.after and self.rate is None and self.policy is None

    def serve(self, req: Any) -> Any:
        if self.policy is not None:
            req.policy = self.policy    # the checks' answers get the policy too
        for check in self.checks:
            answer = check(req)
            if answer is not None:
                return answer
        if self.rate is not None:
            answer, delay = self.rate.decide(req)
            if answer is not None:
                return answer
            if delay:
                return Delayed(self.loop, delay, self.proceed)
        return self.proceed(req)

    def proceed(self, req: Any) -> Any:
        for check in self.after:
            answer = check(req)
            if answer is not None:
                return answer
        return self.handler(req)


_PLAIN = b"Content-Type: text/plain\r\nCache-Control: no-store\r\n"


class Health:
    """A ``health`` route: 200 while serving, 503 once the worker drains (a stop or a
    reload began), so a load balancer stops sending before the connections go."""

    __slots__ = ("core",)

    def __init__(self, core: Any) -> None:
        self.core = core

    def __call__(self, req: Any) -> Answer:
        if self.core.draining:
            return 503, _PLAIN, b"draining\n"
        return 200, _PLAIN, b"ok\n"


class Respond:
    """A ``respond`` route: a fixed status and body (a maintenance page, a ping)."""

    __slots__ = ("answer",)

    def __init__(self, route: config.RouteConfig) -> None:
        ctype = route.content_type.encode("ascii")
        self.answer = (route.status or 200, b"Content-Type: " + ctype + b"\r\n",
                       route.body.encode("utf-8"))

    def __call__(self, req: Any) -> Answer:
        return self.answer


class Parts:
    """What every route of a worker may need: the loop, its core, its metrics handler, and
    the shared zones of the limits (made by the master: see ``zones``)."""

    def __init__(self, loop: Any, core: Any, figures: metrics.Metrics,
                 zones: dict[ZoneKey, Any]) -> None:
        self.loop = loop
        self.core = core
        self.figures = figures
        self.zones = zones


# (server index, route index or None for the server's own, "rate" or "conn")
ZoneKey = tuple[int, int | None, str]
CONN_KEYS = 10000       # client addresses a limit_conn zone tracks at once


def zones(cfg: config.Config) -> dict[ZoneKey, Any]:
    """The shared zones of every rate_limit and limit_conn. Made before forking, so that
    all workers count together."""
    from ._zone import Zone
    out: dict[ZoneKey, Any] = {}
    for i, server in enumerate(cfg.servers):
        layers: list[tuple[int | None, Any]] = [(None, server), *enumerate(server.routes)]
        for j, layer in layers:
            if layer.rate_limit is not None:
                out[(i, j, "rate")] = Zone(layer.rate_limit.size)
            if layer.limit_conn is not None:
                out[(i, j, "conn")] = Zone(CONN_KEYS)
    return out


def _layer(route: config.RouteConfig, name: str, where: tuple[int, int], kind: str) -> ZoneKey:
    """The zone a route's limit counts in: its own, or its server's (shared by its routes)."""
    return (where[0], where[1] if getattr(route, name) is not None else None, kind)


def handler_of(route: config.RouteConfig, parts: Parts) -> Any:
    if route.type == "file_serve":
        return static.FileServe(route).serve
    if route.type == "redirect":
        return Redirect(route)
    if route.type == "reverse_proxy":
        return proxy.make_route(route, parts.loop)
    if route.type == "health":
        return Health(parts.core)
    if route.type == "respond":
        return Respond(route)
    return parts.figures


def build_route(route: config.RouteConfig, server: config.ServerConfig, parts: Parts,
                where: tuple[int, int]) -> Route:
    handler = handler_of(route, parts)
    checks: list[Check] = []
    if route.request_id:
        checks.append(request_id_check())
    rules = [rule for rule in (acl.Acl(server.ip_whitelist, server.ip_blacklist),
                               acl.Acl(route.ip_whitelist, route.ip_blacklist))
             if not rule.empty]
    if rules:
        checks.append(acl_check(rules, error))
    # each policy: the route's own, else its server's
    limits = route.rate_limit or server.rate_limit
    rate = None
    if limits is not None:
        zone = parts.zones[_layer(route, "rate_limit", where, "rate")]
        rate = RateLimit(limits, zone, parts.loop, error)
    after: list[Check] = []
    conn_limit = route.limit_conn or server.limit_conn
    if conn_limit:
        zone = parts.zones[_layer(route, "limit_conn", where, "conn")]
        after.append(LimitConn(conn_limit, zone, parts.loop, error))
    cors_cfg = route.cors or server.cors
    cors = Cors(cors_cfg) if cors_cfg else None
    if cors is not None:
        after.append(cors.check)
    auth = route.basic_auth or server.basic_auth
    if auth is not None:
        after.append(BasicAuth(auth.users_file, auth.realm, error))
        if route.type == "reverse_proxy" and not auth.forward_authorization:
            handler.hide = frozenset([b"authorization"])   # the password stays here
    return Route(handler, route.type, checks, response_policy(server, route, cors), rate,
                 after, parts.loop)


def body_limit(route: config.RouteConfig) -> int:
    """The limit App enforces (0: none); a reverse_proxy route enforces its own while it
    streams the body."""
    return 0 if route.type == "reverse_proxy" else route.max_body_size


class ToHTTPS:
    """``https_redirect``: the same host and target, over https on the server's first TLS
    listener's port (301, or 308 where a method other than GET/HEAD must be kept)."""

    __slots__ = ("port", "fallback")

    def __init__(self, server: config.ServerConfig) -> None:
        port = next(lc.port for lc in server.listeners if lc.tls)
        self.port = b"" if port == 443 else b":%d" % port
        names = [h for h in server.hostnames if not h.startswith("*.")]
        self.fallback = (names[0] if names else "localhost").encode("ascii")

    def __call__(self, req: Any) -> Answer:
        target = req.target if req.target[:1] == b"/" else req.path + (
            b"?" + req.query if req.query else b"")
        location = b"https://" + (req.host or self.fallback) + self.port + target
        status = 301 if req.method in (b"GET", b"HEAD") else 308
        return status, b"Location: " + location + b"\r\n" + _HTML, page(status)


class Site:
    """One server: its route table (entries: (callable, route kind)), its own policy, which
    answers requests no route takes, and its redirect of plain requests to https."""

    __slots__ = ("hostnames", "table", "policy", "to_https", "access_log")

    def __init__(self, server: config.ServerConfig, parts: Parts, access_log: Any,
                 index: int = 0) -> None:
        self.hostnames = server.hostnames
        self.policy = response_policy(server, None)
        self.to_https = ToHTTPS(server) if server.https_redirect else None
        self.access_log = access_log        # an AccessLog, or False: none
        entries: list[tuple[str, tuple[Any, str, int]]] = []
        for j, r in enumerate(server.routes):
            route = build_route(r, server, parts, (index, j))
            entries.append((r.req_path, (route.handler if route.plain else route.serve,
                                         route.kind, body_limit(r))))
        # eXpServer's dashboard polls a server without routes at /api
        self.table = routing.RouteTable(entries or [("/api", (parts.figures, "metrics", 0))])


def build_sites(cfg: config.Config, loop: Any, core: Any, worker: metrics.WorkerMetrics,
                access_logs: list[Any] | None = None,
                shared: dict[ZoneKey, Any] | None = None) -> list[Site]:
    """Every server of the config, once per worker (``access_logs``: each server's
    AccessLog, or False; ``shared``: the zones the master made, see ``zones``)."""
    parts = Parts(loop, core, metrics.Metrics(worker, cfg.server_name),
                  zones(cfg) if shared is None else shared)
    logs = access_logs or [False] * len(cfg.servers)
    return [Site(server, parts, log, i) for i, (server, log) in enumerate(zip(cfg.servers, logs))]


class App:
    """Answers every request arriving on one listener, from the sites it serves."""

    def __init__(self, sites: list[Site], worker: metrics.WorkerMetrics) -> None:
        self.by_kind = worker.by_kind
        self.hosts = routing.VirtualHosts([(site.hostnames, site) for site in sites])
        self.only = self.hosts.only   # one site that takes any host: no selection to make
        # the listener logs with its first site's access log; others say theirs per request
        self.default_log = sites[0].access_log if sites else False
        self.mixed = any(site.access_log is not self.default_log for site in sites)

    def handle(self, req: Any) -> Answer:
        """The answer to one request (the listener calls this bound method: a cheaper call
        than an instance's ``__call__``)."""
        if req.method not in KNOWN_METHODS:
            return error(501)
        site = self.only if self.only is not None else self.hosts.select(req.host)
        if site is None:
            return error(404)
        if self.mixed:
            req.access_log = site.access_log
        if site.to_https is not None and not req.secure:
            return site.to_https(req)
        entry = site.table.match(req.path)
        if entry is None:
            if site.policy is not None:
                req.policy = site.policy
            return error(404)
        handler, kind, limit = entry
        self.by_kind[kind] += 1
        if limit and (req.content_length > 0 or req.chunked):
            if req.content_length > limit:
                if site.policy is not None:
                    req.policy = site.policy
                return error(413)
            req.body_limit = limit      # a chunked body is cut there
        return handler(req)
