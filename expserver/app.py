"""The request handler of one listener: virtual host, ACL, route, then the route's handler.

This is the one Python call the connection makes per request (see ext/expserver/_conn.pyx).
"""
from __future__ import annotations

from typing import Any

from . import acl, config, metrics, proxy, routing, static
from .pages import page
from .redirect import Redirect

# Methods we know (RFC 9110 + PATCH): anything else is 501, as nginx does.
KNOWN_METHODS = frozenset(
    [b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH"]
)
_HTML = b"Content-Type: text/html\r\n"


def error(status: int) -> tuple[int, bytes, bytes]:
    return status, _HTML, page(status)


class Guarded:
    """A handler behind ACLs (the server's, then the route's): each must admit the client."""

    __slots__ = ("rules", "handler")

    def __init__(self, rules: list[acl.Acl], handler: routing.Handler) -> None:
        self.rules = rules
        self.handler = handler

    def __call__(self, req: Any) -> tuple[int, bytes, object]:
        for rule in self.rules:
            if not rule.allows(req.peer):
                return error(403)
        return self.handler(req)


def route_handler(route: config.RouteConfig, server: config.ServerConfig, loop: Any,
                  figures: metrics.Metrics) -> routing.Handler:
    handler: routing.Handler
    if route.type == "file_serve":
        handler = static.FileServe(route).serve
    elif route.type == "redirect":
        handler = Redirect(route)
    elif route.type == "reverse_proxy":
        handler = proxy.make_route(route, loop)
    else:
        handler = figures
    rules = [rule for rule in (acl.Acl(server.ip_whitelist, server.ip_blacklist),
                               acl.Acl(route.ip_whitelist, route.ip_blacklist))
             if not rule.empty]
    return Guarded(rules, handler) if rules else handler


class App:
    """Answers every request arriving on one listener."""

    def __init__(self, servers: list[config.ServerConfig], loop: Any,
                 worker: metrics.WorkerMetrics, server_name: str) -> None:
        figures = metrics.Metrics(worker, server_name)
        self.by_kind = worker.by_kind
        self.hosts = hosts = routing.VirtualHosts([
            (s.hostnames, routing.RouteTable(
                [(r.req_path, (route_handler(r, s, loop, figures), r.type, _body_limit(r)))
                 for r in s.routes]
                # eXpServer's dashboard polls a server without routes at /api
                or [("/api", (figures, "metrics", 0))]))
            for s in servers
        ])
        self.table = hosts.only   # one server that takes any host: no selection to make

    def handle(self, req: Any) -> tuple[int, bytes, object]:
        """The answer to one request (the listener calls this bound method: a cheaper call
        than an instance's ``__call__``)."""
        if req.method not in KNOWN_METHODS:
            return error(501)
        table = self.table if self.table is not None else self.hosts.select(req.host)
        if table is None:
            return error(404)
        entry = table.match(req.path)
        if entry is None:
            return error(404)
        handler, kind, limit = entry
        self.by_kind[kind] += 1
        if limit:
            if req.content_length > limit:
                return error(413)
            req.body_limit = limit      # a chunked body is cut there
        return handler(req)


def _body_limit(route: config.RouteConfig) -> int:
    """The limit App enforces; a reverse_proxy route enforces its own while streaming."""
    return 0 if route.type == "reverse_proxy" else route.max_body_size
