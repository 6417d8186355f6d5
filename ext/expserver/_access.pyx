# cython: language_level=3
"""The access log: one line per response, formatted in C, written in batches off the loop.

Theory of operation
-------------------
When a response head is queued, the connection makes a ``Record`` (request line, peer,
referer, user agent, start time, head size). When the response's last byte is queued, the
record goes into the connection's pipe behind it; when the pipe's sink has written
everything before it, the pipe calls ``Record.done(sent)``: the bytes between two records
are exactly one response, so the size logged is what the client was actually sent (a
client that leaves mid-download is logged with what it got, as nginx does). A connection
that closes with a response still open logs it with what went out.

``AccessLog.emit`` formats the line into one C buffer (no Python object per field: bytes
are copied, escaped as nginx does, numbers printed with snprintf). At 64 KiB, and every
second from the worker's timer, the buffer is handed to ``sink.submit`` (expserver/logs.py:
a writer thread behind a bounded queue), which never waits: when the queue is full the
lines are dropped and counted. So neither a slow disk nor a blocked stdout pipe can stall
the loop.

Formats: ``combined`` (nginx's, exactly), ``json`` (one object per line, Caddy's field
names), or a template of nginx-style ``$variables`` (``FIELDS``).
"""
import time

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdio cimport snprintf
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from expserver._sys cimport timespec, clock_gettime, CLOCK_MONOTONIC, CLOCK_REALTIME
from expserver._http cimport Request

DEF FLUSH_AT = 65536

# Template variables, in field-number order.
FIELDS = ("remote_addr", "time_local", "time_iso8601", "msec", "request", "request_method",
          "request_uri", "server_protocol", "host", "status", "body_bytes_sent", "bytes_sent",
          "http_referer", "http_user_agent", "request_time", "upstream_addr",
          "upstream_response_time", "ssl_protocol", "request_id")
cdef enum Field:
    F_REMOTE_ADDR, F_TIME_LOCAL, F_TIME_ISO, F_MSEC, F_REQUEST, F_METHOD, F_URI, F_PROTOCOL, \
    F_HOST, F_STATUS, F_BODY_BYTES, F_BYTES, F_REFERER, F_AGENT, F_REQUEST_TIME, F_UPSTREAM, \
    F_UPSTREAM_TIME, F_SSL, F_REQUEST_ID

COMBINED = '$remote_addr - - [$time_local] "$request" $status $body_bytes_sent ' \
           '"$http_referer" "$http_user_agent"'

cdef enum Kind:
    K_TEMPLATE = 0
    K_JSON = 1

cdef const char *HEX = b"0123456789ABCDEF"


cdef inline double monotonic() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double wall() noexcept:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def compile_template(str text):
    """``$name`` variables and literal text -> [(literal bytes, field number or -1)];
    ValueError names an unknown variable."""
    cdef list ops = []
    cdef Py_ssize_t i = 0, j, n = len(text)
    literal = []
    while i < n:
        c = text[i]
        if c == "$" and i + 1 < n and (text[i + 1].isalpha() or text[i + 1] == "_"):
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            name = text[i + 1:j]
            if name not in FIELDS:
                raise ValueError(f"unknown variable ${name}")
            ops.append(("".join(literal).encode("utf-8"), FIELDS.index(name)))
            literal = []
            i = j
        else:
            literal.append(c)
            i += 1
    ops.append(("".join(literal).encode("utf-8") + b"\n", -1))
    return ops


cdef class Record:
    """One response as the access log sees it (made by AccessLog.record)."""

    cdef int done(self, long long sent) except -1:
        """``sent``: the bytes of this response the client got (head included)."""
        cdef AccessLog log = self.log
        if log is not None:
            self.log = None
            log.emit(self, sent)
        return 0


