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

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from . import acl, mime
from .config import HeadersConfig, RouteConfig, ServerConfig
from .config.model import page_file

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
    """What a route does to every response head: error pages, then header rules, then
    HSTS on responses that go over TLS."""

    __slots__ = ("pages", "rules", "hsts")

    def __init__(self, pages: ErrorPages | None, rules: HeaderRules | None,
                 hsts: bytes = b"") -> None:
        self.pages = pages
        self.rules = rules
        self.hsts = hsts

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


def response_policy(server: ServerConfig, route: RouteConfig | None) -> ResponsePolicy | None:
    """The merged response policy of a route (or of the server alone: its 404s), or None."""
    layers: list[ServerConfig | RouteConfig] = [server] if route is None else [server, route]
    entries = [e for layer in layers for e in layer.error_pages]
    headers = [layer.headers for layer in layers if layer.headers is not None]
    pages = ErrorPages(_merged(entries), server) if entries else None
    rules = HeaderRules(headers) if headers else None
    hsts = hsts_line(server)
    return ResponsePolicy(pages, rules, hsts) if pages or rules or hsts else None


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


def body_limit_check(limit: int, refuse: Callable[[int], Answer]) -> Check:
    def check(req: Any) -> Answer | None:
        if req.content_length > limit:
            return refuse(413)
        req.body_limit = limit          # a chunked body is cut there
        return None
    return check
