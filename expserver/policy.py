"""Route policies: the checks that run before a handler and the edits made to its answer.

Theory of operation
-------------------
Every route of every type is one :class:`Route` (built once per worker, see expserver/app.py)
holding its handler and two optional parts:

* ``checks``: callables ``check(req) -> answer | None`` run in order before the handler (ACL,
  body limit, ...). The first one that answers ends the request there.
* ``policy``: a :class:`ResponsePolicy` the connection applies to every response head of the
  route, whoever made it: ``answer(req, status, headers, body)`` for answers given by the
  handler or by the connection itself (its 413, the proxy's 502/504: error pages apply), and
  ``head(req, status, block)`` for heads relayed from an upstream (only header rules).

A route with neither is *plain*: the listener calls its handler directly, so the cost of a
policy is paid only where one is configured. Policies are merged down at build time (server,
then route), so nothing walks up at request time.

Header blocks are ``Name: value\\r\\n`` lines (names as received: any case). Edits work on
the bytes, one pass, and only when a rule names a field the block may hold.
"""
from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import acl, mime
from ._conn import Later
from .config import HeadersConfig, RouteConfig, ServerConfig
from .config.checks import rate_milli
from .config.model import CorsConfig, RateLimitConfig, page_file

Answer = tuple[int, bytes, object]
Check = Callable[[Any], Answer | None]

_HTML = b"Content-Type: text/html\r\n"
# What an error page replaces in the answer it stands in for: its representation fields.
_REPRESENTATION = frozenset([b"content-type", b"content-encoding", b"content-language",
                             b"etag", b"last-modified", b"accept-ranges", b"content-range",
                             b"vary"])


def without(block: bytes, names: frozenset[bytes]) -> bytes:
    """``block`` without the lines whose field name (lower-cased) is in ``names``."""
    low = b"\n" + block.lower()
    if not any(b"\n" + n + b":" in low for n in names):
        return block
    lines = block.split(b"\r\n")
    return b"\r\n".join(line for line in lines
                        if line.partition(b":")[0].lower() not in names)


class HeaderRules:
    """``set``, ``add`` and ``remove`` of a headers object, merged server then route."""

    __slots__ = ("drop", "extra")

    def __init__(self, configs: Iterable[HeadersConfig]) -> None:
        values: dict[str, tuple[str, list[str]]] = {}     # lower name -> (name, values)
        added: list[tuple[str, str]] = []
        for cfg in configs:
            for name in cfg.remove:
                values[name.lower()] = (name, [])
                added = [(n, v) for n, v in added if n.lower() != name.lower()]
            for name, value in cfg.set:
                values[name.lower()] = (name, [value])
                added = [(n, v) for n, v in added if n.lower() != name.lower()]
            for name, more in cfg.add:
                added += [(name, v) for v in more]
        self.drop = frozenset(n.encode("ascii") for n in values)
        lines = [(n, v) for n, vs in values.values() for v in vs] + added
        self.extra = "".join(f"{n}: {v}\r\n" for n, v in lines).encode("ascii")

    def apply(self, block: bytes) -> bytes:
        if self.drop:
            block = without(block, self.drop)
        return block + self.extra if self.extra else block


class ErrorPages:
    """Status -> (Content-Type line, page bytes), read from the server's files."""

    __slots__ = ("pages",)

    def __init__(self, entries: Sequence[tuple[str, str]], server: ServerConfig) -> None:
        self.pages: dict[int, tuple[bytes, bytes]] = {}
        for status, page in entries:     # classes first, so a single status wins over them
            if status.endswith("xx"):
                self._add(range(int(status[0]) * 100, int(status[0]) * 100 + 100), page, server)
        for status, page in entries:
            if not status.endswith("xx"):
                self._add([int(status)], page, server)

    def _add(self, statuses: Iterable[int], page: str, server: ServerConfig) -> None:
        file = page_file(server.routes, page, "error_pages")
        with open(file, "rb") as f:
            body = f.read()
        ctype = b"Content-Type: " + mime.guess(os.path.basename(file)).encode("ascii") + b"\r\n"
        for status in statuses:
            self.pages[status] = (ctype, body)

    def get(self, status: int) -> tuple[bytes, bytes] | None:
        return self.pages.get(status)


