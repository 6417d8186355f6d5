"""Static files for a ``file_serve`` route: map the URL to a file, answer GET and HEAD.

Theory of operation
-------------------
A :class:`FileServe` is built once per route and called per request; it returns
``(status, headers, body)`` as :mod:`expserver.response` defines. Two memo tables, each
bounded by clearing when full (cheap; a client cycling paths only costs recomputation):

* ``_targets``: raw request path -> :class:`_Target` (filesystem path, decoded URL path, media
  type) or a ready error response. Everything that depends only on the path is done once.
* ``_metas``: one version of one file -> :class:`_Meta` (ETag, Last-Modified, prebuilt header
  blocks), keyed by path and checked against ``(ino, mtime_ns, size, ctime_ns)`` of the current stat.

* ``_open``: path -> the version and an :class:`OpenFile` of a large file served lately
  (nginx's ``open_file_cache``), so a hit needs no ``open``/``close``: up to ``_MAX_OPEN``
  descriptors per route, replaced when the lstat shows another version, dropped when the
  file is gone (a deleted file's space is not held by the next request's 404).

A plain file hit costs one dict lookup, one ``os.lstat`` and a few header lookups (and an
``os.open`` for a large file not kept open): no regex, no str decoding, headers
concatenated from cached pieces. Files up to ``SMALL_FILE`` come from memory.

Path policy (the first failing rule answers)
--------------------------------------------
* ``//`` collapses; percent-decoding happens exactly once (``%252e`` is the name ``%2e``).
* invalid percent-encoding (``%`` not followed by two hex digits) -> 400; NUL (raw or ``%00``)
  -> 400; a ``.`` or ``..`` segment, raw or encoded (``%2e%2e``) -> 400: RFC 3986 clients
  remove dot segments before sending, so one that arrives is hand-made. Refuse, never resolve.
* an encoded ``/`` (``%2f``) or a ``\\`` (``%5c`` or raw) inside a segment -> 404, as Apache's
  ``AllowEncodedSlashes Off``: no resource of ours has such a name. Raw ``\\`` too, because
  browsers and some proxies turn it into ``/``; names holding ``\\`` are not listed either.
* ``dotfiles: "deny"``: a segment below the route starting with ``.`` -> 404, so ``.git`` and
  ``.env`` look absent rather than forbidden (and listings hide them).
* invalid UTF-8 -> 400, unless the bytes name an existing file: POSIX names are bytes and the
  listing links a non-UTF-8 name by its exact bytes, so that every listed entry is reachable.

Symlinks: the root is resolved with realpath once. The final component is examined with
``lstat``; only when it is a symlink is it resolved, and a target outside the root (or a
dotfile under "deny") is refused with 403. Intermediate directories are checked by resolving
the parent directory; a positive answer is cached for ``PARENT_TTL`` seconds, like nginx's
``open_file_cache_valid``. That buys one syscall per request at the price of a short window in
which a directory swapped for an outward symlink (by someone who can write into the tree) may
still be followed. Files are opened with ``O_NOFOLLOW``, so a final component swapped for a
symlink between ``lstat`` and ``open`` fails (403) instead of being read.

HTTP policy
-----------
* Conditionals in RFC 9110 §13.2.2 order: If-Match / If-Unmodified-Since (412), then
  If-None-Match (weak comparison) or else If-Modified-Since (not newer -> 304), then If-Range
  (strong ETag or exact date; a mismatch sends the full 200).
* One range per request: a Range header with several ranges is ignored and the whole file is
  sent (200), as RFC 9110 §14.2 permits; this also defuses overlapping-range amplification.
  Range on an empty file is ignored as well. HEAD mirrors GET, Range included (like nginx;
  download managers probe with HEAD + Range).
* Compressed responses are separate representations with their own strong ETag: the identity
  tag with a suffix inside the quotes, ``"<mtime>-<size>-gz"`` / ``"...-br"``. For a
  precompressed sibling (``f.gz``/``f.br``, a regular file not older than ``f``) mtime and size
  are the sibling's, like its Last-Modified (nginx's gzip_static does the same). Compressed
  responses carry no Accept-Ranges and ignore Range (like nginx's gzip filter); every response
  for a compressible file carries ``Vary: Accept-Encoding`` when the route compresses.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Protocol
from urllib.parse import quote

from expserver import compression, httpdate, listing, mime
from expserver.pages import page
from expserver.response import FileRange, OpenFile

Response = tuple[int, bytes, object]

PARENT_TTL = 1.0
_MAX_TARGETS = 8192
_MAX_CACHED_PATH = 512
_MAX_METAS = 8192
_MAX_PARENTS = 4096
# Descriptors of the large files served lately, kept open for the next requests (nginx's
# open_file_cache): a hit saves an open and a close. At most this many per route.
_MAX_OPEN = 64
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_URL_SAFE = "/!$&'()*+,;=:@~"


# Read-only views (properties) so that frozen dataclasses and Cython objects both fit.
class Request(Protocol):
    @property
    def method(self) -> bytes: ...
    @property
    def path(self) -> bytes: ...
    @property
    def query(self) -> bytes: ...
    @property
    def version(self) -> int: ...
    def get(self, name: bytes) -> bytes | None: ...


class Route(Protocol):
    @property
    def req_path(self) -> str: ...
    @property
    def dir_path(self) -> str | None: ...
    @property
    def index(self) -> Sequence[str]: ...
    @property
    def autoindex(self) -> bool: ...
    @property
    def dotfiles(self) -> str: ...
    @property
    def gzip_enable(self) -> bool: ...
    @property
    def gzip_level(self) -> int: ...
    @property
    def brotli_enable(self) -> bool: ...
    @property
    def brotli_level(self) -> int: ...
    @property
    def compress_min_length(self) -> int: ...


_HTML = b"Content-Type: text/html\r\n"


# Error answers are constants: built once, shared by every request.
_E400: Response = (400, _HTML, page(400))
_E403: Response = (403, _HTML, page(403))
_E404: Response = (404, _HTML, page(404))
_E405: Response = (405, b"Allow: GET, HEAD\r\n" + _HTML, page(405))
_E412: Response = (412, _HTML, page(412))
_P301 = page(301)
_P416 = page(416)

# "%xx" (any case) -> the byte; anything else is invalid percent-encoding.
_HEXDIGITS = b"0123456789abcdefABCDEF"
_PCT = {bytes((a, b)): bytes((int(bytes((a, b)), 16),)) for a in _HEXDIGITS for b in _HEXDIGITS}


def _unquote(seg: bytes) -> bytes | None:
    parts = seg.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        byte = _PCT.get(part[:2])
        if byte is None:
            return None
        out.append(byte)
        out.append(part[2:])
    return b"".join(out)


# Files up to this size are served from memory (the shared CompressionCache, bounded in
# bytes); bigger ones go out with sendfile.
SMALL_FILE = 32768
IDENTITY = "identity"

class _Target:
    """What a raw request path names, before looking at the filesystem."""

    __slots__ = ("compressible", "ctype", "fspath", "parent", "rel", "trailing", "url", "utf8")

    def __init__(
        self, root: bytes, root_slash: bytes, prefix: bytes, rel: bytes, trailing: bool,
        charset: str | None = None,
    ) -> None:
        self.rel = rel
        self.fspath = root_slash + rel if rel else root
        self.url = prefix + b"/" + rel if rel else prefix  # decoded, no trailing "/"
        self.parent = rel.rpartition(b"/")[0] or None
        self.trailing = trailing
        url_ok = True
        if not rel.isascii():
            try:
                rel.decode("utf-8")
            except UnicodeDecodeError:
                url_ok = False
        self.utf8 = url_ok
        # latin-1 never fails; only an ASCII extension can match the table anyway.
        ctype = mime.guess(rel.rpartition(b"/")[2].decode("latin-1")) if rel else mime.DEFAULT
        self.ctype = mime.with_charset(ctype, charset).encode("ascii")
        self.compressible = mime.is_compressible(ctype)


class _Meta:
    """Validators and prebuilt header blocks of one version of one representation."""

    __slots__ = ("ctype", "etag", "h200", "h304", "lm", "mtime", "validator")

    def __init__(
        self,
        validator: tuple[int, int, int, int],
        st: os.stat_result,
        ctype: bytes,
        encoding: bytes,
        vary: bool,
    ) -> None:
        self.validator = validator
        self.ctype = ctype
        mtime = st.st_mtime_ns // 1_000_000_000
        self.mtime = mtime
        suffix = b"" if not encoding else b"-br" if encoding == b"br" else b"-gz"
        # nginx's "<mtime>-<size>", plus the sub-second part when there is one: an edit that
        # keeps the size within the same second must still change the tag
        ns = st.st_mtime_ns % 1_000_000_000
        if ns:
            self.etag = b'"%x.%x-%x%s"' % (mtime, ns, st.st_size, suffix)
        else:
            self.etag = b'"%x-%x%s"' % (mtime, st.st_size, suffix)
        self.lm = httpdate.format(mtime).encode("ascii")
        common = b"Last-Modified: " + self.lm + b"\r\nETag: " + self.etag + b"\r\n"
        if vary:
            common += b"Vary: Accept-Encoding\r\n"
        self.h304 = common
        self.h200 = (
            b"Content-Type: "
            + ctype
            + b"\r\n"
            + common
            + (
                b"Content-Encoding: " + encoding + b"\r\n"
                if encoding
                else b"Accept-Ranges: bytes\r\n"
            )
        )


def _etag_match(value: bytes, etag: bytes, weak: bool) -> bool:
    """Does the If-Match/If-None-Match list ``value`` match our (strong) ``etag``?"""
    if value == etag:
        return True
    for tag in value.split(b","):
        tag = tag.strip(b" \t")
        if tag == b"*":
            return True
        if tag[:2] == b"W/":
            if not weak:  # strong comparison: a weak tag never matches
                continue
            tag = tag[2:]
        if tag == etag:
            return True
    return False


def _preconditions(req: Request, meta: _Meta) -> int:
    """0 to go on, else 304 or 412 (RFC 9110 §13.2.2, steps 1-4)."""
    get = req.get
    v = get(b"if-match")
    if v is not None:
        if not _etag_match(v, meta.etag, False):
            return 412
    else:
        v = get(b"if-unmodified-since")
        if v is not None and v != meta.lm:
            t = httpdate.parse(v)
            if t is not None and meta.mtime > t:
                return 412
    v = get(b"if-none-match")
    if v is not None:
        return 304 if _etag_match(v, meta.etag, True) else 0
    v = get(b"if-modified-since")
    if v is not None:
        if v == meta.lm:  # the usual case: the client echoes our own Last-Modified
            return 304
        t = httpdate.parse(v)
        if t is not None and meta.mtime <= t:
            return 304
    return 0


def _if_range(req: Request, meta: _Meta) -> bool:
    """True if Range may be honoured: no If-Range, or it matches strongly."""
    v = req.get(b"if-range")
    if v is None:
        return True
    if v[:1] == b'"':
        return v == meta.etag
    if v[:2] == b"W/":
        return False
    return v == meta.lm or httpdate.parse(v) == meta.mtime


UNSATISFIABLE = (-1, -1)


def _int(digits: bytes) -> int:
    # Clamp instead of int() on thousands of digits (slow, and over 4300 it raises).
    digits = digits.lstrip(b"0")
    if len(digits) > 18:
        return 1 << 62
    return int(digits) if digits else 0


def parse_range(value: bytes, size: int) -> tuple[int, int] | None:
    """``Range`` -> (first, last) inclusive, :data:`UNSATISFIABLE`, or None to ignore it.

    ``ranges-specifier = range-unit "=" range-set``; only one ``int-range`` (``a-b``, ``a-``)
    or ``suffix-range`` (``-n``) is honoured, see the module docstring.
    """
    unit, eq, spec = value.partition(b"=")
    if not eq or unit.lower() != b"bytes" or size <= 0:
        return None
    if b"," in spec:
        parts = [p for p in spec.split(b",") if p.strip(b" \t")]
        if len(parts) != 1:
            return None
        spec = parts[0]
    first, dash, last = spec.strip(b" \t").partition(b"-")
    if not dash:
        return None
    if not first:
        if not last.isdigit():
            return None
        n = _int(last)
        return (max(size - n, 0), size - 1) if n else UNSATISFIABLE
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = _int(first)
    end = _int(last) if last else size - 1
    if last and end < start:
        return None
    if start >= size:
        return UNSATISFIABLE
    return (start, min(end, size - 1))


def _open_error(e: OSError) -> Response:
    return _E404 if isinstance(e, (FileNotFoundError, NotADirectoryError)) else _E403


class FileServe:
    """The handler of one ``file_serve`` route."""

    def __init__(self, route: Route, cache: compression.CompressionCache | None = None) -> None:
        if not route.dir_path:
            raise ValueError(f"file_serve route {route.req_path!r} has no dir_path")
        root = os.fsencode(os.path.realpath(route.dir_path))
        self._root = root
        self._root_slash = root if root.endswith(b"/") else root + b"/"
        prefix = route.req_path.rstrip("/").encode("utf-8")
        self._prefix = prefix
        self._prefix_segs = [s for s in prefix.split(b"/") if s]
        self._charset: str | None = getattr(route, "charset", None)
        self._index = tuple(
            (
                os.fsencode(name),
                mime.with_charset(mime.guess(name), self._charset).encode("ascii"),
                mime.is_compressible(mime.guess(name)),
            )
            for name in route.index
        )
        self._listing_type = b"Content-Type: " + mime.with_charset(
            "text/html", self._charset).encode("ascii") + b"\r\n"
        self._autoindex = bool(route.autoindex)
        self._hide = route.dotfiles != "allow"
        self._gzip = bool(route.gzip_enable)
        self._br = bool(route.brotli_enable)
        self._levels = {compression.GZIP: route.gzip_level, compression.BR: route.brotli_level}
        self._min_length = route.compress_min_length
        self._cache = compression.shared_cache if cache is None else cache
        self._targets: dict[bytes, _Target | Response] = {}
        self._metas: dict[object, _Meta] = {}
        self._open: dict[bytes, tuple[tuple[int, int, int, int], OpenFile]] = {}
        self._parents: dict[bytes, float] = {}
        # the entry point: the plain one, or wrapped by the route's extras (only then)
        fallback = getattr(route, "fallback", None)
        self._fallback = prefix + fallback.encode("utf-8") if fallback else None
        cache_control = getattr(route, "cache_control", None)
        self._expires: int | None = getattr(route, "expires", None)
        self._cache_block = b""
        if cache_control is not None:
            self._cache_block = b"Cache-Control: " + cache_control.encode("ascii") + b"\r\n"
        elif self._expires is not None:
            self._cache_block = b"Cache-Control: max-age=%d\r\n" % self._expires
        self._expires_line = (0, b"")
        self.serve = self._answer if self._fallback is None else self._with_fallback
        if self._cache_block:
            self.serve = self._with_cache(self.serve)

    # -- request entry point ------------------------------------------------------------------

    def _with_fallback(self, req: Request) -> Response:
        answer = self._answer(req)
        if answer[0] == 404 and req.method in (b"GET", b"HEAD"):
            return self._answer(req, self._fallback)
        return answer

    def _with_cache(self, serve: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def cached(req: Request) -> Response:
            status, headers, body = serve(req)
            if status in (200, 206, 304):
                headers += self._cache_block + self._expires_header()
            return status, headers, body
        return cached

    def _expires_header(self) -> bytes:
        if self._expires is None:
            return b""
        now = int(time.time())
        if self._expires_line[0] != now:
            stamp = httpdate.format(now + self._expires).encode("ascii")
            self._expires_line = (now, b"Expires: " + stamp + b"\r\n")
        return self._expires_line[1]

    def _answer(self, req: Request, raw_path: bytes | None = None) -> Response:
        method = req.method
        if method == b"GET":
            head = False
        elif method == b"HEAD":
            head = True
        else:
            return _E405
        raw = req.path if raw_path is None else raw_path
        target = self._targets.get(raw)
        if target is None:
            target = self._target(raw)
        if isinstance(target, tuple):
            return target
        if target.parent is not None and not self._parent_ok(target.parent):
            return _E403
        path = target.fspath
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                real = self._resolve_link(path)
                if real is None:
                    return _E403
                path, st = real, os.stat(real)
        except PermissionError:
            return _E403
        except OSError:
            self._open.pop(path, None)      # deleted: its descriptor must not keep it alive
            return _E404 if target.utf8 else _E400
        mode = st.st_mode
        if stat.S_ISREG(mode):
            if target.trailing:
                return _E404
            return self._file(req, head, path, st, target.ctype, target.compressible)
        if stat.S_ISDIR(mode):
            if not target.trailing:
                return self._redirect(req, target)
            return self._directory(req, head, path, target)
        return _E403  # sockets, FIFOs, devices

    # -- URL -> target ------------------------------------------------------------------------

    def _target(self, raw: bytes) -> _Target | Response:
        result = self._decode(raw)
        # Long paths are decoded every time rather than kept: the table's memory stays
        # bounded by _MAX_TARGETS * _MAX_CACHED_PATH whatever clients send.
        if len(raw) <= _MAX_CACHED_PATH:
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            self._targets[raw] = result
        return result

    def _decode(self, raw: bytes) -> _Target | Response:
        segs: list[bytes] = []
        refused = False  # 404 conditions; every 400 condition must still win over them
        for seg in raw.split(b"/"):
            if not seg:
                continue
            if b"%" in seg:
                decoded = _unquote(seg)
                if decoded is None:
                    return _E400
                seg = decoded
                if b"/" in seg:
                    refused = True
            if b"\0" in seg or seg == b"." or seg == b"..":
                return _E400
            if b"\\" in seg:
                refused = True
            segs.append(seg)
        n = len(self._prefix_segs)
        if refused or segs[:n] != self._prefix_segs:
            return _E404
        rest = segs[n:]
        if self._hide and any(s[:1] == b"." for s in rest):
            return _E404
        return _Target(
            self._root, self._root_slash, self._prefix, b"/".join(rest), raw.endswith(b"/"),
            self._charset,
        )

    # -- symlink containment ------------------------------------------------------------------

    def _allowed(self, real: bytes) -> bool:
        """Is resolved path ``real`` inside the root (and not a hidden dotfile)?"""
        if real == self._root:
            return True
        if not real.startswith(self._root_slash):
            return False
        rel = real[len(self._root_slash) :]
        return not (self._hide and (rel[:1] == b"." or b"/." in rel))

    def _resolve_link(self, path: bytes) -> bytes | None:
        """Where symlink ``path`` leads, or None if that is off limits; OSError if dangling."""
        real = os.path.realpath(path, strict=True)
        return real if self._allowed(real) else None

    def _link_stat(self, path: bytes) -> os.stat_result | None:
        real = self._resolve_link(path)
        return None if real is None else os.stat(real)

    def _parent_ok(self, parent: bytes) -> bool:
        now = time.monotonic()
        expiry = self._parents.get(parent)
        if expiry is not None and expiry > now:
            return True
        try:
            real = os.path.realpath(self._root_slash + parent, strict=True)
        except (FileNotFoundError, NotADirectoryError):
            return True  # nothing there: the lstat that follows answers 404; not cached
        except OSError:
            return False
        if not self._allowed(real):
            return False
        if len(self._parents) >= _MAX_PARENTS:
            self._parents.clear()
        self._parents[parent] = now + PARENT_TTL
        return True

    # -- directories --------------------------------------------------------------------------

    def _redirect(self, req: Request, target: _Target) -> Response:
        # Built from the normalised path, never echoed raw: "//evil.example" must not become
        # a protocol-relative Location.
        location = quote(target.url, safe=_URL_SAFE).encode("ascii") + b"/"
        query = req.query
        if query and b"\r" not in query and b"\n" not in query:
            location += b"?" + query
        return (301, b"Location: " + location + b"\r\n" + _HTML, _P301)

    def _directory(self, req: Request, head: bool, path: bytes, target: _Target) -> Response:
        for name, ctype, compressible in self._index:
            candidate = path + b"/" + name
            try:
                st = os.lstat(candidate)
                if stat.S_ISLNK(st.st_mode):
                    real = self._resolve_link(candidate)
                    if real is None:
                        continue
                    candidate, st = real, os.stat(real)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                return self._file(req, head, candidate, st, ctype, compressible)
        if not self._autoindex:
            return _E403
        try:
            entries = listing.scan(path, self._hide, self._link_stat)
        except OSError as e:
            return _open_error(e)
        page = listing.render(target.url + b"/", entries, parent=bool(target.rel))
        headers = self._listing_type
        if self._gzip or self._br:
            headers += b"Vary: Accept-Encoding\r\n"
            ae = req.get(b"accept-encoding")
            enc = compression.negotiate(ae, self._gzip, self._br) if ae else None
            if enc is not None:
                page = compression.compress(page, enc, self._levels[enc])
                headers += b"Content-Encoding: " + enc.encode("ascii") + b"\r\n"
        return (200, headers, page)

    # -- files --------------------------------------------------------------------------------

    def _meta(
        self, key: object, st: os.stat_result, ctype: bytes, encoding: bytes, vary: bool
    ) -> _Meta:
        # ctime too: a chmod or chown must be seen (the file may no longer be ours to send)
        validator = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)
        meta = self._metas.get(key)
        # ctype too: a symlink is typed by its own name, so one file can carry two types.
        if meta is None or meta.validator != validator or meta.ctype != ctype:
            meta = _Meta(validator, st, ctype, encoding, vary)
            if len(self._metas) >= _MAX_METAS:
                self._metas.clear()
            self._metas[key] = meta
        return meta

    def _file(
        self,
        req: Request,
        head: bool,
        path: bytes,
        st: os.stat_result,
        ctype: bytes,
        compressible: bool,
    ) -> Response:
        vary = compressible and (self._gzip or self._br) and st.st_size >= self._min_length
        if vary:
            ae = req.get(b"accept-encoding")
            if ae:
                enc = compression.negotiate(ae, self._gzip, self._br)
                if enc is not None:
                    return self._encoded(req, head, path, st, ctype, enc)
        meta = self._meta(path, st, ctype, b"", vary)
        pre = _preconditions(req, meta)
        if pre:
            return (304, meta.h304, None) if pre == 304 else _E412
        status, headers, size = 200, meta.h200, st.st_size
        offset, length = 0, size
        spec = req.get(b"range")
        if spec is not None:
            rng = parse_range(spec, size)
            if rng is not None and _if_range(req, meta):
                if rng == UNSATISFIABLE:
                    return (416, _HTML + b"Content-Range: bytes */%d\r\n" % size, _P416)
                offset, last = rng
                length = last - offset + 1
                status = 206
                headers += b"Content-Range: bytes %d-%d/%d\r\n" % (offset, last, size)
        if head:
            return (status, headers, FileRange(-1, offset, length))
        if size <= SMALL_FILE:
            # small files are kept in memory (validated by the lstat above): the answer is
            # then one send of head + body, with no open/sendfile/close per request
            data = self._cache.get((path, IDENTITY, 0), meta.validator)
            if data is None:
                data = self._read_small(path, meta)
                if data is None:
                    return _E404
            return (status, headers, data if length == size else data[offset:offset + length])
        kept = self._open.get(path)
        if kept is None or kept[0] != meta.validator:
            try:
                fd = os.open(path, _OPEN_FLAGS)
            except OSError as e:
                return _open_error(e)
            kept = self._keep_open(path, meta.validator, fd)
            if kept is None:
                return (status, headers, FileRange(fd, offset, length))
        return (status, headers, FileRange(kept[1].fd, offset, length, kept[1]))

    def _keep_open(self, path: bytes, validator: tuple[int, int, int, int], fd: int
                   ) -> tuple[tuple[int, int, int, int], OpenFile] | None:
        """Keep ``fd`` for the next requests, if it is the version the lstat saw (else it
        changed in between, and this answer alone sends it). Answers still sending a
        replaced or dropped descriptor keep it open until they are done."""
        st = os.fstat(fd)
        if (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns) != validator:
            return None
        if len(self._open) >= _MAX_OPEN:
            self._open.clear()
        kept = self._open[path] = (validator, OpenFile(fd))
        return kept

    def _read_small(self, path: bytes, meta: _Meta) -> bytes | None:
        try:
            with open(os.open(path, _OPEN_FLAGS), "rb") as f:
                data = f.read(SMALL_FILE + 1)
        except OSError:
            return None
        if len(data) != meta.validator[2]:
            return None  # changed under us: the next request sees the new version
        self._cache.put((path, IDENTITY, 0), meta.validator, data)
        return data

    def _encoded(
        self, req: Request, head: bool, path: bytes, st: os.stat_result, ctype: bytes, enc: str
    ) -> Response:
        enc_b = enc.encode("ascii")
        sibling = path + (b".br" if enc == compression.BR else b".gz")
        try:
            sst: os.stat_result | None = os.lstat(sibling)
        except OSError:
            sst = None
        # lstat, not stat: a symlinked sibling is ignored rather than followed out of the root.
        if sst is not None and stat.S_ISREG(sst.st_mode) and sst.st_mtime_ns >= st.st_mtime_ns:
            meta = self._meta((sibling, enc, True), sst, ctype, enc_b, True)
            pre = _preconditions(req, meta)
            if pre:
                return (304, meta.h304, None) if pre == 304 else _E412
            try:
                fd = -1 if head else os.open(sibling, _OPEN_FLAGS)
                return (200, meta.h200, FileRange(fd, 0, sst.st_size))
            except OSError:
                pass  # vanished or unreadable: compress the original instead
        meta = self._meta((path, enc, False), st, ctype, enc_b, True)
        pre = _preconditions(req, meta)
        if pre:
            return (304, meta.h304, None) if pre == 304 else _E412
        level = self._levels[enc]
        key = (path, enc, level)
        data = self._cache.get(key, meta.validator)
        if data is not None:
            return (200, meta.h200, data)
        try:
            if st.st_size > self._cache.max_entry_bytes:
                # Too big to hold: stream it, chunked. HEAD gets the same (empty) framing.
                if head:
                    return (200, meta.h200, iter(()))
                fd = os.open(path, _OPEN_FLAGS)
                return (200, meta.h200, compression.CompressStream(fd, enc, level))
            with open(os.open(path, _OPEN_FLAGS), "rb") as f:
                raw = f.read()
        except OSError as e:
            return _open_error(e)
        data = compression.compress(raw, enc, level)
        if len(raw) == st.st_size:  # else the file changed under us: serve, but don't keep
            self._cache.put(key, meta.validator, data)
        return (200, meta.h200, data)
