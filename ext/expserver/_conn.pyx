# cython: language_level=3
"""Listeners and HTTP/1.1 connections: the per-request hot path.

Theory of operation
-------------------
A ``Listener`` accepts (accept4, non-blocking, up to 64 per wake-up) and makes one
``Connection`` per client. It pauses accepting for a moment on EMFILE/ENFILE instead of
spinning, and when ``max_connections`` is reached.

A ``Connection``'s ``state`` says what the next bytes from the client mean (h11 style: the
whole table is here, and nothing else moves the state)::

    state      deadline (unless blocked)   leads to
    HANDSHAKE  header_timeout -> close      IDLE: the TLS handshake completed
               (TLS listeners only)         CLOSED: it failed (plain HTTP gets nginx's 400
                                                  in clear text first), or the peer left
    IDLE       keepalive_timeout  -> close  HEAD: a byte of a new head arrives
    HEAD       header_timeout (total, from  IDLE/HEAD: the head is answered at once, no body
               the head's first byte) ->    BODY: its body is read (and discarded, or fed
               408, CLOSING                       to the deferred answer)
                                            WAIT: a deferred answer with no body to read
                                            CLOSING: an error answer (400, 413, ...), or the
                                                  answer is the last one (Connection: close)
    BODY       body_timeout (idle) -> close IDLE/HEAD: body read, answer already queued
                                            WAIT: body read, the deferred answer goes on
                                            CLOSING: the answer was the last; or a chunked
                                                  body that cannot be framed (400 if no
                                                  answer was queued yet)
    WAIT       none (the deferred's own)    IDLE/HEAD: ``task_done`` (reusable)
                                            CLOSING: ``task_done`` (not reusable)
                                            TUNNEL: ``start_tunnel`` (101)
    TUNNEL     body_timeout (idle) -> close CLOSED: either side closes
    CLOSING    -                            LINGER: the queued answers are all written
    LINGER     5 s -> close                 CLOSED: EOF from the client
    any        send_timeout while blocked   CLOSED: reset, error, or a timeout above

Beside the state: ``blocked`` (the socket is full, EPOLLOUT wanted), ``stalled`` (parsing
stopped because the pipe is full; any drain resumes it), ``read_eof`` (the client shut its
side: answer what is complete, then close), ``close_after`` (the answer being produced is
the last one), ``owed`` (a request was dispatched and no response head is queued for it:
what an internal error must still answer, with a 500), and ``task`` (the deferred answer).

Receive side: one buffer ``rbuf[rstart:rend]`` per connection, taken from the loop when
bytes arrive and given back when the connection is idle (so an idle keep-alive connection
holds no buffer). A head must fit in it (it grows up to the parser's limit).

Dispatch: one Python call per request, ``handler(request) -> (status, headers, body)``
(see expserver/response.py). Responses are queued in request order into the connection's
``Pipe``; pipelined requests are parsed only while the pipe is under its threshold, and
EPOLLIN is dropped while it is full (backpressure: a client that never reads costs one
pipe's worth of memory, not its whole request stream).

The connection owns framing: it adds Server, Date, Content-Length or Transfer-Encoding,
and Connection, drops bodies for HEAD/1xx/204/304, and decides keep-alive. After a
framing error it queues exactly one error response, stops parsing, and closes with a
lingering close (shutdown(SHUT_WR), then read and discard until EOF or a deadline) so the
client can read the answer instead of getting a reset.

Faults: an exception from the handler is answered 500; one from anywhere else on this
connection's path reaches ``on_error`` (via the loop): the deferred answer, if any, answers
502 or cuts the connection (``Deferred.fault``); else a request still owed gets a 500 and
the connection closes after it; else it just closes. Each is logged once.
"""
import email.utils
import http
import socket
import ssl
import time

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdlib cimport realloc, free
from libc.string cimport memmove
from libc.stdint cimport uint32_t
from expserver._sys cimport *
from expserver._loop cimport Loop, Handle, SMALL_BUFFER
from expserver._pipe cimport Pipe, FileRange, FLUSH_AGAIN, FLUSH_ERROR, join_bytes, tls_recv, \
    tls_pending, tls_direct_check, tls_keep_session
from expserver._http cimport Parser, Request, AGAIN

from expserver import log
from expserver.pages import page as error_page

DEF LINGER_SECONDS = 5.0
DEF DRAIN_GRACE = 1.0
DEF ACCEPT_BATCH = 64

cdef bytes CRLF = b"\r\n"
cdef bytes HEAD_METHOD = b"HEAD"
cdef bytes CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
cdef bytes CONN_CLOSE = b"Connection: close\r\n"
cdef bytes CONN_KEEP = b"Connection: keep-alive\r\n"
cdef bytes TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
cdef bytes CT_HTML = b"Content-Type: text/html\r\n"
# nginx's answer to plain HTTP on a TLS port, in clear text
cdef bytes PLAIN_ON_TLS = (
    b"HTTP/1.1 400 Bad Request\r\nServer: eXpServer\r\nContent-Type: text/html\r\n"
    b"Content-Length: 197\r\nConnection: close\r\n\r\n"
    b"<!DOCTYPE html>\n<html>\n<head><title>400 Bad Request</title></head>\n<body>\n"
    b"<h1>400 Bad Request</h1>\n<p>The plain HTTP request was sent to HTTPS port</p>\n"
    b"<hr><p>eXpServer</p>\n</body>\n</html>\n")
