# cython: language_level=3
"""HTTP/1.1 request parser: a byte-table state machine (RFC 9112).

Theory of operation
-------------------
A request head is handled in two passes over the same contiguous bytes:

1. ``Parser.scan_head`` validates byte by byte and is resumable: it keeps ``state`` and
   ``pos`` (offsets relative to the first byte of the head) between calls, so bytes that
   arrive one at a time cost the same as bytes that arrive together. Every byte is checked
   against a 256-entry table; nothing is decoded to ``str`` and no Python object is made.
   It returns AGAIN, DONE, or ``-status`` (400, 414, 431, 505) with ``error_reason`` set.
2. ``Parser.build`` runs once on a complete, already validated head: it cuts the spans
   into ``bytes`` objects (one per method/target/name/value), lower-cases field names and
   applies the semantic rules (Host, Content-Length, Transfer-Encoding, Connection, Expect).

The body is then framed by ``feed_body``: Content-Length counting or the chunked decoder
(``chunk-size [ext] CRLF data CRLF ... 0 CRLF trailers CRLF``). Data goes to a list, or
nowhere when the route does not want it, so that the next pipelined request starts at the
right byte either way.

Strict by design: CRLF line ends only (a bare LF or bare CR is 400), no obs-fold, no
whitespace before the colon, Content-Length is 1*DIGIT parsed by table (never ``int()``),
one Transfer-Encoding field whose value is exactly ``chunked`` (another coding is 501),
CL together with TE is 400, TE in HTTP/1.0 is 400, Host is ``uri-host [":" port]``.

Limits (``max_line`` for the request line and ``max_field`` for a field line, both without
the CRLF; ``max_head`` for the whole head, skipped empty lines included; ``max_fields``) are
checked at the byte that crosses them, never once per call: the verdict and the status
depend only on the bytes, not on how they were split into reads.

Ownership: the caller owns the buffer; the parser keeps offsets into it, never pointers.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

# ---------------------------------------------------------------- character tables
cdef unsigned char TCHAR[256]      # token (RFC 9110 5.6.2): method, field-name
cdef unsigned char TARGET[256]     # request-target bytes: visible ASCII + obs-text
cdef unsigned char VALUE[256]      # field-value bytes: VCHAR, SP, HTAB, obs-text
cdef unsigned char LOWER[256]
cdef unsigned char HEXVAL[256]     # 0..15, 255 = not a hex digit
cdef unsigned char HOSTCHAR[256]   # reg-name / IP-literal / port bytes

cdef void _init_tables() noexcept:
    cdef int c
    for c in range(256):
        TCHAR[c] = 0
        TARGET[c] = 1 if (0x21 <= c <= 0x7e or c >= 0x80) else 0
        VALUE[c] = 1 if (c == 9 or 0x20 <= c <= 0x7e or c >= 0x80) else 0
        LOWER[c] = c + 32 if 65 <= c <= 90 else c
        HEXVAL[c] = 255
        HOSTCHAR[c] = 0
    for c in b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ":
        TCHAR[c] = 1
    for c in b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%":
        HOSTCHAR[c] = 1
    for c in range(10):
        HEXVAL[48 + c] = c
    for c in range(6):
        HEXVAL[97 + c] = 10 + c
        HEXVAL[65 + c] = 10 + c

_init_tables()

# SWAR ("SIMD within a register") checks, 8 bytes at a time: the common bytes of targets and
# field values are plain visible ASCII, so most of a head is skipped a word at a time and
# only a word that may hold something else is looked at byte by byte with the tables.
# hasless(w, n) is non-zero if some byte of w is < n (n <= 128; exact when zero).
cdef uint64_t ONES = 0x0101010101010101ULL
cdef uint64_t HIGHS = 0x8080808080808080ULL

cdef inline uint64_t _hasless(uint64_t w, uint64_t n) noexcept nogil:
    return (w - ONES * n) & ~w & HIGHS

cdef inline uint64_t _hasdel(uint64_t w) noexcept nogil:
    cdef uint64_t x = w ^ (ONES * 0x7f)
    return (x - ONES) & ~x & HIGHS

cdef inline Py_ssize_t _skip_plain(const unsigned char *buf, Py_ssize_t i, Py_ssize_t n,
                                   uint64_t low) noexcept nogil:
    """Advance i over whole words with no byte < ``low`` and no DEL."""
    cdef uint64_t w
    while i + 8 <= n:
        memcpy(&w, buf + i, 8)
        if _hasless(w, low) | _hasdel(w):
            break
        i += 8
    return i

cdef inline Py_ssize_t _scan(const unsigned char *buf, Py_ssize_t i, Py_ssize_t lim,
                             uint64_t low, const unsigned char *table) noexcept nogil:
    """Advance over bytes of ``table``'s class: whole plain words first, then byte by byte."""
    i = _skip_plain(buf, i, lim, low)
    while i < lim and table[buf[i]]:
        i += 1
    return i

