"""What a handler hands back to the connection: an answer now, or an answer later.

**Answer now**: a tuple ``(status, headers, body)``:

* ``status``  -- int status code.
* ``headers`` -- bytes: zero or more complete ``Name: value\\r\\n`` lines. The handler never
  writes framing or connection fields (``Content-Length``, ``Transfer-Encoding``,
  ``Connection``) nor ``Server``/``Date``: the connection adds those, so they are right for
  HEAD, 304, keep-alive and HTTP/1.0 in one place.
* ``body``    -- ``bytes``; a :class:`FileRange` (sent with sendfile); an iterator of
  ``bytes`` chunks (sent chunked, or close-delimited to HTTP/1.0 clients); or ``None``.

For HEAD the handler returns what GET would return (so Content-Length matches) and the
connection drops the body; a :class:`FileRange` with ``fd == -1`` is fine for HEAD. The
connection closes a FileRange's descriptor once sent (or dropped), unless the FileRange
names an :class:`OpenFile` as ``shared``: that descriptor is the OpenFile's, closed when the
last answer sending it and its owner (a cache) let go of it.

**Answer later**: an instance of :class:`Later` (or a compiled deferred such as the proxy's
exchange). The connection calls ``started(req)``, passes the request body to ``body(data,
done)`` as it arrives, and ``aborted()`` if the client leaves; the object answers with
``respond(status, headers, body)`` (the same three parts) whenever it is ready.
:class:`ReadBody` is the common case: answer once the whole body has been read.

Either way the route's policies run around the handler (expserver/policy.py): the checks
before it, and header rules, CORS and error pages on whatever it answers, one place for
every route type.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._conn import Later
from ._pipe import FileRange, OpenFile

Answer = tuple[int, bytes, object]

__all__ = ["Answer", "FileRange", "Later", "OpenFile", "ReadBody"]


_TOO_BIG = (413, b"Content-Type: text/plain\r\n", b"request body too large\n")


class ReadBody(Later):
    """Answer with ``answer(req, body)`` once the whole request body is read (at most
    ``limit`` bytes: a larger body is answered 413 and the connection closed)."""

    def __init__(self, answer: Callable[[Any, bytes], Answer], limit: int = 1 << 20) -> None:
        self.answer = answer
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def started(self, req: Any) -> None:
        if not (req.chunked or req.content_length > 0):
            self.respond(*self.answer(req, b""))
        elif req.content_length > self.limit:
            self.respond(*_TOO_BIG)

    def body(self, data: bytes, done: bool) -> None:
        if self.answered:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.parts = []
            self.respond(*_TOO_BIG)
            return
        self.parts.append(data)
        if done:
            body, self.parts = b"".join(self.parts), []
            self.respond(*self.answer(self.request, body))