# what a connection was doing when its deadline passed, by state (C_HANDSHAKE first)
cdef tuple TIMED_OUT = ("in the TLS handshake", "while idle", "reading the request head",
                        "reading the request body", "waiting for its answer", "in a tunnel",
                        "sending its last answers", "lingering", "closed")
cdef object _socket = socket.socket
cdef object SOCK_STREAM_ = socket.SOCK_STREAM
cdef object SSLWantReadError = ssl.SSLWantReadError
cdef object SSLWantWriteError = ssl.SSLWantWriteError
cdef object SSLError = ssl.SSLError

# "HTTP/1.1 200 OK\r\nServer: eXpServer\r\nDate: " per status, built once
cdef dict STATUS_LINES = {}
cdef bytes SERVER_LINE = b"Server: eXpServer\r\nDate: "

cdef bytes status_prefix(int status):
    cdef bytes line = STATUS_LINES.get(status)
    if line is None:
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason.encode("ascii")) + SERVER_LINE
        STATUS_LINES[status] = line
    return line

# --------------------------------------------------------------------- Date cache
cdef bytes _date = b""
cdef double _date_until = 0

cdef inline bytes http_date(double now):
    global _date, _date_until
    if now >= _date_until:
        wall = time.time()
        _date = email.utils.formatdate(wall, usegmt=True).encode("ascii") + CRLF
        _date_until = now + (1.0 - (wall % 1.0))
    return _date


# Upper bounds (seconds) of the request-duration histogram's buckets; the last is +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0)
cdef double BOUNDS[13]
for _i, _b in enumerate(DURATION_BUCKETS):
    BOUNDS[_i] = _b


cdef class Stats:
    """Counters of one worker (read by the metrics route)."""

    def histogram(self):
        """Responses per duration bucket (not cumulative), +Inf last."""
        return [self.hist[i] for i in range(14)]


cdef class Settings:
    """Per-listener limits and timeouts (seconds). Built once from the config."""

    def __init__(self, keepalive_timeout=75.0, header_timeout=60.0, body_timeout=60.0,
                 send_timeout=60.0, max_body_size=1048576, max_line=8192, max_field=8192,
                 max_head=65536, max_fields=100, pipe_threshold=262144,
                 max_connections=10000):
        self.keepalive_timeout = keepalive_timeout
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.send_timeout = send_timeout
        self.max_body_size = max_body_size
        self.max_line = max_line
        self.max_field = max_field
        self.max_head = max_head
        self.max_fields = max_fields
        self.pipe_threshold = pipe_threshold
        self.max_connections = max_connections


cdef class Core:
    """What all listeners of one worker share: the loop, counters, live connections."""

    def __init__(self, Loop loop):
        self.loop = loop
        self.stats = Stats()
        self.connections = set()
        self.draining = False

    def drain(self):
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        self.draining = True
        for c in list(self.connections):
            (<Connection>c).drain()

    def close_all(self):
        for c in list(self.connections):
            (<Connection>c).close()


cdef str peer_string(sockaddr_storage *sa):
    cdef char buf[64]
    if sa.ss_family == AF_INET:
        inet_ntop(AF_INET, &(<sockaddr_in *>sa).sin_addr, buf, 64)
    elif sa.ss_family == AF_INET6:
        inet_ntop(AF_INET6, &(<sockaddr_in6 *>sa).sin6_addr, buf, 64)
    else:
        return "unix"
    return buf.decode("ascii")