# ---------------------------------------------------------------- head states
cdef enum:
    S_START = 0      # before the request line (empty lines are skipped, RFC 9112 2.2)
    S_START_LF
    S_METHOD
    S_TARGET_FIRST
    S_TARGET
    S_VERSION
    S_LINE_LF
    S_FIELD_START
    S_NAME
    S_VALUE
    S_FIELD_LF
    S_HEAD_LF
    S_DONE

# body states (0 = no body / finished)
cdef enum:
    B_NONE = 0
    B_LENGTH
    B_SIZE_FIRST
    B_SIZE
    B_EXT
    B_SIZE_LF
    B_DATA
    B_DATA_CR
    B_DATA_LF
    B_TRAILER_START
    B_TRAILER
    B_TRAILER_LF
    B_END_LF
    B_EXT_BWS        # BWS after the chunk size: only ';' may follow
    B_TRAILER_NAME
    B_UNTIL_EOF      # a response delimited by the close of the connection

DEF MAX_CHUNK_EXT = 4096
DEF MAX_TRAILERS = 8192

class HttpError(Exception):
    """A request that must be answered with ``status`` and then the connection closed."""

    def __init__(self, int status, str reason):
        super().__init__(status, reason)
        self.status = status
        self.reason = reason

    def __str__(self):
        return f"{self.status}: {self.reason}"


# Cached objects for the common cases so a typical request allocates less.
cdef bytes M_GET = b"GET"
cdef bytes M_HEAD = b"HEAD"
cdef bytes M_POST = b"POST"
cdef bytes EMPTY = b""


cdef class Request:
    """A parsed request head. Made by the parser; Python code reads it."""

    cpdef object get(self, bytes name):
        """First value of field ``name`` (lower-case), or None."""
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def __repr__(self):
        return (f"<Request {self.method.decode('latin-1')} {self.target!r} "
                f"HTTP/{self.version // 10}.{self.version % 10}>")


cdef inline bytes _method_bytes(const unsigned char *p, Py_ssize_t n):
    if n == 3 and memcmp(p, b"GET", 3) == 0:
        return M_GET
    if n == 4 and memcmp(p, b"HEAD", 4) == 0:
        return M_HEAD
    if n == 4 and memcmp(p, b"POST", 4) == 0:
        return M_POST
    return PyBytes_FromStringAndSize(<const char *>p, n)


cdef FieldLine field_line(const unsigned char *p, Py_ssize_t start,
                          Py_ssize_t limit) noexcept nogil:
    """The spans of a validated field line (``name:OWS value OWS CRLF``) at p[start:]."""
    cdef FieldLine f
    f.end = <const unsigned char *>memchr(p + start, 13, limit - start) - p
    f.colon = <const unsigned char *>memchr(p + start, 58, f.end - start) - p
    f.value_start = f.colon + 1
    while f.value_start < f.end and (p[f.value_start] == 32 or p[f.value_start] == 9):
        f.value_start += 1
    f.value_end = f.end
    while f.value_end > f.value_start and (p[f.value_end - 1] == 32 or p[f.value_end - 1] == 9):
        f.value_end -= 1
    return f


cdef bytes lower_bytes(const unsigned char *p, Py_ssize_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, n)
    cdef unsigned char *q = <unsigned char *>PyBytes_AS_STRING(out)
    cdef Py_ssize_t i
    for i in range(n):
        q[i] = LOWER[p[i]]
    return out


cdef bint ieq(const unsigned char *p, Py_ssize_t n, const char *lit, Py_ssize_t m) noexcept:
    """Case-insensitive compare of p[:n] with the lower-case literal ``lit``."""
    cdef Py_ssize_t i
    if n != m:
        return False
    for i in range(n):
        if LOWER[p[i]] != <unsigned char>lit[i]:
            return False
    return True


