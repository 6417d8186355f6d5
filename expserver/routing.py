"""Which server and which route answer a request (eXpServer's selection rules).

Server: the first server on the listener whose ``hostnames`` is empty or holds the
request's host (port ignored). No such server: 404.
Route: the longest ``req_path`` that is a prefix of the path on ``/`` boundaries
(``/api`` matches ``/api`` and ``/api/x``, not ``/api2``). No route: 404.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

Handler = Callable[[Any], tuple[int, bytes, object]]


_ENCODED_SLASH = re.compile(rb"%2[fF]")
_SLASHES = re.compile(rb"//+")


def match_path(raw: bytes) -> bytes:
    """The path routes are matched against: percent-decoded once, ``//`` collapsed.

    Matching the raw path would let ``/%70rivate`` miss a ``/private`` route (and its ACL)
    and land in ``/``. An encoded slash stays encoded: it must not create a boundary. Bad
    encodings are left as they are; the route's handler refuses them.
    """
    # (``37 in raw`` and ``find``: ``b"%" in raw`` costs a caught TypeError inside CPython)
    if 37 in raw:  # "%"
        raw = b"%2F".join(unquote_to_bytes(part) for part in _ENCODED_SLASH.split(raw))
    if raw.find(b"//") >= 0:
        raw = _SLASHES.sub(b"/", raw)
    return raw


def owner(entries: Sequence[tuple[str, Any]], path: str) -> Any:
    """The value of the entry whose ``req_path`` is the longest prefix of ``path`` on "/"
    boundaries (the rule of requests), or None: for config checks, off the hot path."""
    return RouteTable(entries).match(path.encode("utf-8"))


class RouteTable:
    """Routes of one server, longest prefix first."""

    __slots__ = ("_entries", "_root_only")

    def __init__(self, entries: Sequence[tuple[str, Handler]]) -> None:
        # (prefix bytes without trailing "/", handler); "/" becomes b"" and matches all
        table = [(path.rstrip("/").encode("utf-8"), handler) for path, handler in entries]
        table.sort(key=lambda e: len(e[0]), reverse=True)
        self._entries = tuple(table)
        # a server whose only route is "/" answers every path with it: nothing to decode
        self._root_only = table[0][1] if len(table) == 1 and not table[0][0] else None

    def match(self, raw_path: bytes) -> Handler | None:
        """The route of a request's path as it came (see match_path), or None."""
        if self._root_only is not None and raw_path[:1] == b"/":
            return self._root_only
        path = match_path(raw_path)
        for prefix, handler in self._entries:
            n = len(prefix)
            if path.startswith(prefix) and (len(path) == n or path[n] == 47):  # "/"
                return handler
        return None


def host_key(name: str) -> bytes:
    """A configured host name as requests spell it: lower case, IDNA (punycode)."""
    return name.lower().encode("idna")


class VirtualHosts:
    """Servers sharing one listener, selected by Host: exact names, and ``*.example.test``
    wildcards that take any name ending in ``.example.test`` (nginx's server_name)."""

    __slots__ = ("_servers", "only")

    def __init__(self, servers: Sequence[tuple[tuple[str, ...], Any]]) -> None:
        self._servers = tuple(
            (frozenset(host_key(h) for h in names if not h.startswith("*.")),
             tuple(host_key(h)[1:] for h in names if h.startswith("*.")),
             bool(names), server)
            for names, server in servers
        )
        # a lone server without hostnames takes every request
        self.only = self._servers[0][3] if len(self._servers) == 1 and not self._servers[0][2] \
            else None

    def select(self, host: bytes) -> Any:
        if self.only is not None:
            return self.only
        if host.endswith(b"."):
            host = host[:-1]  # "example.com." is the same name, fully qualified
        for names, suffixes, named, server in self._servers:
            if not named or host in names or (suffixes and host.endswith(suffixes)):
                return server
        return None