cdef class Listener(Handle):
    """A listening socket; ``handler`` answers the requests of its connections."""

    def __init__(self, Core core, sock, handler, Settings settings):
        self.core = core
        self.loop = core.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.handler = handler
        self.settings = settings
        self.paused = False
        self.tls_context = None
        self.access_log = None

    def start(self):
        self.paused = False
        self.watch(EPOLLIN)

    def stop(self):
        """Stop accepting and close the socket, so the kernel refuses new connections."""
        self.unwatch()
        self.set_deadline(0)
        self.paused = True
        self.sock.close()

    cdef int on_events(self, uint32_t events) except -1:
        cdef sockaddr_storage sa
        cdef socklen_t salen
        cdef int cfd, one = 1
        cdef Connection c
        cdef Stats stats = self.core.stats
        for _ in range(ACCEPT_BATCH):
            if stats.conn_current >= self.settings.max_connections:
                self._pause(0.1)
                return 0
            salen = sizeof(sa)
            cfd = accept4(self.fd, <sockaddr *>&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC)
            if cfd < 0:
                if errno == EAGAIN or errno == EINTR or errno == ECONNABORTED:
                    return 0
                stats.conn_accepted_error += 1
                if errno == EMFILE or errno == ENFILE or errno == ENOBUFS or errno == ENOMEM:
                    self._pause(0.1)   # out of descriptors: wait, never spin
                return 0
            setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
            self.accept_fd(cfd, peer_string(&sa))
        return 0

    cdef Connection accept_fd(self, int fd, str peer):
        cdef Connection c = Connection.__new__(Connection)
        c.init(self, fd, peer)
        return c

    def adopt(self, int fd, str peer="test"):
        """Tests: serve an already connected socket (a socketpair end) as a client."""
        return self.accept_fd(fd, peer)

    cdef int on_error(self, BaseException exc) except -1:
        log.exception("accepting connections", exc)
        self._pause(0.1)            # never stop listening for good
        return 0

    cdef void _pause(self, double seconds):
        # the Listener stays alive through the server's reference while unregistered
        if not self.paused:
            self.paused = True
            self.unwatch()
            self.set_deadline(self.loop.now + seconds)

    cdef int on_timeout(self) except -1:
        if self.paused and not self.core.draining:
            self.paused = False
            self.watch(EPOLLIN)
        return 0


cdef class Deferred:
    """Base of answers that complete later; see _conn.pxd. The defaults do nothing."""

    cdef int start(self, Connection conn, Request req) except -1:
        return 0

    cdef bint body_full(self):
        return False

    cdef int on_body(self, list chunks, bint done) except -1:
        return 0

    cdef int on_drain(self) except -1:
        return 0

    cdef int abort(self) except -1:
        return 0

    cdef int fault(self, BaseException exc) except -1:
        return 0


cdef class Later(Deferred):
    """An answer that a Python object gives when it is ready (see expserver/response.py).

    Subclass it in Python and override ``started(req)`` (called once, when the request head
    is complete), ``body(data, done)`` (the request body as it arrives; ``done`` on the last
    piece) and ``aborted()`` (the client went away: nothing can be sent any more). Answer
    with ``respond(status, headers, body)`` at any time, from any callback of the loop,
    ``started`` included. Until then the connection waits without a deadline of its own:
    a Later that may never answer must arrange its own timeout (``Loop.call_later``).
    """

    cdef int start(self, Connection conn, Request req) except -1:
        self.conn = conn
        self.req = req
        self.started(req)
        return 0

    cdef int on_body(self, list chunks, bint done) except -1:
        if chunks or done:
            self.body(join_bytes(chunks), done)
        return 0

    cdef int abort(self) except -1:
        self.conn = None
        self.aborted()
        return 0

    cdef int fault(self, BaseException exc) except -1:
        self.respond(500, CT_HTML, error_page(500))     # nothing if it had answered
        return 0

    def started(self, req):
        pass

    def body(self, data, done):
        pass

    def aborted(self):
        pass

    @property
    def request(self):
        return self.req

    @property
    def answered(self):
        return self.conn is None

    def hand_over(self, Deferred other):
        """Let ``other`` (a handler's deferred answer, such as the proxy's exchange) answer
        instead, as if the handler had returned it; False if the client has gone."""
        cdef Connection conn = self.conn
        if conn is None:
            return False
        self.conn = None
        conn.task = other
        other.start(conn, self.req)
        return True

    def respond(self, int status, bytes headers, body=None):
        """Send the answer (framed by the connection, as a handler's tuple is); False if the
        client has gone or an answer was already given."""
        cdef Connection conn = self.conn
        if conn is None:
            return False
        self.conn = None
        conn.respond(self.req, status, headers, body)
        if conn.task is self:
            conn.task_done(True)    # a body still arriving is read and discarded
        return True