# Field names most requests carry, shared instead of allocated per request; by length.
cdef list NAMES_BY_LEN = [[] for _ in range(32)]
for _name in (b"host", b"connection", b"user-agent", b"accept", b"accept-encoding",
              b"accept-language", b"accept-charset", b"cookie", b"referer", b"origin",
              b"content-length", b"content-type", b"cache-control", b"pragma", b"dnt",
              b"upgrade-insecure-requests", b"sec-fetch-site", b"sec-fetch-mode",
              b"sec-fetch-user", b"sec-fetch-dest", b"sec-ch-ua", b"sec-ch-ua-mobile",
              b"sec-ch-ua-platform", b"if-none-match", b"if-modified-since", b"if-range",
              b"range", b"keep-alive", b"authorization", b"x-forwarded-for",
              b"transfer-encoding", b"expect", b"te", b"upgrade", b"priority"):
    NAMES_BY_LEN[len(_name)].append(_name)


cdef inline bytes _field_name(const unsigned char *p, Py_ssize_t n):
    cdef bytes known
    if n < 32:
        for known in <list>NAMES_BY_LEN[n]:
            if ieq(p, n, <const char *>known, n):
                return known
    return lower_bytes(p, n)


cdef Py_ssize_t list_item(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t *s,
                          Py_ssize_t *e) noexcept:
    """The next element of the comma-separated list p[i:n] (RFC 9110 5.6.1) as p[s:e],
    without its whitespace (s == e == n when none is left); returns where to go on."""
    while i < n and (p[i] == 32 or p[i] == 9 or p[i] == 44):
        i += 1
    s[0] = i
    while i < n and p[i] != 44:
        i += 1
    e[0] = i
    while e[0] > s[0] and (p[e[0] - 1] == 32 or p[e[0] - 1] == 9):
        e[0] -= 1
    return i


cdef bint has_token(const unsigned char *p, Py_ssize_t n, const char *tok, Py_ssize_t m) noexcept:
    """Whether the comma-separated list p[:n] holds ``tok`` (case-insensitive)."""
    cdef Py_ssize_t i = 0, s, e
    while i < n:
        i = list_item(p, i, n, &s, &e)
        if ieq(p + s, e - s, tok, m):
            return True
    return False


cdef int _te_status(const unsigned char *p, Py_ssize_t n) noexcept:
    """Verdict on a Transfer-Encoding list: 0 when it is exactly ``chunked`` (empty list
    elements aside, RFC 9110 5.6.1); 400 when it is empty or chunked is not there once and
    last (RFC 9112 6.1, 6.3); 501 for other codings, which we do not implement."""
    cdef Py_ssize_t i = 0, s, e
    cdef int count = 0, nchunked = 0
    cdef bint last = False
    while i < n:
        i = list_item(p, i, n, &s, &e)
        if s == e:
            break
        count += 1
        last = ieq(p + s, e - s, b"chunked", 7)
        nchunked += last
    if count == 0 or nchunked > 1 or (nchunked == 1 and not last):
        return 400
    if count > 1 or nchunked == 0:
        return 501
    return 0


cdef Py_ssize_t _host_end(const unsigned char *p, Py_ssize_t n) noexcept:
    """Length of the host in ``uri-host [":" port]`` (RFC 9112 3.2, RFC 3986 3.2.2), or -1
    when p[:n] is not of that shape: IP-literal = "[" ... "]", reg-name bytes otherwise, and
    a port of digits only."""
    cdef Py_ssize_t i = 0, end
    if n and p[0] == 91:    # '['
        i = 1
        while i < n and p[i] != 93:
            if not HOSTCHAR[p[i]] or p[i] == 91:
                return -1
            i += 1
        if i == n or i == 1:
            return -1
        i += 1
    else:
        while i < n and p[i] != 58:
            if not HOSTCHAR[p[i]] or p[i] == 91 or p[i] == 93:
                return -1
            i += 1
    end = i
    if i < n:
        if p[i] != 58:
            return -1
        for i in range(i + 1, n):
            if HEXVAL[p[i]] > 9:
                return -1
    return end


cdef inline bint _valid_host(const unsigned char *p, Py_ssize_t n) noexcept:
    return _host_end(p, n) >= 0