class ResponsePolicy:
    """What a route does to every response head: error pages, then header rules, CORS, and
    HSTS on responses that go over TLS."""

    __slots__ = ("pages", "rules", "hsts", "cors")

    def __init__(self, pages: ErrorPages | None, rules: HeaderRules | None,
                 hsts: bytes = b"", cors: Cors | None = None) -> None:
        self.pages = pages
        self.rules = rules
        self.hsts = hsts
        self.cors = cors

    def answer(self, req: Any, status: int, headers: bytes, body: object) -> Answer:
        if status >= 400 and self.pages is not None:
            page = self.pages.get(status)
            if page is not None:
                headers = without(headers, _REPRESENTATION) + page[0]
                body = page[1]
        return status, self.head(req, status, headers), body

    def head(self, req: Any, status: int, block: bytes) -> bytes:
        if self.rules is not None:
            block = self.rules.apply(block)
        if self.cors is not None:
            block = self.cors.apply(req, block)
        if self.hsts and req.secure:
            block = without(block, _HSTS) + self.hsts
        return block


_HSTS = frozenset([b"strict-transport-security"])


def hsts_line(server: ServerConfig) -> bytes:
    tls = server.tls
    if tls is None or not tls.hsts:
        return b""
    value = f"max-age={tls.hsts}" + ("; includeSubDomains" if tls.hsts_subdomains else "")
    return f"Strict-Transport-Security: {value}\r\n".encode("ascii")


def response_policy(server: ServerConfig, route: RouteConfig | None,
                    cors: Cors | None = None) -> ResponsePolicy | None:
    """The merged response policy of a route (or of the server alone: its 404s), or None."""
    layers: list[ServerConfig | RouteConfig] = [server] if route is None else [server, route]
    entries = [e for layer in layers for e in layer.error_pages]
    headers = [layer.headers for layer in layers if layer.headers is not None]
    pages = ErrorPages(_merged(entries), server) if entries else None
    rules = HeaderRules(headers) if headers else None
    hsts = hsts_line(server)
    if pages or rules or hsts or cors:
        return ResponsePolicy(pages, rules, hsts, cors)
    return None