cdef class Connection(Handle):

    cdef void init(self, Listener listener, int fd, str peer):
        self.listener = listener
        self.core = listener.core
        self.settings = listener.settings
        self.loop = listener.loop
        self.fd = fd
        self.peer = peer
        self.peer_ascii = peer.encode("ascii")
        self.parser = Parser(self.settings.max_line, self.settings.max_field,
                             self.settings.max_head, self.settings.max_fields)
        self.out = Pipe(self.settings.pipe_threshold)
        self.state = C_IDLE
        self.core.connections.add(self)
        self.core.stats.conn_accepted += 1
        self.core.stats.conn_current += 1
        if self.core.draining:
            self.close_after = True
        if listener.tls_context is not None:
            self.start_tls(listener.tls_context)
        else:
            self.watch(EPOLLIN)
            self.set_deadline(self.loop.now + self.settings.keepalive_timeout)

    # ---------------------------------------------------------------- TLS
    cdef int start_tls(self, object context) except -1:
        """HANDSHAKE: within header_timeout, or the connection is closed (never blocking)."""
        self.state = C_HANDSHAKE
        self.set_deadline(self.loop.now + self.settings.header_timeout)
        # family and type given: no getsockname/getsockopt calls to find them out
        self.tls_sock = _socket(self.listener.sock.family, SOCK_STREAM_, 0, self.fd)
        self.tls_sock.setblocking(False)    # its timeout 0: OpenSSL never waits in C
        self.tls = context._wrap_socket(self.tls_sock, True, None, owner=self, session=None)
        tls_direct_check(self.tls, self.fd, True)
        self.handshake()
        return 0

    cdef int handshake(self) except -1:
        try:
            self.tls.do_handshake()
        except SSLWantReadError:
            self.watch(EPOLLIN)
            return 0
        except SSLWantWriteError:
            self.watch(EPOLLOUT)
            return 0
        except (SSLError, OSError) as exc:
            return self.tls_failed(exc)
        self.state = C_IDLE
        self.tls_proto = self.tls.version().encode("ascii")
        self.set_deadline(self.loop.now + self.settings.keepalive_timeout)
        self.watch(EPOLLIN)
        if tls_pending(self.tls):
            self.read()             # a request that came with the handshake's last flight
        return 0

    cdef int tls_failed(self, BaseException exc) except -1:
        reason = getattr(exc, "reason", None)
        if reason == "HTTP_REQUEST":
            # plain HTTP on a TLS port: nginx's clear-text 400 (best effort, then close)
            send(self.fd, <const char *>PLAIN_ON_TLS, len(PLAIN_ON_TLS), MSG_NOSIGNAL)
        if log.enabled("info"):
            log.info(f"TLS handshake with {self.peer} failed: {reason or exc}")
        self.core.stats.conn_error += 1
        self.close()
        return 0

    def read_pending(self):
        """TLS: OpenSSL holds decrypted bytes the socket will not announce again."""
        if C_IDLE <= self.state < C_LINGER and self.interest & EPOLLIN and self.tls is not None:
            self.read()

    @property
    def tls_object(self):
        """The _ssl._SSLSocket of a TLS connection (for the SNI callback), or None."""
        return self.tls

    def __dealloc__(self):
        if self.rbuf != NULL:
            free(self.rbuf)

    cdef str describe(self):
        cdef Request req = self.current
        if req is None or not self.owed:
            return f"connection from {self.peer}"
        return f"connection from {self.peer} ({req.method.decode('latin-1')} " \
               f"{req.target.decode('latin-1')[:200]})"

    # ---------------------------------------------------------------- events
    cdef int on_events(self, uint32_t events) except -1:
        if self.state == C_HANDSHAKE:
            self.handshake()
            return 0
        if events & EPOLLOUT:
            self.flush()
        if self.state == C_CLOSED:
            return 0
        if events & EPOLLIN and self.interest & EPOLLIN:
            if self.state == C_LINGER:
                self.linger_read()
            else:
                self.read()
        elif events & (EPOLLERR | EPOLLHUP | EPOLLRDHUP):
            self.close()          # includes a client leaving while its answer is pending
        return 0

    cdef int on_timeout(self) except -1:
        cdef int st = self.state
        if st == C_LINGER or st == C_CLOSED:
            self.close()
            return 0
        self.core.stats.conn_timeout += 1
        if st != C_IDLE and log.enabled("info"):     # an idle keep-alive ending is routine
            log.info(f"the {self.describe()} timed out "
                     f"{'sending the answer' if self.blocked else TIMED_OUT[st + 1]}")
        if st == C_HEAD and not self.blocked:
            self.fail(408)                    # a head was started and not finished
        else:
            self.close()                      # idle, or a body, tunnel or send timeout
        return 0

    cdef int on_error(self, BaseException exc) except -1:
        cdef Deferred task = self.task
        log.exception(f"internal error on the {self.describe()}", exc)
        if self.state == C_CLOSED:
            return 0
        if task is not None:
            task.fault(exc)             # answers 502 if nothing was relayed, else cuts
            if self.task is not task:
                return 0                # it ended itself
            self.end_task()
            task.abort()
        if self.owed and self.state < C_LINGER:
            self.close_after = True
            self.respond_error(self.current, 500)
            self.state = C_CLOSING
            self.rstart = self.rend
            self.flush()
        else:
            self.close()
        return 0

    cdef void drain(self):
        """Graceful stop: a busy connection closes after its answer; an idle one gets
        DRAIN_GRACE seconds for a request already on its way (answered with Connection:
        close, so the client opens its next connection to a worker that stays), so a client
        never sees its request met by a close."""
        self.close_after = True
        if self.state == C_IDLE and self.task is None:
            if self.out.empty():
                self.set_deadline(self.loop.now + DRAIN_GRACE)
            else:
                self.state = C_CLOSING

    # ---------------------------------------------------------------- reading
    cdef int read(self) except -1:
        cdef ssize_t n
        if self.rbuf == NULL:
            self.rbuf = self.loop.take_buffer(SMALL_BUFFER)
            self.rcap = SMALL_BUFFER
            self.rstart = self.rend = 0
        elif self.rend == self.rcap:
            if self.rstart == 0 and (self.state == C_WAIT or self.out.full()):
                # a full buffer we cannot parse yet: stop reading until the answer is out
                self.watch(EPOLLRDHUP | (EPOLLOUT if self.blocked else 0))
                return 0
            self.make_room()
        if self.tls is None:
            n = recv(self.fd, self.rbuf + self.rend, self.rcap - self.rend, 0)
        else:
            n = tls_recv(self.tls, self.rbuf + self.rend, self.rcap - self.rend)
        if n > 0:
            if self.state == C_IDLE:
                self.state = C_HEAD
                self.head_deadline = self.loop.now + self.settings.header_timeout
            self.rend += n
            self.core.stats.recv_bytes += n
            self.process()
        elif n == 0:
            self.read_eof = True
            if self.task is not None:
                self.close()      # the client left before its answer: end the exchange
            else:
                self.process()    # answer what is complete, then close (flush does)
        elif errno != EAGAIN and errno != EINTR:
            self.core.stats.conn_error += 1
            self.close()
        return 0

    cdef int make_room(self) except -1:
        cdef Py_ssize_t pending = self.rend - self.rstart
        cdef unsigned char *grown
        if self.rstart > 0:
            memmove(self.rbuf, self.rbuf + self.rstart, pending)
            self.rstart = 0
            self.rend = pending
        else:
            # an unfinished head fills the buffer: grow it (the parser's limits end this)
            grown = <unsigned char *>realloc(self.rbuf, self.rcap * 2)
            if grown == NULL:
                raise MemoryError()
            self.rbuf = grown
            self.rcap *= 2
        return 0

    cdef int process(self) except -1:
        """Parse and answer what the buffer holds, as far as the state and the pipe allow."""
        cdef int rc, st
        cdef Request req
        while self.rend > self.rstart:
            st = self.state
            if st == C_IDLE or st == C_HEAD:
                if self.out.full():
                    self.stalled = True     # no new request until the answers before it are out
                    break
                rc = self.parser.scan_head(self.rbuf + self.rstart, self.rend - self.rstart)
                if rc == AGAIN:
                    self.state = C_HEAD
                    break
                if rc < 0:
                    self.fail(-rc)
                    break
                req = self.parser.build(self.rbuf + self.rstart)
                if req is None:
                    self.fail(self.parser.error_status)
                    break
                self.rstart += self.parser.pos
                self.parser.reset()
                self.head_deadline = self.loop.now + self.settings.header_timeout
                self.dispatch(req)
            elif st == C_BODY or st == C_TUNNEL:
                if not self.feed_body():
                    break
            else:
                break       # WAIT: later requests wait their turn; CLOSING and on: nothing
        if self.state >= C_LINGER:
            return 0
        if self.rstart == self.rend:
            self.rstart = self.rend = 0
            if self.state == C_HEAD:
                self.state = C_IDLE
            if self.state == C_IDLE and self.rbuf != NULL:
                self.loop.give_buffer(self.rbuf, self.rcap)    # idle: hold no buffer
                self.rbuf = NULL
        self.flush()
        return 0

    cdef int feed_body(self) except -1:
        """Body bytes of the current request (BODY, TUNNEL): 1 to go on, 0 to stop."""
        cdef Py_ssize_t used
        cdef list chunks
        cdef bint done
        cdef Deferred task = self.task  # a strong reference: the call may end the task
        if task is not None:
            if task.body_full():
                return 0                # the upstream is slower than the client: wait
            chunks = []
            used = self.parser.feed_body(self.rbuf + self.rstart, self.rend - self.rstart,
                                         chunks)
            if used < 0:
                # a body we cannot frame cannot be forwarded: the deferred ends, and the
                # client hears why if it has not had an answer yet (RFC 9112 7.1: SHOULD)
                self.end_task()
                task.abort()
                if self.owed:
                    self.close_after = True
                    self.rstart = self.rend
                    self.state = C_CLOSING
                    self.respond_error(self.current, self.parser.error_status or 400)
                    self.flush()
                else:
                    self.close()
                return 0
            self.rstart += used
            done = self.parser.body_done()
            if done:
                self.state = C_WAIT
            task.on_body(chunks, done)
            return 1
        used = self.parser.feed_body(self.rbuf + self.rstart, self.rend - self.rstart, None)
        if used < 0:
            # its answer is already queued: one answer per request, then close
            self.close_after = True
            self.state = C_CLOSING
            self.rstart = self.rend
            return 0
        self.rstart += used
        if self.parser.body_done():
            self.next_request()
        elif 0 < self.current.body_limit < self.parser.received:
            # a chunked body past the limit: its answer is out, the rest is not read
            self.close_after = True
            self.state = C_CLOSING
            self.rstart = self.rend
            return 0
        return 1

    cdef int next_request(self) except -1:
        """The current request is fully read and answered (or being answered)."""
        if self.close_after or self.core.draining:
            self.state = C_CLOSING
            self.rstart = self.rend     # pipelined requests behind a last answer are dropped
        else:
            self.state = C_HEAD if self.rend > self.rstart else C_IDLE
        return 0

    # ---------------------------------------------------------------- requests
    cdef int dispatch(self, Request req) except -1:
        cdef bint has_body = req.chunked or req.content_length > 0
        cdef Deferred task
        cdef object body = None
        self.core.stats.req_total += 1
        self.started = self.loop.now
        self.body_timeout = self.settings.body_timeout
        self.current = req
        self.owed = True
        req.peer = self.peer
        req.secure = self.tls is not None
        req.body_limit = self.settings.max_body_size
        if has_body and 0 < self.settings.max_body_size < req.content_length:
            self.close_after = True
            self.respond_error(req, 413)
            self.next_request()
            return 0
        try:
            answer = self.listener.handler(req)
            if type(answer) is tuple:
                status, headers, body = <tuple>answer
                if not 100 <= status <= 599:
                    raise ValueError(f"status {status} is not an HTTP status")
                task = None
            else:
                task = <Deferred?>answer
        except Exception as exc:
            if type(body) is FileRange:
                self.close_file(body)       # a refused answer: its file is not sent
            log.exception(f"the handler of the {self.describe()}", exc)
            self.close_after = True
            self.respond_error(req, 500)
            self.next_request()
            return 0
        if task is not None:
            # a deferred answer (the proxy): it reads the body and writes the response
            if has_body:
                if req.expect_continue:
                    self.out.push(CONTINUE_100)
                self.parser.start_body(req)
                self.state = C_BODY
            else:
                self.state = C_WAIT
            self.task = task
            self.out.hold()
            task.start(self, req)       # may end at once (task_done)
            return 0
        if has_body and (req.expect_continue or status == 413):
            # the handler does not read bodies (or refused this one): answer now, and since we
            # cannot know whether the client will send the body anyway, close afterwards
            self.close_after = True
        try:
            self.respond(req, status, headers, body)
        except BaseException:
            # e.g. headers that are not bytes: the fault is answered 500 (on_error), and the
            # file, not queued, is closed here (the pipe's own are closed by the pipe)
            if type(body) is FileRange:
                self.close_file(body)
            raise
        if has_body and not self.close_after:
            self.parser.start_body(req)
            self.state = C_BODY         # read and discard it: the next request follows
        else:
            self.next_request()
        return 0

    cdef int respond_error(self, Request req, int status) except -1:
        self.respond(req, status, CT_HTML, error_page(status))
        return 0

    cdef int respond(self, Request req, int status, bytes headers, object body) except -1:
        cdef bint close
        cdef bint head_only = req.method is HEAD_METHOD or req.method == HEAD_METHOD
        cdef object framing
        cdef type t
        cdef object given = body
        if req.policy is not None:
            # the route's response policy: header rules, CORS, error pages (expserver.policy)
            try:
                status, headers, body = req.policy.answer(req, status, headers, body)
            except Exception as exc:
                log.exception(f"the response policy of the {self.describe()}", exc)
            if body is not given and type(given) is FileRange:
                self.close_file(given)      # replaced (an error page): its file is not sent
        close = self.close_after or not req.keep_alive or self.core.draining
        t = type(body)
        if status < 200 or status == 204 or status == 304:
            framing = b""
            if t is FileRange:
                self.close_file(body)
            body = None
            t = type(None)              # closed: nothing below may touch it again
        elif t is bytes:
            framing = b"Content-Length: %d\r\n" % len(<bytes>body)
        elif body is None:
            framing = b"Content-Length: 0\r\n"
        elif t is FileRange:
            if (<FileRange>body).length < 0 or (<FileRange>body).offset < 0:
                text = repr(body)
                self.close_file(body)
                raise ValueError(f"{text} is not a part of a file")    # still owed its 500
            framing = b"Content-Length: %d\r\n" % (<FileRange>body).length
        else:
            # an iterator source; one that is not iterable raises here, before its head is
            # queued, so the request is still owed its 500
            body = iter(body)
            if req.version == 11:
                framing = TE_CHUNKED
            else:
                framing = b""   # HTTP/1.0 stream: delimited by closing
                close = True
        if close:
            self.close_after = True
        self.push_head(req, join_bytes([
            status_prefix(status), http_date(self.loop.now), headers, framing,
            CONN_CLOSE if close else (CONN_KEEP if req.version == 10 else b""), CRLF]), status)
        if head_only or body is None:
            if t is FileRange:
                self.close_file(body)
        elif t is bytes:
            self.out.push(<bytes>body)
        elif t is FileRange:
            if (<FileRange>body).length > 0:
                self.out.push_file((<FileRange>body).fd, (<FileRange>body).offset,
                                   (<FileRange>body).length, (<FileRange>body).shared)
                (<FileRange>body).fd = -1   # the pipe's now: it closes it, nothing else may
                (<FileRange>body).shared = None
            else:
                self.close_file(body)
        else:
            self.out.push_source(body, req.version == 11)
        self.end_record()
        if req.done is not None:
            self.finished(req)
        return 0

    cdef int finished(self, Request req) except -1:
        """``req``'s answer is complete, or will never be (its hook, once)."""
        hook, req.done = req.done, None
        if hook is not None:
            try:
                hook()
            except Exception as exc:
                log.exception(f"the end of the {self.describe()}", exc)
        return 0

    cdef int push_head(self, Request req, bytes head, int status) except -1:
        """Queue the response head of ``req`` (every route type comes here)."""
        cdef object log = req.access_log
        if log is None:
            log = self.listener.access_log
        if log is not None and log is not False:
            self.end_record()
            self.record = (<AccessLog>log).record(req, self.peer_ascii, self.tls_proto,
                                                  self.started, status, len(head))
        self.out.push(head)
        self.owed = False
        self.count(status)
        return 0

    cdef int end_record(self) except -1:
        """The response being produced is all queued: log it when the client has it."""
        cdef Record record = self.record
        if record is not None:
            self.record = None
            self.out.push_record(record)
        return 0

    cpdef note_upstream(self, bytes address, double seconds):
        """The proxy's peer and its time to the response head, for the access log."""
        if self.record is not None:
            self.record.upstream = address
            self.record.upstream_time = seconds

    cdef int count(self, int status) except -1:
        cdef Stats stats = self.core.stats
        cdef double elapsed
        if status < 200:
            stats.res_1xx += 1
        elif status < 300:
            stats.res_2xx += 1
        elif status < 400:
            stats.res_3xx += 1
        elif status < 500:
            stats.res_4xx += 1
        else:
            stats.res_5xx += 1
        elapsed = self.loop.update_time() - self.started
        stats.res_time_total += elapsed
        if elapsed > stats.res_time_peak:
            stats.res_time_peak = elapsed
        cdef int b = 0
        while b < 13 and elapsed > BOUNDS[b]:
            b += 1
        stats.hist[b] += 1
        return 0

    cdef void close_file(self, FileRange fr):
        if fr.fd >= 0 and fr.shared is None:
            close(fr.fd)
        fr.fd = -1
        fr.shared = None

    cdef int fail(self, int status) except -1:
        """A request we cannot frame: one error response, then a lingering close."""
        cdef Request req = Request.__new__(Request)
        cdef Py_ssize_t end = self.rstart
        cdef Py_ssize_t limit = min(self.rend, self.rstart + 2048)
        while end < limit and self.rbuf[end] != 13 and self.rbuf[end] != 10:
            end += 1
        req.method = None               # the access log shows the line as it came
        req.target = PyBytes_FromStringAndSize(<char *>self.rbuf + self.rstart,
                                               end - self.rstart) if self.rbuf != NULL else b""
        req.headers = []
        req.version = 11
        req.keep_alive = False
        self.started = self.loop.now
        self.close_after = True
        self.rstart = self.rend         # never parse another request from these bytes
        self.state = C_CLOSING
        self.respond(req, status, CT_HTML, error_page(status))
        self.flush()
        return 0

    def resume(self):
        if self.state < C_LINGER:
            try:
                self.process()
            except BaseException as exc:
                # a deferred call, not an event: its faults go where the events' go
                self.loop.fault(self, exc)

    cdef int end_task(self) except -1:
        self.task = None
        self.out.release()
        return 0

    cdef int task_done(self, bint reusable) except -1:
        """The deferred answer is complete (``reusable``: the connection may go on)."""
        self.end_task()
        self.end_record()
        if self.current is not None and self.current.done is not None:
            self.finished(self.current)
        self.head_deadline = self.loop.now + self.settings.header_timeout
        if not reusable:
            self.close_after = True
        if self.state == C_BODY:
            if self.close_after:
                self.state = C_CLOSING  # the rest of the body is not read
                self.rstart = self.rend
            # else: the rest of the body is read and discarded, then the next request
        elif self.state == C_WAIT or self.state == C_TUNNEL:
            self.next_request()
        if self.state != C_CLOSED:
            try:
                self.process()          # answers pipelined requests, then flushes
            except BaseException as exc:
                # this connection's fault (a pipelined request's answer), not its caller's:
                # the caller is the deferred's upstream, whose on_error cannot answer here
                self.loop.fault(self, exc)
        return 0

    cdef int start_tunnel(self) except -1:
        """After a 101: every further client byte belongs to the task, until either closes."""
        self.parser.start_framing(False, -1, True)
        self.state = C_TUNNEL
        self.close_after = True
        self.process()                  # bytes that came with the upgrade request
        return 0

    # ---------------------------------------------------------------- writing
    cdef int flush(self) except -1:
        cdef Deferred task
        cdef long long before = self.out.sent
        cdef int r = self.out.flush(self.fd) if self.tls is None else self.out.flush_tls(self.tls)
        self.core.stats.send_bytes += self.out.sent - before
        if r == FLUSH_ERROR:
            self.core.stats.conn_error += 1
            self.close()
            return 0
        self.blocked = r == FLUSH_AGAIN
        if self.task is not None:
            if self.out.has_room():
                task = self.task
                task.on_drain()         # the exchange may read its upstream again
                if self.state == C_CLOSED:
                    return 0
        elif not self.blocked:
            if self.state == C_CLOSING:
                self.start_linger()
                return 0
            if self.stalled:
                # pipelined requests waited for the answers before them to go out (however
                # many sends that took): parse them on the next loop turn (no process/flush
                # recursion), the head deadline starting again
                self.stalled = False
                self.head_deadline = self.loop.now + self.settings.header_timeout
                self.loop.call_soon(self.resume)
            if self.read_eof:
                self.close()
                return 0
        self.arm_deadline(before)
        self.update_interest()
        return 0

    cdef int arm_deadline(self, long long sent_before) except -1:
        """The one deadline that governs now: send while blocked (reset on progress), else
        the state's (see the table above)."""
        cdef int st = self.state
        cdef double now = self.loop.now
        if self.blocked:
            if self.out.sent != sent_before or self.deadline == 0 or \
                    self.deadline > now + self.settings.send_timeout:
                self.set_deadline(now + self.settings.send_timeout)
        elif st == C_BODY or st == C_TUNNEL:
            self.set_deadline(now + self.body_timeout)
        elif st == C_WAIT:
            self.set_deadline(0)        # the exchange's own deadlines govern
        elif st == C_HEAD:
            self.set_deadline(self.head_deadline)
        elif st == C_IDLE:
            self.set_deadline(now + self.settings.keepalive_timeout)
        return 0

    cdef int update_interest(self) except -1:
        cdef uint32_t ev
        cdef int st = self.state
        if st == C_CLOSED:
            return 0
        if st == C_LINGER:
            ev = EPOLLIN
        elif self.read_eof:
            ev = 0
        elif st == C_BODY or st == C_TUNNEL:
            ev = EPOLLRDHUP if self.task is not None and self.task.body_full() else EPOLLIN
        elif st == C_WAIT:
            # reading on while the answer is pending notices a client that leaves; a full
            # buffer stops it (see read)
            ev = EPOLLRDHUP if self.rbuf != NULL and self.rend - self.rstart == self.rcap \
                else EPOLLIN
        elif st == C_CLOSING or self.out.full():
            ev = 0
        else:
            ev = EPOLLIN
        if self.blocked:
            ev |= EPOLLOUT
        self.watch(ev)
        if self.tls is not None and ev & EPOLLIN and tls_pending(self.tls):
            self.loop.call_soon(self.read_pending)
        return 0

    cdef int start_linger(self) except -1:
        if self.read_eof:
            self.close()
            return 0
        if self.tls is not None:
            try:
                self.tls.shutdown()     # close_notify: our side of TLS is done
            except Exception:
                pass                    # the peer's close_notify is not awaited
        shutdown(self.fd, SHUT_WR)
        self.state = C_LINGER
        self.out.clear()
        if self.rbuf != NULL:
            self.loop.give_buffer(self.rbuf, self.rcap)
            self.rbuf = NULL
        self.rstart = self.rend = 0
        self.watch(EPOLLIN)
        self.set_deadline(self.loop.now + LINGER_SECONDS)
        return 0

    cdef int linger_read(self) except -1:
        cdef char buf[4096]
        cdef ssize_t n = recv(self.fd, buf, sizeof(buf), 0)
        if n == 0 or (n < 0 and errno != EAGAIN and errno != EINTR):
            self.close()
        return 0

    cdef int close(self) except -1:
        cdef Deferred task
        cdef int was = self.state
        if self.state == C_CLOSED:
            return 0
        self.state = C_CLOSED
        if self.task is not None:
            task, self.task = self.task, None
            try:
                task.abort()
            except Exception as exc:
                log.exception(f"ending the answer of the {self.describe()}", exc)
        self.unwatch()
        self.set_deadline(0)
        if self.tls is not None and was != C_HANDSHAKE:
            tls_keep_session(self.tls)  # else a TLS 1.2 client cannot resume by session ID
        self.tls = None
        if self.tls_sock is not None:
            self.tls_sock.detach()      # the descriptor is ours to close, once
            self.tls_sock = None
        close(self.fd)
        self.out.clear()                # logs the records it still held
        if self.current is not None and self.current.done is not None:
            self.finished(self.current)
        if self.record is not None:
            record, self.record = self.record, None
            self.out.reach(record)      # an answer cut short: what went out of it
        if self.rbuf != NULL:
            self.loop.give_buffer(self.rbuf, self.rcap)
            self.rbuf = NULL
        self.core.stats.conn_current -= 1
        self.core.connections.discard(self)
        if self.core.draining and not self.core.connections:
            self.loop.stop()
        return 0

    # tests: what a client cannot see directly
    @property
    def state_name(self):
        return ("HANDSHAKE", "IDLE", "HEAD", "BODY", "WAIT", "TUNNEL", "CLOSING", "LINGER",
                "CLOSED")[self.state + 1]

    @property
    def buffered(self):
        return self.rend - self.rstart

    @property
    def holds_buffer(self):
        return self.rbuf != NULL