cdef class Parser:
    """Per-connection parser state. See the module docstring."""

    def __cinit__(self, int max_line=8192, int max_field=8192, int max_head=65536,
                  int max_fields=100):
        self.max_line = max_line
        self.max_field = max_field
        self.max_head = max_head
        self.max_fields = max_fields
        self.reset()
        self.bstate = B_NONE

    cdef void reset(self) noexcept:
        self.state = S_START
        self.pos = 0
        self.line_start = 0
        self.head_start = 0
        self.target_start = 0
        self.target_end = 0
        self.version_start = 0
        self.nfields = 0
        self.error_status = 0
        self.error_reason = None

    cdef int _fail(self, int status, str reason) noexcept:
        self.error_status = status
        self.error_reason = reason
        return -status

    # ------------------------------------------------------------ pass 1: scan
    cdef int scan_head(self, const unsigned char *buf, Py_ssize_t n) noexcept:
        """Validate buf[pos:n]; buf[0] is the first byte of this head."""
        cdef Py_ssize_t i = self.pos
        cdef int state = self.state
        cdef unsigned char c
        cdef int rc = AGAIN
        # Limits are enforced per byte, not per call, so that the verdict (and the status)
        # depends only on the bytes and never on how they were split: ``stop`` is the first
        # index the current line may not reach (see _budget), ``lim`` where this call ends.
        # Both change only when a line starts or ends.
        cdef Py_ssize_t stop = _budget(self, state)
        cdef Py_ssize_t lim = n if n < stop else stop
        while i < lim:
            c = buf[i]
            if state == S_VALUE:
                # the hot state: most head bytes are field values
                i = _scan(buf, i, lim, 0x20, VALUE)
                if i == lim:
                    break
                c = buf[i]
                if c == 13:
                    state = S_FIELD_LF
                    stop = _budget(self, state)
                    lim = n if n < stop else stop
                elif c == 10:
                    rc = self._fail(400, "bare LF in a field line")
                    break
                else:
                    rc = self._fail(400, "invalid byte in a field value")
                    break
            elif state == S_NAME:
                if TCHAR[c]:
                    pass
                elif c == 58:   # ':'
                    state = S_VALUE
                elif c == 32 or c == 9:
                    rc = self._fail(400, "whitespace before the colon")
                    break
                else:
                    rc = self._fail(400, "invalid byte in a field name")
                    break
            elif state == S_FIELD_LF:
                if c != 10:
                    rc = self._fail(400, "bare CR in a field line")
                    break
                state = S_FIELD_START
                self.line_start = i + 1
                stop = _budget(self, state)
                lim = n if n < stop else stop
            elif state == S_FIELD_START:
                if TCHAR[c]:
                    self.nfields += 1
                    if self.nfields > self.max_fields:
                        rc = self._fail(431, "too many header fields")
                        break
                    state = S_NAME
                elif c == 13:
                    state = S_HEAD_LF
                    stop = _budget(self, state)
                    lim = n if n < stop else stop
                elif c == 32 or c == 9:
                    rc = self._fail(400, "obsolete line folding")
                    break
                elif c == 10:
                    rc = self._fail(400, "bare LF in the header section")
                    break
                else:
                    rc = self._fail(400, "invalid byte in a field name")
                    break
            elif state == S_HEAD_LF:
                if c != 10:
                    rc = self._fail(400, "bare CR at the end of the header section")
                    break
                i += 1
                state = S_DONE
                rc = DONE
                break
            elif state == S_TARGET:
                i = _scan(buf, i, lim, 0x21, TARGET)
                if i == lim:
                    break
                c = buf[i]
                if c == 32:
                    self.target_end = i
                    self.version_start = i + 1
                    state = S_VERSION
                else:
                    rc = self._fail(400, "invalid byte in the request target")
                    break
            elif state == S_METHOD:
                if TCHAR[c]:
                    pass
                elif c == 32:
                    state = S_TARGET_FIRST
                    self.target_start = i + 1
                else:
                    rc = self._fail(400, "invalid byte in the method")
                    break
            elif state == S_TARGET_FIRST:
                if TARGET[c]:
                    state = S_TARGET
                else:
                    rc = self._fail(400, "invalid request line")
                    break
            elif state == S_VERSION:
                if c == 13:
                    rc = self._check_version(buf, i)
                    if rc < 0:
                        break
                    state = S_LINE_LF
                    stop = _budget(self, state)
                    lim = n if n < stop else stop
                elif i - self.version_start >= 8:
                    rc = self._fail(400, "invalid HTTP version")
                    break
            elif state == S_LINE_LF:
                if c != 10:
                    rc = self._fail(400, "bare CR in the request line")
                    break
                state = S_FIELD_START
                self.line_start = i + 1
                stop = _budget(self, state)
                lim = n if n < stop else stop
            elif state == S_START:
                if c == 13:
                    state = S_START_LF
                elif TCHAR[c]:
                    self.head_start = i
                    self.line_start = i
                    state = S_METHOD
                    stop = _budget(self, state)
                    lim = n if n < stop else stop
                else:
                    rc = self._fail(400, "invalid request line")
                    break
            elif state == S_START_LF:
                if c != 10:
                    rc = self._fail(400, "bare CR before the request line")
                    break
                state = S_START
            i += 1
        if rc == AGAIN and i == stop:
            rc = _over_budget(self, state, stop)
        self.pos = i
        self.state = state
        return rc

    cdef int _check_version(self, const unsigned char *buf, Py_ssize_t cr) noexcept:
        cdef const unsigned char *v = buf + self.version_start
        if cr - self.version_start != 8 or memcmp(v, b"HTTP/", 5) != 0 \
                or HEXVAL[v[5]] > 9 or v[6] != 46 or HEXVAL[v[7]] > 9:
            return self._fail(400, "invalid HTTP version")
        if v[5] != 49:   # major version other than 1
            return self._fail(505, "HTTP version not supported")
        return AGAIN

    # ------------------------------------------------------------ pass 2: build
    cdef Request build(self, const unsigned char *buf):
        """Make the Request of a complete head (scan_head returned DONE)."""
        cdef Request req = Request.__new__(Request)
        cdef const unsigned char *p = buf
        cdef Py_ssize_t i, ls, end, colon, vs, ve
        cdef const unsigned char *hit
        cdef long long cl = -1, d
        cdef bint te = False, close = False, keep = False, absolute = False
        cdef int nhost = 0
        cdef bytes name, value
        cdef list headers = []
        cdef FieldLine line
        cdef Py_ssize_t ts = self.target_start, te_ = self.target_end

        req.method = _method_bytes(p + self.head_start, ts - 1 - self.head_start)
        req.target = PyBytes_FromStringAndSize(<const char *>p + ts, te_ - ts)
        req.version = 10 if p[self.version_start + 7] == 48 else 11
        req.host = EMPTY
        req.content_length = -1
        req.chunked = False
        req.expect_continue = False
        req.body = None
        req.peer = None

        # request-target forms (RFC 9112 3.2)
        cdef Py_ssize_t ps = ts, q
        if p[ts] == 47:   # origin-form
            pass
        elif te_ - ts > 7 and (ieq(p + ts, 7, b"http://", 7) or
                               (te_ - ts > 8 and ieq(p + ts, 8, b"https://", 8))):
            # absolute-form: the authority replaces Host (RFC 9112 3.2.2)
            # authority = everything up to the path ('/') or the query ('?')
            ps = ts + (7 if p[ts + 4] == 58 else 8)
            end = ps
            while end < te_ and p[end] != 47 and p[end] != 63:
                end += 1
            if _host_end(p + ps, end - ps) == 0:
                # RFC 9110 4.2.1: an "http" URI with an empty host is invalid
                self._fail(400, "empty host in the request target")
                return None
            if not self._set_host(req, p + ps, end - ps):
                return None
            absolute = True
            ps = end
        elif te_ - ts == 1 and p[ts] == 42 and req.method == b"OPTIONS":
            ps = te_   # asterisk-form
        else:
            self._fail(400, "invalid request target")
            return None
        if ps == te_:
            req.path = b"/" if p[ts] != 42 else b"*"
            req.query = EMPTY
        else:
            hit = <const unsigned char *>memchr(p + ps, 63, te_ - ps)
            q = (hit - p) if hit != NULL else te_
            # "http://h?q" has an empty path, which means "/" (RFC 9112 3.2.2)
            req.path = PyBytes_FromStringAndSize(<const char *>p + ps, q - ps) \
                if q > ps else b"/"
            req.query = PyBytes_FromStringAndSize(<const char *>p + q + 1, te_ - q - 1) \
                if q < te_ else EMPTY

        # field lines: the scan guarantees "name:value CRLF" shapes up to the empty line
        hit = <const unsigned char *>memchr(p + te_, 10, self.pos - te_)
        ls = (hit - p) + 1
        while p[ls] != 13:
            line = field_line(p, ls, self.pos)
            end, colon, vs, ve = line.end, line.colon, line.value_start, line.value_end
            name = _field_name(p + ls, colon - ls)
            value = PyBytes_FromStringAndSize(<const char *>p + vs, ve - vs)
            headers.append((name, value))
            # semantic fields, recognised by length first
            i = colon - ls
            if i == 4 and ieq(p + ls, 4, b"host", 4):
                nhost += 1
                if nhost > 1:
                    self._fail(400, "duplicate Host field")
                    return None
                if absolute:
                    # the target's authority wins (RFC 9112 3.2.2), but an invalid Host
                    # value is still a 400 (RFC 9112 3.2)
                    if not _valid_host(p + vs, ve - vs):
                        self._fail(400, "invalid Host")
                        return None
                elif not self._set_host(req, p + vs, ve - vs):
                    return None
            elif i == 14 and ieq(p + ls, 14, b"content-length", 14):
                if cl >= 0:
                    self._fail(400, "duplicate Content-Length field")
                    return None
                if ve == vs or ve - vs > 18:
                    self._fail(400, "invalid Content-Length")
                    return None
                cl = 0
                for i in range(vs, ve):
                    d = HEXVAL[p[i]]
                    if d > 9:
                        self._fail(400, "invalid Content-Length")
                        return None
                    cl = cl * 10 + d
            elif i == 17 and ieq(p + ls, 17, b"transfer-encoding", 17):
                if te:
                    self._fail(400, "duplicate Transfer-Encoding field")
                    return None
                d = _te_status(p + vs, ve - vs)
                if d == 400:
                    self._fail(400, "invalid Transfer-Encoding")
                    return None
                if d == 501:
                    # e.g. "gzip, chunked": valid HTTP that we do not implement
                    self._fail(501, "unsupported transfer coding")
                    return None
                te = True
            elif i == 10 and ieq(p + ls, 10, b"connection", 10):
                if has_token(p + vs, ve - vs, b"close", 5):
                    close = True
                if has_token(p + vs, ve - vs, b"keep-alive", 10):
                    keep = True
            elif i == 6 and ieq(p + ls, 6, b"expect", 6):
                if ieq(p + vs, ve - vs, b"100-continue", 12):
                    # an HTTP/1.0 client cannot understand 100 (RFC 9110 10.1.1: ignore)
                    req.expect_continue = req.version == 11
                else:
                    self._fail(417, "unsupported expectation")
                    return None
            ls = end + 2
        req.headers = headers

        if te:
            if cl >= 0:
                self._fail(400, "both Content-Length and Transfer-Encoding")
                return None
            if req.version == 10:
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
                return None
            req.chunked = True
        req.content_length = cl
        if req.version == 11 and nhost == 0:
            self._fail(400, "missing Host field")
            return None
        req.keep_alive = (not close) if req.version == 11 else (keep and not close)
        return req

    cdef bint _set_host(self, Request req, const unsigned char *p, Py_ssize_t n) except -1:
        cdef Py_ssize_t end = _host_end(p, n)   # the port is stripped
        if end < 0:
            self._fail(400, "invalid Host")
            return False
        req.host = lower_bytes(p, end)
        return True

    # ------------------------------------------------------------ body framing
    cdef void start_body(self, Request req) noexcept:
        self.received = 0
        self.aux = 0
        if req.chunked:
            self.bstate = B_SIZE_FIRST
        elif req.content_length > 0:
            self.bstate = B_LENGTH
            self.remaining = req.content_length
        else:
            self.bstate = B_NONE

    cdef void begin_fields(self, Py_ssize_t pos) noexcept:
        """Scan field lines from ``pos``: a response head after its status line."""
        self.reset()
        self.state = S_FIELD_START
        self.pos = pos
        self.line_start = pos

    cdef void start_framing(self, bint chunked, long long length, bint until_eof) noexcept:
        """Frame a response body (RFC 9112 6.3): chunked, a length, or until EOF."""
        self.received = 0
        self.aux = 0
        if chunked:
            self.bstate = B_SIZE_FIRST
        elif until_eof:
            self.bstate = B_UNTIL_EOF
        elif length > 0:
            self.bstate = B_LENGTH
            self.remaining = length
        else:
            self.bstate = B_NONE

    cdef Py_ssize_t feed_body(self, const unsigned char *p, Py_ssize_t n, list out) except -2:
        """Consume body bytes from p[:n]; data goes to ``out`` (None: discarded).

        Returns how many bytes belong to the body (the rest is the next request), or -1
        with error_status set. body_done() tells when the body is complete.
        """
        cdef Py_ssize_t i = 0, take
        cdef int st = self.bstate
        cdef unsigned char c, h
        if st == B_UNTIL_EOF:
            if out is not None and n:
                out.append(PyBytes_FromStringAndSize(<const char *>p, n))
            self.received += n
            return n
        if st == B_LENGTH:
            take = n if n < self.remaining else <Py_ssize_t>self.remaining
            if out is not None and take:
                out.append(PyBytes_FromStringAndSize(<const char *>p, take))
            self.remaining -= take
            self.received += take
            if self.remaining == 0:
                self.bstate = B_NONE
            return take
        while i < n and st != B_NONE:
            c = p[i]
            if st == B_DATA:
                take = n - i if n - i < self.remaining else <Py_ssize_t>self.remaining
                if out is not None:
                    out.append(PyBytes_FromStringAndSize(<const char *>p + i, take))
                self.remaining -= take
                self.received += take
                i += take
                if self.remaining == 0:
                    st = B_DATA_CR
                continue
            elif st == B_SIZE_FIRST or st == B_SIZE:
                h = HEXVAL[c]
                if h != 255:
                    self.aux += 1
                    if self.aux > 16 or self.remaining >> 56:
                        self.bstate = st
                        self._fail(400, "chunk size too large")
                        return -1
                    self.remaining = (self.remaining << 4) | h if st == B_SIZE else h
                    st = B_SIZE
                elif st == B_SIZE and c == 59:
                    st = B_EXT
                elif st == B_SIZE and (c == 32 or c == 9):
                    st = B_EXT_BWS
                elif st == B_SIZE and c == 13:
                    st = B_SIZE_LF
                else:
                    self._fail(400, "invalid chunk size")
                    return -1
            elif st == B_EXT:
                # chunk-ext is not interpreted; it may hold tokens, quoted strings, BWS
                if c == 13:
                    st = B_SIZE_LF
                elif not VALUE[c]:
                    self._fail(400, "invalid chunk extension")
                    return -1
                else:
                    self.aux += 1
                    if self.aux > MAX_CHUNK_EXT:
                        self._fail(400, "chunk extensions too long")
                        return -1
            elif st == B_EXT_BWS:
                # chunk-size *( BWS ";" ... ): whitespace here must lead to an extension
                if c == 59:
                    st = B_EXT
                elif c == 32 or c == 9:
                    self.aux += 1
                    if self.aux > MAX_CHUNK_EXT:
                        self._fail(400, "chunk extensions too long")
                        return -1
                else:
                    self._fail(400, "invalid chunk size")
                    return -1
            elif st == B_SIZE_LF:
                if c != 10:
                    self._fail(400, "invalid chunk line ending")
                    return -1
                st = B_DATA if self.remaining else B_TRAILER_START
                self.aux = 0
            elif st == B_DATA_CR:
                if c != 13:
                    self._fail(400, "chunk data longer than its size")
                    return -1
                st = B_DATA_LF
            elif st == B_DATA_LF:
                if c != 10:
                    self._fail(400, "invalid chunk data ending")
                    return -1
                st = B_SIZE_FIRST
                self.remaining = 0
                self.aux = 0
            elif st == B_TRAILER_START:
                if c == 13:
                    st = B_END_LF
                elif TCHAR[c]:
                    st = B_TRAILER_NAME
                else:
                    self._fail(400, "invalid trailer field")
                    return -1
            elif st == B_TRAILER_NAME:
                # the same field-line rules as the head: a token, then ':' at once
                if c == 58:
                    st = B_TRAILER
                elif not TCHAR[c]:
                    self._fail(400, "invalid trailer field")
                    return -1
                self.aux += 1
                if self.aux > MAX_TRAILERS:
                    self._fail(431, "trailer section too large")
                    return -1
            elif st == B_TRAILER:
                if c == 13:
                    st = B_TRAILER_LF
                elif not VALUE[c]:
                    self._fail(400, "invalid trailer field")
                    return -1
                self.aux += 1
                if self.aux > MAX_TRAILERS:
                    self._fail(431, "trailer section too large")
                    return -1
            elif st == B_TRAILER_LF:
                if c != 10:
                    self._fail(400, "bare CR in a trailer field")
                    return -1
                st = B_TRAILER_START
            elif st == B_END_LF:
                if c != 10:
                    self._fail(400, "invalid end of chunked body")
                    return -1
                st = B_NONE
            i += 1
        self.bstate = st
        return i