def _merged(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Later entries (the route's) win over earlier ones (the server's) for a status."""
    return list(dict(entries).items())


# --- checks before the handler -------------------------------------------------------------------


def acl_check(rules: list[acl.Acl], refuse: Callable[[int], Answer]) -> Check:
    def check(req: Any) -> Answer | None:
        for rule in rules:
            if not rule.allows(req.peer):
                return refuse(403)
        return None
    return check


_REQUEST_ID = re.compile(rb"[A-Za-z0-9\-_.:;=]{1,200}")


def request_id_check() -> Check:
    """``request_id``: the client's X-Request-ID when it is a sane token, else a new one
    (unique: this worker's random prefix and a counter; no system call per request)."""
    prefix = os.urandom(6).hex().encode("ascii")
    counter = itertools.count(1)

    def check(req: Any) -> Answer | None:
        given = req.get(b"x-request-id")
        if given is not None and _REQUEST_ID.fullmatch(given):
            req.request_id = given
        else:
            req.request_id = b"%s%010x" % (prefix, next(counter))
        return None
    return check




# --- CORS ----------------------------------------------------------------------------------------

_CORS_FIELDS = frozenset([b"access-control-allow-origin", b"access-control-allow-credentials",
                          b"access-control-expose-headers"])
_VARY_ORIGIN = b"Vary: Origin\r\n"


class Cors:
    """The CORS part of a route: its preflight check, and the fields of its answers."""

    def __init__(self, cfg: CorsConfig) -> None:
        self.any = cfg.allow_origins == ("*",)
        self.origins = frozenset(o.encode("ascii") for o in cfg.allow_origins)
        self.credentials = cfg.allow_credentials
        methods = ", ".join(cfg.allow_methods).encode("ascii")
        self.preflight_fields = (b"Access-Control-Allow-Methods: " + methods + b"\r\n"
                                 + (b"Access-Control-Max-Age: %d\r\n" % cfg.max_age
                                    if cfg.max_age else b""))
        self.any_header = "*" in cfg.allow_headers
        self.allow_headers = ", ".join(cfg.allow_headers).encode("ascii")
        self.expose = (b"Access-Control-Expose-Headers: " +
                       ", ".join(cfg.expose_headers).encode("ascii") + b"\r\n"
                       if cfg.expose_headers else b"")

    def allowed(self, origin: bytes | None) -> bool:
        return origin is not None and (self.any or origin.lower() in self.origins)

    def fields(self, origin: bytes) -> bytes:
        """The fields that let ``origin`` (allowed) read the answer."""
        if self.any and not self.credentials:
            return b"Access-Control-Allow-Origin: *\r\n" + self.expose
        out = b"Access-Control-Allow-Origin: " + origin + b"\r\n" + self.expose
        if self.credentials:
            out += b"Access-Control-Allow-Credentials: true\r\n"
        return out

    def check(self, req: Any) -> Answer | None:
        """A preflight is answered here (before any password is asked)."""
        if req.method != b"OPTIONS":
            return None
        wanted = req.get(b"access-control-request-method")
        origin = req.get(b"origin")
        if wanted is None or origin is None:
            return None
        if not self.allowed(origin):
            return 204, _VARY_ORIGIN if not self.any else b"", None
        headers = self.fields(origin) + self.preflight_fields
        asked = req.get(b"access-control-request-headers")
        if asked and (self.any_header or self.allow_headers):
            given = asked if self.any_header else self.allow_headers
            headers += b"Access-Control-Allow-Headers: " + given + b"\r\n"
        if not self.any or self.credentials:
            headers += b"Vary: Origin, Access-Control-Request-Headers\r\n"
        return 204, headers, None

    def apply(self, req: Any, block: bytes) -> bytes:
        origin = req.get(b"origin")
        vary = b"" if self.any and not self.credentials else _VARY_ORIGIN
        block = without(block, _CORS_FIELDS)    # this route's CORS is ours, not upstream's
        if not self.allowed(origin):
            return block + vary
        return block + self.fields(origin) + vary


# --- limits --------------------------------------------------------------------------------------


def _limit_key(spec: str) -> Callable[[Any], bytes | None]:
    if spec == "client_ip":
        return lambda req: req.peer.encode("ascii")
    name = spec.removeprefix("header:").lower().encode("ascii")
    return lambda req: req.get(name)


def _too_many(refuse: Callable[[int], Answer], ms: int) -> Answer:
    status, headers, body = refuse(429)
    return status, b"Retry-After: %d\r\n" % max(1, -(-ms // 1000)) + headers, body


class RateLimit:
    """``rate_limit``: nginx's limit_req, counted in a zone all workers share."""

    def __init__(self, cfg: RateLimitConfig, zone: Any, loop: Any,
                 refuse: Callable[[int], Answer]) -> None:
        self.zone = zone
        self.rate = rate_milli(cfg.rate)
        self.burst = cfg.burst
        self.nodelay = cfg.nodelay
        self.key = _limit_key(cfg.key)
        self.loop = loop
        self.refuse = refuse

    def decide(self, req: Any) -> tuple[Answer | None, float]:
        """(an answer that ends the request, or None; seconds it must wait first)."""
        key = self.key(req)
        if key is None:
            return None, 0.0
        ok, ms = self.zone.take(key, int(self.loop.time * 1000), self.rate, self.burst)
        if not ok:
            return _too_many(self.refuse, ms), 0.0
        if ms and not self.nodelay and not (req.chunked or req.content_length > 0):
            return None, ms / 1000
        return None, 0.0


class LimitConn:
    """``limit_conn``: requests in flight per client address, across the workers."""

    def __init__(self, limit: int, zone: Any, loop: Any, refuse: Callable[[int], Answer]):
        self.limit = limit
        self.zone = zone
        self.loop = loop
        self.refuse = refuse

    def __call__(self, req: Any) -> Answer | None:
        key = req.peer.encode("ascii")
        zone, loop = self.zone, self.loop
        if not zone.acquire(key, int(loop.time * 1000), self.limit):
            return _too_many(self.refuse, 1000)
        req.done = lambda: zone.release(key, int(loop.time * 1000))
        return None


class Delayed(Later):
    """A request the rate limit spaces out: the rest of its route runs after ``delay``."""

    def __init__(self, loop: Any, delay: float, rest: Callable[[Any], Any]) -> None:
        self.loop = loop
        self.delay = delay
        self.rest = rest
        self.timer: Any = None

    def started(self, req: Any) -> None:
        self.timer = self.loop.call_later(self.delay, self.go)

    def go(self) -> None:
        answer = self.rest(self.request)
        if isinstance(answer, tuple):
            self.respond(*answer)
        else:
            self.hand_over(answer)

    def aborted(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
