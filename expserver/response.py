"""What a handler hands back to the connection.

A handler returns a tuple ``(status, headers, body)``:

* ``status``  -- int status code.
* ``headers`` -- bytes: zero or more complete ``Name: value\\r\\n`` lines. The handler never
  writes framing or connection fields (``Content-Length``, ``Transfer-Encoding``,
  ``Connection``) nor ``Server``/``Date``: the connection adds those, so they are right for
  HEAD, 304, keep-alive and HTTP/1.0 in one place.
* ``body``    -- ``bytes``; a :class:`FileRange` (sent with sendfile); an iterator of
  ``bytes`` chunks (sent chunked, or close-delimited to HTTP/1.0 clients); or ``None``.

For HEAD the handler returns what GET would return (so Content-Length matches) and the
connection drops the body; a :class:`FileRange` with ``fd == -1`` is fine for HEAD.
"""
from __future__ import annotations


class FileRange:
    """``length`` bytes of open file ``fd`` from ``offset``; the connection closes ``fd``."""

    __slots__ = ("fd", "offset", "length")

    def __init__(self, fd: int, offset: int, length: int) -> None:
        self.fd = fd
        self.offset = offset
        self.length = length

    def __repr__(self) -> str:
        return f"FileRange(fd={self.fd}, offset={self.offset}, length={self.length})"