cdef inline Py_ssize_t _budget(Parser self, int state) noexcept:
    """First index the scan may not reach in ``state``.

    A request line holds at most ``max_line`` bytes and a field line at most ``max_field``
    (both without the CRLF, so the CR may sit at index start + limit); the whole head,
    counted from its first byte (skipped empty lines included), at most ``max_head``.
    """
    cdef Py_ssize_t line
    if S_METHOD <= state <= S_VERSION:
        line = self.head_start + self.max_line + 1
    elif S_FIELD_START <= state <= S_VALUE:
        line = self.line_start + self.max_field + 1
    else:
        return self.max_head
    return line if line < self.max_head else self.max_head


cdef int _over_budget(Parser self, int state, Py_ssize_t stop) noexcept:
    """The error for a head that reached ``stop`` in ``state`` (see _budget)."""
    if state == S_METHOD:
        return self._fail(400, "request method too long")
    if S_TARGET_FIRST <= state <= S_VERSION:
        return self._fail(414, "request target too long")
    if S_FIELD_START <= state <= S_VALUE and stop < self.max_head:
        return self._fail(431, "header field too large")
    return self._fail(431, "header section too large")

cdef class RequestParser:
    """Bytes in, complete requests out: the parser as a plain Python object.

    The server's connection drives ``Parser`` directly over its receive buffer; this class
    is for tests, benchmarks and embedding. ``feed`` returns the requests completed by the
    new bytes, each with ``body`` set; a malformed request raises ``HttpError`` (and every
    later ``feed`` raises it again, as a connection would be closed).
    """
    cdef Parser parser
    cdef bytes rest          # an unfinished head (its scan state is relative to rest[0])
    cdef Request current
    cdef list body
    cdef object error

    def __cinit__(self, int max_line=8192, int max_field=8192, int max_head=65536,
                  int max_fields=100):
        self.parser = Parser(max_line, max_field, max_head, max_fields)
        self.rest = EMPTY
        self.current = None
        self.body = None
        self.error = None

    def feed(self, data):
        cdef list done = []
        cdef Py_ssize_t pos = 0, n, used
        cdef int rc
        cdef bytes chunk
        cdef const unsigned char *p
        if self.error is not None:
            raise self.error
        chunk = data if type(data) is bytes else bytes(data)
        if self.rest:
            chunk = self.rest + chunk
            self.rest = EMPTY
        p = <const unsigned char *>PyBytes_AS_STRING(chunk)
        n = len(chunk)
        while True:
            if self.current is None:
                if pos == n:
                    break
                rc = self.parser.scan_head(p + pos, n - pos)
                if rc == AGAIN:
                    self.rest = chunk[pos:] if pos else chunk
                    break
                if rc < 0:
                    return self._raise()
                self.current = self.parser.build(p + pos)
                if self.current is None:
                    return self._raise()
                pos += self.parser.pos
                self.parser.reset()
                self.parser.start_body(self.current)
                self.body = [] if not self.parser.body_done() else None
            if not self.parser.body_done():
                if pos == n:
                    break
                used = self.parser.feed_body(p + pos, n - pos, self.body)
                if used < 0:
                    return self._raise()
                pos += used
                if not self.parser.body_done():
                    break
            self._finish(done)
        return done

    cdef void _finish(self, list done):
        self.current.body = b"".join(self.body) if self.body else EMPTY
        done.append(self.current)
        self.current = None
        self.body = None

    def _raise(self):
        self.error = HttpError(self.parser.error_status, self.parser.error_reason)
        raise self.error

    @property
    def pending(self):
        """Bytes received but not yet part of a complete request."""
        return len(self.rest)
