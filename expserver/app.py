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
from .pages import page
from .policy import Answer, Check, ResponsePolicy, acl_check, body_limit_check, response_policy
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
    """A route's handler behind its policies."""

    __slots__ = ("handler", "kind", "checks", "policy")

    def __init__(self, handler: routing.Handler, kind: str, checks: list[Check],
                 policy: ResponsePolicy | None) -> None:
        self.handler = handler
        self.kind = kind
        self.checks = checks
        self.policy = policy

    @property
    def plain(self) -> bool:
        return not self.checks and self.policy is None

    def serve(self, req: Any) -> Answer:
        if self.policy is not None:
            req.policy = self.policy    # the checks' answers get the policy too
        for check in self.checks:
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


class Parts:
    """What every route of a worker may need: the loop, its core, its metrics handler."""

    def __init__(self, loop: Any, core: Any, figures: metrics.Metrics) -> None:
        self.loop = loop
        self.core = core
        self.figures = figures


def handler_of(route: config.RouteConfig, parts: Parts) -> Any:
    if route.type == "file_serve":
        return static.FileServe(route).serve
    if route.type == "redirect":
        return Redirect(route)
    if route.type == "reverse_proxy":
        return proxy.make_route(route, parts.loop)
    if route.type == "health":
        return Health(parts.core)
    return parts.figures


def build_route(route: config.RouteConfig, server: config.ServerConfig, parts: Parts) -> Route:
    checks: list[Check] = []
    rules = [rule for rule in (acl.Acl(server.ip_whitelist, server.ip_blacklist),
                               acl.Acl(route.ip_whitelist, route.ip_blacklist))
             if not rule.empty]
    if rules:
        checks.append(acl_check(rules, error))
    # a reverse_proxy route enforces its own limit while it streams the body
    if route.type != "reverse_proxy" and route.max_body_size:
        checks.append(body_limit_check(route.max_body_size, error))
    return Route(handler_of(route, parts), route.type, checks, response_policy(server, route))


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

    def __init__(self, server: config.ServerConfig, parts: Parts, access_log: Any) -> None:
        self.hostnames = server.hostnames
        self.policy = response_policy(server, None)
        self.to_https = ToHTTPS(server) if server.https_redirect else None
        self.access_log = access_log        # an AccessLog, or False: none
        entries: list[tuple[str, tuple[Any, str]]] = []
        for r in server.routes:
            route = build_route(r, server, parts)
            entries.append((r.req_path, (route.handler if route.plain else route.serve,
                                         route.kind)))
        # eXpServer's dashboard polls a server without routes at /api
        self.table = routing.RouteTable(entries or [("/api", (parts.figures, "metrics"))])


def build_sites(cfg: config.Config, loop: Any, core: Any, worker: metrics.WorkerMetrics,
                access_logs: list[Any] | None = None) -> list[Site]:
    """Every server of the config, once per worker (``access_logs``: each server's
    AccessLog, or False)."""
    parts = Parts(loop, core, metrics.Metrics(worker, cfg.server_name))
    logs = access_logs or [False] * len(cfg.servers)
    return [Site(server, parts, log) for server, log in zip(cfg.servers, logs)]


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
        handler, kind = entry
        self.by_kind[kind] += 1
        return handler(req)
