# cython: language_level=3
"""Response heads from upstreams: the status line, the framing of the field lines, and the
head the client gets, made in one piece from the upstream's own bytes.

``scan_fields`` reads the framing (Content-Length, Transfer-Encoding, Connection tokens,
Upgrade) in C; ``relay_head`` then copies the end-to-end field lines as they came, byte for
byte, into the one ``bytes`` the client gets (no object per field), with our framing tail.
Hop-by-hop fields (RFC 9110 7.6.1) and those the upstream's Connection names are left out.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy
from expserver._http cimport Request, FieldLine, field_line, lower_bytes, ieq, list_item

from expserver import log


cdef class ResponseHead:
    """An upstream response head, as much as relaying it needs (fields: _relay.pxd)."""


cdef int parse_status_line(const unsigned char *p, Py_ssize_t n, ResponseHead head) except -2:
    """``HTTP/1.x SP 3DIGIT SP reason`` (p[:n] without CRLF); -1: invalid."""
    cdef Py_ssize_t i
    if n < 12 or p[0] != 72 or p[1] != 84 or p[2] != 84 or p[3] != 80 or p[4] != 47 \
            or p[5] != 49 or p[6] != 46 or not (48 <= p[7] <= 57) or p[8] != 32:
        return -1
    for i in range(9, 12):
        if not (48 <= p[i] <= 57):
            return -1
    if n > 12 and p[12] != 32:
        return -1
    for i in range(12, n):
        if p[i] < 32 and p[i] != 9 or p[i] == 127:
            return -1
    head.version = 10 if p[7] == 48 else 11
    head.status = (p[9] - 48) * 100 + (p[10] - 48) * 10 + (p[11] - 48)
    if head.status < 100 or head.status > 599:
        return -1
    return 0


cdef enum FieldKind:
    F_END_TO_END = 0    # relayed as received
    F_LENGTH = 1        # Content-Length: framing, checked and relayed only when it still holds
    F_CODING = 2        # Transfer-Encoding: framing, re-done for the client
    F_CONNECTION = 3
    F_UPGRADE = 4
    F_HOP = 5           # Keep-Alive, Proxy-Connection, TE, Trailer


cdef int field_kind(const unsigned char *p, Py_ssize_t n) noexcept:
    """What the field named p[:n] is to a proxy (hop-by-hop: RFC 9110 7.6.1)."""
    if n == 14:
        return F_LENGTH if ieq(p, n, b"content-length", 14) else F_END_TO_END
    if n == 17:
        return F_CODING if ieq(p, n, b"transfer-encoding", 17) else F_END_TO_END
    if n == 10:
        if ieq(p, n, b"connection", 10):
            return F_CONNECTION
        return F_HOP if ieq(p, n, b"keep-alive", 10) else F_END_TO_END
    if n == 7:
        if ieq(p, n, b"upgrade", 7):
            return F_UPGRADE
        return F_HOP if ieq(p, n, b"trailer", 7) else F_END_TO_END
    if n == 2:
        return F_HOP if ieq(p, n, b"te", 2) else F_END_TO_END
    if n == 16:
        return F_HOP if ieq(p, n, b"proxy-connection", 16) else F_END_TO_END
    return F_END_TO_END


cdef int scan_fields(const unsigned char *p, Py_ssize_t start, Py_ssize_t end,
                     ResponseHead head) except -2:
    """The framing of the field lines p[start:end] (validated by Parser.scan_head, the empty
    line included) into ``head``; -1: framing that cannot be relayed correctly."""
    cdef Py_ssize_t ls = start, i, vs, ve, ts, te_
    cdef FieldLine f
    cdef long long cl = -1
    cdef bint coded = False, close = False, keep = False
    cdef int kind
    head.named = None
    head.upgrade = None
    head.relayed = 0
    while p[ls] != 13:
        f = field_line(p, ls, end)
        vs, ve = f.value_start, f.value_end
        kind = field_kind(p + ls, f.colon - ls)
        if kind == F_END_TO_END:
            head.relayed += f.end + 2 - ls
        elif kind == F_LENGTH:
            if cl >= 0 or ve == vs or ve - vs > 18:
                return -1
            head.length_line = f.end + 2 - ls
            cl = 0
            for i in range(vs, ve):
                if not (48 <= p[i] <= 57):
                    return -1
                cl = cl * 10 + (p[i] - 48)
        elif kind == F_CODING:
            if coded or not ieq(p + vs, ve - vs, b"chunked", 7):
                return -1           # only "chunked", once, can be relayed correctly
            coded = True
        elif kind == F_UPGRADE:
            head.upgrade = PyBytes_FromStringAndSize(<const char *>p + vs, ve - vs)
        elif kind == F_CONNECTION:
            i = vs
            while i < ve:           # each token: close, keep-alive, or a field to drop
                i = list_item(p, i, ve, &ts, &te_)
                if ieq(p + ts, te_ - ts, b"close", 5):
                    close = True
                elif ieq(p + ts, te_ - ts, b"keep-alive", 10):
                    keep = True
                elif te_ > ts and field_kind(p + ts, te_ - ts) == F_END_TO_END:
                    if head.named is None:
                        head.named = set()
                    head.named.add(lower_bytes(p + ts, te_ - ts))
        ls = f.end + 2
    if coded and cl >= 0:
        return -1                   # RFC 9112 6.3: a smuggling signal; refuse it
    head.length = cl
    head.chunked = coded
    head.close = close or (head.version == 10 and not keep)
    return 0


cdef bint _relayed(const unsigned char *p, Py_ssize_t ls, Py_ssize_t colon, ResponseHead head,
                   bint with_length):
    cdef int kind = field_kind(p + ls, colon - ls)
    if kind == F_LENGTH:
        return with_length
    if kind != F_END_TO_END:
        return False
    return head.named is None or lower_bytes(p + ls, colon - ls) not in head.named


cdef bytes relay_head(const unsigned char *p, Py_ssize_t fields_start, Py_ssize_t end,
                      ResponseHead head, bint with_length, bytes tail):
    """The head for the client, made in one piece: ``HTTP/1.1``, the upstream's status line
    after its version, its end-to-end field lines as received (its Content-Length line too
    when ``with_length``), then ``tail`` (our framing and Connection lines, the empty line).
    p[fields_start:end] holds the field lines and the empty line; p[8] starts " 200 OK"."""
    cdef Py_ssize_t ls, size, n
    cdef Py_ssize_t status_end = fields_start - 2       # " 200 OK" is p[8:status_end]
    cdef bint no_reason = status_end == 12              # " 200": the SP is still due
    cdef FieldLine f
    cdef bytes out
    cdef char *q
    size = fields_start + no_reason + len(tail)
    if head.named is None:
        size += head.relayed + (head.length_line if with_length else 0)
    else:                           # fields named by Connection are left out too
        ls = fields_start
        while p[ls] != 13:
            f = field_line(p, ls, end)
            if _relayed(p, ls, f.colon, head, with_length):
                size += f.end + 2 - ls
            ls = f.end + 2
    out = PyBytes_FromStringAndSize(NULL, size)
    q = PyBytes_AS_STRING(out)
    memcpy(q, b"HTTP/1.1", 8)
    memcpy(q + 8, p + 8, status_end - 8)
    q += status_end
    if no_reason:
        q[0] = 32                   # status-line = HTTP-version SP status-code SP [reason]
        q += 1
    memcpy(q, b"\r\n", 2)
    q += 2
    ls = fields_start
    while p[ls] != 13:
        f = field_line(p, ls, end)
        n = f.end + 2 - ls
        if _relayed(p, ls, f.colon, head, with_length):
            memcpy(q, p + ls, n)
            q += n
        ls = f.end + 2
    memcpy(q, <const char *>tail, len(tail))
    return out


cdef bytes with_policy(Request req, int status, bytes relayed, bytes tail):
    """A relayed head (ending in one CRLF) passed through the route's response policy, which
    edits its field lines (header rules, CORS); then our framing ``tail``."""
    cdef Py_ssize_t start = relayed.find(b"\r\n") + 2
    cdef bytes block = relayed[start:len(relayed) - 2]
    try:
        block = req.policy.head(req, status, block)
    except Exception as exc:
        log.exception(f"the response policy for {req.target!r}", exc)
    return relayed[:start] + block + tail