cdef class AccessLog:

    def __cinit__(self):
        self.cap = FLUSH_AT + 16384
        self.buf = <char *>malloc(self.cap)
        if self.buf == NULL:
            raise MemoryError()

    def __init__(self, str format="combined", sink=None):
        if format == "json":
            self.kind = K_JSON
        else:
            self.kind = K_TEMPLATE
            self.ops = compile_template(COMBINED if format == "combined" else format)
        self.sink = sink

    def __dealloc__(self):
        free(self.buf)

    cdef Record record(self, object request, bytes peer, bytes tls, double started, int status,
                       long long head):
        cdef Request req = <Request>request
        cdef Record r = Record.__new__(Record)
        r.log = self
        r.peer = peer
        r.method = req.method
        r.target = req.target
        r.version = req.version
        r.host = req.host
        r.referer = req.get(b"referer")
        r.agent = req.get(b"user-agent")
        r.request_id = req.request_id
        r.tls = tls
        r.started = started
        r.status = status
        r.head = head
        r.upstream_time = -1
        return r

    # ------------------------------------------------------------ the buffer
    cdef int put(self, const char *p, Py_ssize_t n) except -1:
        cdef char *grown
        if self.used + n > self.cap:
            grown = <char *>realloc(self.buf, self.used + n + 16384)
            if grown == NULL:
                raise MemoryError()
            self.buf = grown
            self.cap = self.used + n + 16384
        memcpy(self.buf + self.used, p, n)
        self.used += n
        return 0

    cdef int put_bytes(self, bytes b) except -1:
        return self.put(PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))

    cdef int put_escaped(self, bytes b, bint json) except -1:
        """nginx's escaping (``"``, ``\\``, controls and bytes >= 0x7f as ``\\xHH``), or
        JSON's (``\\u00HH``: a byte that is not ASCII stays one character)."""
        cdef const unsigned char *p
        cdef Py_ssize_t i, n, start = 0
        cdef unsigned char c
        cdef char esc[6]
        if b is None:
            return self.put("-", 1) if not json else 0
        p = <const unsigned char *>PyBytes_AS_STRING(b)
        n = PyBytes_GET_SIZE(b)
        for i in range(n):
            c = p[i]
            if c >= 0x20 and c < 0x7f and c != 34 and c != 92:
                continue
            self.put(<const char *>p + start, i - start)
            start = i + 1
            if json:
                if c == 34 or c == 92:
                    esc[0] = 92
                    esc[1] = c
                    self.put(esc, 2)
                else:
                    esc[0] = 92
                    esc[1] = 117     # \u00HH
                    esc[2] = 48
                    esc[3] = 48
                    esc[4] = HEX[c >> 4]
                    esc[5] = HEX[c & 15]
                    self.put(esc, 6)
            else:
                esc[0] = 92
                esc[1] = 120         # \xHH
                esc[2] = HEX[c >> 4]
                esc[3] = HEX[c & 15]
                self.put(esc, 4)
        return self.put(<const char *>p + start, n - start)

    cdef int put_field(self, Record r, int field, long long size, double duration) except -1:
        cdef char num[48]
        cdef int k
        if field == F_REMOTE_ADDR:
            return self.put_bytes(r.peer)
        if field == F_TIME_LOCAL:
            return self.put_bytes(self.when)
        if field == F_TIME_ISO:
            return self.put_bytes(self.iso)
        if field == F_MSEC:
            k = snprintf(num, 48, "%.3f", wall())
            return self.put(num, k)
        if field == F_REQUEST:
            if r.method is None:        # a request the parser refused: its line as it came
                return self.put_escaped(r.target or None, False)
            self.put_escaped(r.method, False)
            self.put(" ", 1)
            self.put_escaped(r.target, False)
            return self.put(" HTTP/1.1" if r.version == 11 else " HTTP/1.0", 9)
        if field == F_METHOD:
            return self.put_escaped(r.method, False)
        if field == F_URI:
            return self.put_escaped(r.target, False)
        if field == F_PROTOCOL:
            return self.put("HTTP/1.1" if r.version == 11 else "HTTP/1.0", 8)
        if field == F_HOST:
            return self.put_escaped(r.host or None, False)
        if field == F_STATUS:
            k = snprintf(num, 48, "%d", r.status)
        elif field == F_BODY_BYTES:
            k = snprintf(num, 48, "%lld", size - r.head if size > r.head else 0)
        elif field == F_BYTES:
            k = snprintf(num, 48, "%lld", size)
        elif field == F_REFERER:
            return self.put_escaped(r.referer, False)
        elif field == F_AGENT:
            return self.put_escaped(r.agent, False)
        elif field == F_REQUEST_TIME:
            k = snprintf(num, 48, "%.3f", duration)
        elif field == F_UPSTREAM:
            return self.put_escaped(r.upstream, False)
        elif field == F_UPSTREAM_TIME:
            if r.upstream_time < 0:
                return self.put("-", 1)
            k = snprintf(num, 48, "%.3f", r.upstream_time)
        elif field == F_SSL:
            return self.put_escaped(r.tls, False)
        else:
            return self.put_escaped(r.request_id, False)
        return self.put(num, k)

    cdef int emit(self, Record r, long long sent) except -1:
        cdef double duration = monotonic() - r.started
        cdef long long now = <long long>wall()
        cdef tuple op
        if now != self.when_second:
            self.when_second = now
            local = time.localtime(now)
            self.when = time.strftime("%d/%b/%Y:%H:%M:%S %z", local).encode("ascii")
            self.iso = time.strftime("%Y-%m-%dT%H:%M:%S%z", local).encode("ascii")
        if self.kind == K_JSON:
            self.json(r, sent, duration)
        else:
            for op in self.ops:
                self.put_bytes(<bytes>op[0])
                if <int>op[1] >= 0:
                    self.put_field(r, <int>op[1], sent, duration)
        self.lines += 1
        if self.used >= FLUSH_AT:
            self.flush()
        return 0

    cdef int json(self, Record r, long long sent, double duration) except -1:
        """Caddy's access log fields (http.log.access), one object per line."""
        cdef char num[64]
        cdef int k = snprintf(num, 64, "{\"ts\":%.6f,\"request\":{\"remote_ip\":\"", wall())
        self.put(num, k)
        self.put_bytes(r.peer)
        self.put("\",\"proto\":\"", 11)
        self.put("HTTP/1.1" if r.version == 11 else "HTTP/1.0", 8)
        self.put("\",\"method\":\"", 12)
        self.put_escaped(r.method, True)
        self.put("\",\"host\":\"", 10)
        self.put_escaped(r.host, True)
        self.put("\",\"uri\":\"", 9)
        self.put_escaped(r.target, True)
        self.put("\",\"headers\":{", 13)
        if r.agent is not None:
            self.put("\"User-Agent\":[\"", 15)
            self.put_escaped(r.agent, True)
            self.put("\"]", 2)
        if r.referer is not None:
            if r.agent is not None:
                self.put(",", 1)
            self.put("\"Referer\":[\"", 12)
            self.put_escaped(r.referer, True)
            self.put("\"]", 2)
        self.put("}", 1)
        if r.tls is not None:
            self.put(",\"tls\":{\"proto\":\"", 17)
            self.put_bytes(r.tls)
            self.put("\"}", 2)
        k = snprintf(num, 64, "},\"status\":%d,\"size\":%lld,\"duration\":%.6f", r.status,
                     sent - r.head if sent > r.head else 0, duration)
        self.put(num, k)
        if r.upstream is not None:
            self.put(",\"upstream\":{\"address\":\"", 24)
            self.put_escaped(r.upstream, True)
            k = snprintf(num, 64, "\",\"duration\":%.6f}", r.upstream_time)
            self.put(num, k)
        if r.request_id is not None:
            self.put(",\"request_id\":\"", 15)
            self.put_escaped(r.request_id, True)
            self.put("\"", 1)
        return self.put("}\n", 2)

    def flush(self):
        """Hand the lines so far to the sink (which never waits; it may drop them)."""
        cdef bytes data
        cdef int lines = self.lines
        if self.used == 0:
            return
        data = PyBytes_FromStringAndSize(self.buf, self.used)
        self.used = 0
        self.lines = 0
        if self.sink is not None and self.sink.submit(data):
            self.written += lines
        else:
            self.dropped += lines

    # tests and embedders: log one answer without a connection
    def log(self, request, str peer, int status, long long sent, long long head=0,
            double started=0, bytes tls=None):
        cdef Record r = self.record(request, peer.encode("ascii"), tls, started or monotonic(),
                                    status, head)
        r.done(sent)
