# cython: language_level=3
"""Reverse proxy data path: upstream connections and exchanges that stream both ways.

Theory of operation
-------------------
A ``ProxyRoute`` is the handler of one ``reverse_proxy`` route: called per request, it
returns an ``Exchange``, a deferred answer the client ``Connection`` then drives.

An ``Exchange`` is one proxied request. It asks the route's balancer for a peer, takes an
idle ``Upstream`` from that peer's pool (or connects a new one) and queues the request head
in the upstream's pipe. Request body chunks arrive through ``on_body`` and are queued behind
it; while that pipe is over its threshold ``body_full`` is true and the client connection
stops reading. When the upstream drains its pipe it lets the client connection go on.

The upstream's response head is scanned in the Upstream's own buffer (status line here,
field lines by the shared ``Parser``); ``scan_fields`` (expserver._relay) reads its framing in C, and
``relay_head`` copies the end-to-end field lines as they came, byte for byte, into the one
``bytes`` the client gets (no object per field). The body is re-framed for the client
(Content-Length kept; chunked or close-delimited become chunked for HTTP/1.1 clients,
close-delimited for HTTP/1.0 ones) and pushed into the client's pipe as it arrives.
While that pipe is over its threshold the Upstream stops reading (``paused``); the client
connection calls ``on_drain`` when it has room again. So neither side ever makes us buffer a
whole body: memory per exchange is bounded by two pipe thresholds and two read buffers.

Failures before the response head starts: a connect failure is retried on the next peer
(nothing was sent, whatever the method); a reset or an empty reply is retried only for
idempotent requests without a body; otherwise 502 (504 for a timeout). After the head was
sent to the client, a failure can only cut the client connection: never a fake end.

States (``Exchange.state``; nothing else moves them)::

    AWAIT   the request goes to a peer: a pooled connection or a new one, the head and the
            body so far queued in its pipe     -> RELAY: a final response head arrives and
                                                  is queued for the client (1xx skipped)
                                               -> TUNNEL: a 101 to an upgrade request
                                               -> AWAIT: the peer failed and a retry is safe
                                                  (next peer; a stale pooled connection is
                                                  retried on a new one to the same peer)
                                               -> DONE (answered): 502/504 when no retry is
                                                  left or safe, 413 for a body over the
                                                  route's limit, 502 when a callback raised
    RELAY   the body goes to the client, re-framed as it arrives
                                               -> DONE (complete): the body ended; the
                                                  upstream goes back to its pool if reusable
                                               -> DONE (cut): upstream reset, EOF inside a
                                                  framed body, bad framing, a timeout or a
                                                  callback fault: the client connection
                                                  closes, never a fake end
    TUNNEL  raw bytes both ways                -> DONE (cut): either side closes
    any     the client goes away               -> DONE (aborted): the upstream connection
                                                  is closed (not the peer's fault)

An ``Upstream`` is CONNECTING -> [HANDSHAKE, https:// peers] -> ACTIVE (its exchange's) ->
IDLE (in its peer's pool) -> ACTIVE (taken again) ... -> CLOSED; connecting and the
handshake share ``connect_timeout``. An idle upstream that speaks, closes or outlives
``idle_timeout`` is closed and forgotten by the pool. Every failure of an active one is
logged with the peer and why (``upstream_failed``, ``cut``).

Ownership: an Upstream belongs to its Exchange while active, to its route's pool while idle.
"""
import os
import socket
import ssl

from expserver import log

cdef object SSLWantReadError = ssl.SSLWantReadError
cdef object SSLWantWriteError = ssl.SSLWantWriteError

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdio cimport snprintf
from libc.stdlib cimport free
from libc.string cimport memchr, memcpy, memmove
from libc.stdint cimport uint32_t
from expserver._sys cimport *
from expserver._loop cimport Loop, Handle, LARGE_BUFFER
from expserver._pipe cimport Pipe, FLUSH_AGAIN, FLUSH_ERROR, tls_recv
from expserver._http cimport Parser, Request, AGAIN
from expserver._conn cimport Connection, Deferred
from expserver._relay cimport (ResponseHead, parse_status_line, scan_fields, relay_head,
                               with_policy)

DEF MAX_STATUS_LINE = 8192
DEF MAX_POOL = 1024             # idle connections per peer, whatever the peak

# An Exchange's states; what leads out of each is in the module docstring.
cdef enum XState:
    X_AWAIT = 0     # the request goes to a peer: connecting, sending, awaiting the head
    X_RELAY = 1     # the response head is in the client's pipe; the body follows it
    X_TUNNEL = 2    # after a 101: raw bytes both ways
    X_DONE = 3      # over, with an Outcome

cdef enum Outcome:
    O_NONE = 0
    O_COMPLETE = 1  # the whole response is in the client's pipe
    O_ANSWERED = 2  # we answered ourselves (502, 504, 413)
    O_CUT = 3       # the response broke off after its head: the client connection closes
    O_ABORTED = 4   # the client went away

cdef tuple OUTCOMES = ("none", "complete", "answered", "cut", "aborted")


cdef void peer_succeeded(object peer):
    """The balancer's bookkeeping must never cost the client its answer."""
    try:
        peer.succeeded()
    except Exception as exc:
        log.exception(f"recording a success of upstream {peer!r}", exc)


cdef void peer_failed(object peer, double now):
    try:
        peer.failed(now)
    except Exception as exc:
        log.exception(f"recording a failure of upstream {peer!r}", exc)


cdef enum UState:
    U_CONNECTING = 0
    U_ACTIVE = 1
    U_IDLE = 2
    U_CLOSED = 3
    U_HANDSHAKE = 4     # https:// upstream: TCP is up, TLS is being set up

cdef bytes CRLF = b"\r\n"
cdef bytes LAST_CHUNK = b"0\r\n\r\n"
cdef bytes TE_CHUNKED = b"Transfer-Encoding: chunked\r\n"
# The end of a relayed response head: [chunked framing] x [nothing, close, keep-alive (1.0)]
cdef tuple HEAD_TAILS = tuple(
    framing + connection + CRLF
    for framing in (b"", TE_CHUNKED)
    for connection in (b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n"))

# Fields that describe one connection, not the message (RFC 9110 7.6.1).
cdef frozenset HOP_BY_HOP = frozenset([
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade"])
# Request fields the exchange writes itself.
cdef frozenset REWRITTEN = HOP_BY_HOP | frozenset([
    b"host", b"content-length", b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"])
cdef frozenset NO_PEERS = frozenset()
cdef frozenset IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])

cdef struct Writer:
    char *buf           # NULL: only count the bytes
    Py_ssize_t size


cdef inline void put_c(Writer *w, const char *p, Py_ssize_t n) noexcept:
    if w.buf != NULL:
        memcpy(w.buf + w.size, p, n)
    w.size += n


cdef inline void put(Writer *w, bytes b) noexcept:
    put_c(w, PyBytes_AS_STRING(b), PyBytes_GET_SIZE(b))


cdef set _tokens(bytes value):
    """Lower-case tokens of a comma-separated field value."""
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


cdef class PeerPool:
    """A peer's idle upstream connections, and the most requests it had in flight at once."""
    cdef list idle
    cdef Py_ssize_t peak


cdef class ProxyRoute:
    """The handler of one reverse_proxy route (built by expserver.proxy from the config)."""
    cdef public object balancer
    cdef public object loop
    cdef public double connect_timeout, read_timeout, send_timeout, idle_timeout
    cdef public int keepalive
    cdef public int retries
    cdef public object host_header     # None: the client's; b"": the peer's; else literal
    cdef public Py_ssize_t threshold
    cdef public long long max_body    # the route's max_body_size (0: no limit)
    cdef public double body_timeout   # the route's client body timeout
    cdef dict pools                    # peer -> PeerPool
    cdef dict addrs                    # peer -> (family, sockaddr)
    cdef public object tls_context     # for https:// peers (an ssl.SSLContext)
    cdef public frozenset hide         # request fields not sent upstream (None: none)
    cdef public dict tls_names         # https:// peer -> the name for SNI and the check

    def __init__(self, loop, balancer, addrs, *, connect_timeout=60.0, read_timeout=60.0,
                 send_timeout=60.0, idle_timeout=60.0, keepalive=32, retries=1,
                 host_header=None, threshold=65536, max_body=0, body_timeout=60.0):
        self.loop = loop
        self.balancer = balancer
        self.addrs = addrs          # shared with the health probe and the resolver
        self.pools = {}
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.send_timeout = send_timeout
        self.idle_timeout = idle_timeout
        self.keepalive = keepalive
        self.retries = retries
        self.host_header = host_header
        self.threshold = threshold
        self.max_body = max_body
        self.body_timeout = body_timeout
        self.tls_context = None
        self.tls_names = {}
        self.hide = None

    def __call__(self, Request req):
        cdef Exchange ex = Exchange.__new__(Exchange)
        ex.route = self
        return ex

    def set_address(self, peer, addr):
        """A peer's address changed (re-resolution); new connections use it."""
        self.addrs[peer] = addr

    def idle_count(self):
        return sum(len((<PeerPool>p).idle) for p in self.pools.values())

    cdef PeerPool pool_of(self, object peer):
        cdef PeerPool pool = self.pools.get(peer)
        if pool is None:
            pool = self.pools[peer] = PeerPool.__new__(PeerPool)
            pool.idle = []
        return pool

    cdef Upstream take_idle(self, PeerPool pool):
        cdef Upstream up
        while pool.idle:
            up = <Upstream>pool.idle.pop()
            if up.state == U_IDLE:
                return up
        return None

    cdef int give_back(self, Upstream up) except -1:
        # The pool holds at least ``keepalive`` idle connections, and as many as the peer's
        # peak concurrency (up to MAX_POOL): a fixed pool smaller than the load (nginx's
        # keepalive N) would make most requests connect anew. Idle ones expire.
        cdef PeerPool pool = up.pool
        cdef Py_ssize_t cap = 0
        if self.keepalive > 0:
            cap = max(self.keepalive, min(pool.peak, MAX_POOL))
        if len(pool.idle) >= cap:
            up.close()
            return 0
        up.state = U_IDLE
        up.ex = None
        if up.rbuf != NULL:
            up.loop.give_buffer(up.rbuf, LARGE_BUFFER)    # an idle connection holds no buffer
            up.rbuf = NULL
        pool.idle.append(up)
        up.watch(EPOLLIN)             # an idle upstream that closes or talks is dropped
        up.set_deadline((<Loop>self.loop).now + self.idle_timeout)

    cdef int forget(self, Upstream up) except -1:
        if up in up.pool.idle:
            up.pool.idle.remove(up)


cdef str INVALID_HEAD = "sent an invalid response head"


cdef str _errno_reason(str doing, int err):
    return f"{doing} failed: {os.strerror(err) if err else 'connection closed'}"


cdef inline Exchange _ex(Upstream up):
    """The upstream's exchange as a new reference: a call into it may release the upstream,
    which drops ``up.ex``, and a cdef method holds no reference to its own ``self``."""
    return up.ex


cdef class Upstream(Handle):
    cdef ProxyRoute route
    cdef object peer
    cdef PeerPool pool         # the peer's, where it waits while idle
    cdef object sock
    cdef object tls            # https:// peers: the _ssl._SSLSocket on sock
    cdef Exchange ex
    cdef int state
    cdef bint reused           # came from the pool
    cdef bint paused           # not reading: the client's pipe is full
    cdef Pipe out              # request bytes towards the upstream
    cdef Parser parser
    cdef unsigned char *rbuf
    cdef Py_ssize_t rstart, rend
    cdef ResponseHead head
    cdef Py_ssize_t fields_start   # where the field lines begin (after the status line)
    cdef bint body_started
    cdef int connect_errno     # why a connect failed before any event (0: did not resolve)

    def __dealloc__(self):
        if self.rbuf != NULL:
            free(self.rbuf)

    cdef int connect(self, object addr) except -1:
        if addr is None:            # the name did not resolve at start-up
            self.state = U_CONNECTING
            self.connect_errno = 0
            self.loop.call_soon(self.connect_failed)
            return 0
        family, sockaddr = addr
        self.state = U_CONNECTING
        try:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setblocking(False)
            self.fd = self.sock.fileno()
            err = self.sock.connect_ex(sockaddr)
            self.watch(EPOLLOUT)
        except OSError as e:        # out of descriptors, or an address the kernel refuses
            self.connect_errno = e.errno or 5     # EIO
            self.loop.call_soon(self.connect_failed)
            return 0
        if err not in (0, 115):    # 115: EINPROGRESS; anything else failed at once
            self.connect_errno = err
            self.loop.call_soon(self.connect_failed)
            return 0
        self.set_deadline(self.loop.now + self.route.connect_timeout)
        return 0

    cdef str describe(self):
        return f"upstream connection to {self.peer!r}"

    cdef int on_error(self, BaseException exc) except -1:
        cdef Exchange ex = self.ex
        log.exception(f"internal error on the {self.describe()}", exc)
        if ex is not None and ex.state != X_DONE:
            ex.fault(exc)           # ends the exchange, and with it this connection
        if self.state != U_CLOSED:
            if self.state == U_IDLE:
                self.route.forget(self)
            self.close()
        return 0

    def connect_failed(self):
        if self.ex is not None and self.state == U_CONNECTING:
            _ex(self).upstream_failed(self, False, 502, _errno_reason(
                "connect", self.connect_errno) if self.connect_errno else "does not resolve")

    cdef int on_events(self, uint32_t events) except -1:
        cdef int err
        if self.state == U_IDLE:
            self.route.forget(self)     # closed or spoke while idle: not reusable
            self.close()
            return 0
        if self.state == U_CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or events & (EPOLLERR | EPOLLHUP):
                _ex(self).upstream_failed(self, False, 502, _errno_reason("connect", err))
                return 0
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.peer in self.route.tls_names:
                self.state = U_HANDSHAKE
                self.tls = self.route.tls_context._wrap_socket(
                    self.sock, False, self.route.tls_names[self.peer], owner=None,
                    session=None)
                return self.handshake()
            self.state = U_ACTIVE
            self.flush()
            return 0
        if self.state == U_HANDSHAKE:
            return self.handshake()
        if self.state != U_ACTIVE:
            return 0
        if events & EPOLLOUT:
            self.flush()
        if self.state != U_ACTIVE:
            return 0
        if not self.paused and events & (EPOLLIN | EPOLLERR | EPOLLHUP):
            self.read()
        elif self.paused and events & (EPOLLERR | EPOLLHUP):
            _ex(self).on_upstream_error(self, ECONNRESET)     # reset while we were not reading
        return 0

    cdef int handshake(self) except -1:
        """TLS to the upstream, within connect_timeout (the deadline armed by connect)."""
        try:
            self.tls.do_handshake()
        except SSLWantReadError:
            self.watch(EPOLLIN)
            return 0
        except SSLWantWriteError:
            self.watch(EPOLLOUT)
            return 0
        except (ssl.SSLError, OSError) as exc:
            _ex(self).upstream_failed(self, False, 502, "TLS handshake failed: " + str(
                getattr(exc, 'verify_message', None) or getattr(exc, 'reason', None) or exc))
            return 0
        self.state = U_ACTIVE
        self.flush()
        return 0

    cdef int on_timeout(self) except -1:
        if self.state == U_IDLE:
            self.route.forget(self)
            self.close()
        elif self.ex is not None:
            _ex(self).upstream_failed(self, self.state != U_CONNECTING and
                                      self.state != U_HANDSHAKE, 504, self.timeout_reason())
        else:
            self.close()
        return 0

    cdef str timeout_reason(self):
        if self.state == U_CONNECTING:
            return f"timed out connecting (connect_timeout {self.route.connect_timeout:g} s)"
        if self.state == U_HANDSHAKE:
            return f"timed out in the TLS handshake (connect_timeout {self.route.connect_timeout:g} s)"
        if not self.out.empty():
            return f"timed out taking the request (upstream_send_timeout {self.route.send_timeout:g} s)"
        if self.head is None:
            return f"timed out before its response head (upstream_read_timeout {self.route.read_timeout:g} s)"
        return f"went silent mid-response (upstream_read_timeout {self.route.read_timeout:g} s)"

    cdef int flush(self) except -1:
        cdef Exchange ex = self.ex
        cdef bint was_full = self.out.full()
        cdef long long before = self.out.sent
        cdef int r = self.out.flush(self.fd) if self.tls is None else self.out.flush_tls(self.tls)
        if r == FLUSH_ERROR:
            ex.upstream_failed(self, self.out.sent > 0 or self.reused, 502,
                               _errno_reason("sending the request", errno))
            return 0
        if r == FLUSH_AGAIN:
            self.watch((0 if self.paused else EPOLLIN) | EPOLLOUT)
            if self.out.sent != before or self.head is None:
                self.set_deadline(self.loop.now + self.route.send_timeout)
        else:
            self.watch(0 if self.paused else EPOLLIN)
            if self.head is None or not self.paused:
                self.set_deadline(self.loop.now + self.route.read_timeout)
        if was_full and not self.out.full() and ex is not None and ex.conn is not None:
            ex.conn.process()           # the client may send more body now
        return 0

    cdef int read(self) except -1:
        cdef ssize_t n, more
        if self.rbuf == NULL:
            self.rbuf = self.loop.take_buffer(LARGE_BUFFER)
            self.rstart = self.rend = 0
        if self.rstart == self.rend:
            self.rstart = self.rend = 0
        if self.rend == LARGE_BUFFER:
            if self.rstart == 0:
                _ex(self).upstream_failed(self, True, 502, "sent a response head larger "
                                          "than the buffer")
                return 0
            memmove(self.rbuf, self.rbuf + self.rstart, self.rend - self.rstart)
            self.rend -= self.rstart
            self.rstart = 0
        if self.tls is None:
            n = recv(self.fd, self.rbuf + self.rend, LARGE_BUFFER - self.rend, 0)
        else:
            n = tls_recv(self.tls, self.rbuf + self.rend, LARGE_BUFFER - self.rend)
            while n > 0 and self.rend + n < LARGE_BUFFER and self.tls.pending():
                # OpenSSL holds more decrypted bytes: the socket will not say so
                more = tls_recv(self.tls, self.rbuf + self.rend + n,
                                LARGE_BUFFER - self.rend - n)
                if more <= 0:
                    break
                n += more
        if n > 0:
            self.rend += n
            self.set_deadline(self.loop.now + self.route.read_timeout)
            _ex(self).on_upstream_data(self)
            if self.tls is not None and self.state == U_ACTIVE and not self.paused \
                    and self.tls is not None and self.tls.pending():
                self.loop.call_soon(self.read_pending)
        elif n == 0:
            _ex(self).on_upstream_eof(self)
        elif errno != EAGAIN and errno != EINTR:
            _ex(self).on_upstream_error(self, errno)
        return 0

    def read_pending(self):
        if self.state == U_ACTIVE and not self.paused and self.tls is not None:
            self.read()

    cdef int pause(self) except -1:
        self.paused = True
        self.watch(EPOLLOUT if not self.out.empty() else 0)
        self.set_deadline(0)

    cdef int resume(self) except -1:
        if self.paused and self.state == U_ACTIVE:
            self.paused = False
            self.watch(EPOLLIN | (0 if self.out.empty() else EPOLLOUT))
            self.set_deadline(self.loop.now + self.route.read_timeout)
            if self.rend > self.rstart:
                _ex(self).on_upstream_data(self)
            elif self.tls is not None and self.tls.pending():
                self.loop.call_soon(self.read_pending)

    cdef int close(self) except -1:
        if self.state == U_CLOSED:
            return 0
        self.state = U_CLOSED
        self.unwatch()
        self.set_deadline(0)
        self.tls = None
        if self.sock is not None:
            self.sock.close()
        self.out.clear()
        self.ex = None
        if self.rbuf != NULL:
            self.loop.give_buffer(self.rbuf, LARGE_BUFFER)
            self.rbuf = NULL


cdef class Exchange(Deferred):
    cdef ProxyRoute route
    cdef Connection conn
    cdef Request req
    cdef Upstream up
    cdef bytes head_bytes       # the request head as sent upstream
    cdef set tried              # peers that failed this request (None: none yet)
    cdef int attempts
    cdef bint idempotent
    cdef bint has_body
    cdef bint body_done
    cdef bint chunked_up        # the body goes upstream chunked
    cdef bint chunked_down      # we frame the body in chunks for the client
    cdef bint close_down        # the client connection ends with this response
    cdef bint no_body
    cdef bint upgrade           # the client asked for a protocol upgrade
    cdef int state              # an XState
    cdef int outcome            # an Outcome, once DONE
    cdef int last_status        # what to answer if no peer is left (502 or 504)
    cdef long long received     # chunked request body bytes so far
    cdef list replay            # body bytes queued while no upstream got a byte (retries)
    cdef bint host_per_peer     # head_bytes lacks its Host line: it names the peer

    # ----------------------------------------------------------- Deferred
    cdef int start(self, Connection conn, Request req) except -1:
        self.conn = conn
        self.req = req
        self.has_body = req.chunked or req.content_length > 0
        self.body_done = not self.has_body
        self.chunked_up = req.chunked
        self.idempotent = req.method in IDEMPOTENT
        if 0 < self.route.max_body < req.content_length:
            return self.fail(413)
        conn.body_timeout = self.route.body_timeout
        self.replay = [] if self.has_body else None
        self.head_bytes = self.request_head()
        self.next_peer()
        return 0

    cdef bint body_full(self):
        return self.up is None or self.up.out.full()

    cdef int on_body(self, list chunks, bint done) except -1:
        cdef bytes c
        cdef Upstream up = self.up
        if self.state == X_DONE or up is None:
            return 0
        if self.route.max_body and self.req.chunked:
            self.received += sum(len(c) for c in chunks)
            if self.received > self.route.max_body and self.state == X_AWAIT:
                self.release(up, False, False)      # a chunked body over the limit
                return self.fail(413)
        if self.replay is not None and up.out.sent:
            self.replay = None          # bytes reached an upstream: no more replays
        for c in chunks:
            if c:
                self.push_body(up, b"%x\r\n%b\r\n" % (len(c), c) if self.chunked_up else c)
        if done:
            self.body_done = True
            if self.chunked_up:
                self.push_body(up, LAST_CHUNK)
        if up.state == U_ACTIVE:
            up.flush()
        return 0

    cdef int push_body(self, Upstream up, bytes data) except -1:
        up.out.push(data)
        if self.replay is not None:
            self.replay.append(data)

    cdef int on_drain(self) except -1:
        if self.up is not None and self.up.paused:
            self.up.resume()
        return 0

    cdef int abort(self) except -1:
        """The client went away: the exchange ends, its upstream connection too."""
        self.state = X_DONE
        self.outcome = O_ABORTED
        self.conn = None
        if self.up is not None:
            self.release(self.up, False, False)     # the client left: not the peer's fault
        return 0

    # ----------------------------------------------------------- request side
    cdef bytes request_head(self):
        """The request head for the upstream; without its Host line and end when the Host
        depends on the peer (``host_per_peer``)."""
        cdef Request req = self.req
        cdef set named = None                   # other fields the client's Connection names
        cdef bytes name, value, forwarded = None, host = None, upgrade = None
        cdef tuple field
        cdef object mode = self.route.host_header
        cdef Writer w
        cdef bytes out, target = req.target, authority = None, rest
        cdef Py_ssize_t end
        if PyBytes_AS_STRING(target)[0] != 47 and target != b"*":
            # absolute-form (RFC 9112 3.2.2): the upstream gets the origin-form, and the Host
            # made from the target's authority, whatever the client's Host field said
            rest = target[target.index(b"//") + 2:]
            end = min([i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0] or [len(rest)])
            authority = rest[:end]
            target = rest[end:] if rest[end:end + 1] == b"/" else b"/" + rest[end:]
        for field in req.headers:
            name = <bytes>field[0]
            if name not in REWRITTEN:
                continue
            value = <bytes>field[1]
            if name == b"connection":
                toks = _tokens(value)
                self.upgrade = self.upgrade or b"upgrade" in toks
                toks -= REWRITTEN
                if toks:
                    named = toks if named is None else named | toks
            elif name == b"upgrade":
                upgrade = value
            elif name == b"x-forwarded-for":
                forwarded = value if forwarded is None else forwarded + b", " + value
            elif name == b"host" and host is None:
                host = value
        if authority is not None:
            host = authority
        if self.route.hide is not None or req.request_id is not None:
            # fields the route keeps from the upstream (Authorization behind basic_auth), and
            # the client's X-Request-ID when ours replaces it
            extra = set(self.route.hide or ())
            if req.request_id is not None:
                extra.add(b"x-request-id")
            named = extra if named is None else named | extra
        # Upgrade is hop-by-hop: it is passed on only as the client's explicit request
        self.upgrade = self.upgrade and upgrade is not None and req.version == 11
        if mode is None and host is not None:
            mode = host                     # the client's Host
        elif mode is None or mode == b"":
            mode = None                     # the peer's address (none from an HTTP/1.0 client)
            self.host_per_peer = True
        # measured, then written, by the same code: one allocation, no list of pieces
        w.buf = NULL
        w.size = 0
        self.write_head(&w, target, named, forwarded, host, upgrade, mode)
        out = PyBytes_FromStringAndSize(NULL, w.size)
        w.buf = PyBytes_AS_STRING(out)
        w.size = 0
        self.write_head(&w, target, named, forwarded, host, upgrade, mode)
        return out

    cdef int write_head(self, Writer *w, bytes target, set named, bytes forwarded, bytes host,
                        bytes upgrade, bytes host_line) except -1:
        cdef Request req = self.req
        cdef bytes name
        cdef tuple field
        cdef char digits[24]
        put(w, req.method)
        put_c(w, b" ", 1)
        put(w, target)                      # as the client sent it (absolute-form: its path)
        put_c(w, b" HTTP/1.1\r\n", 11)
        for field in req.headers:
            name = <bytes>field[0]
            if name not in REWRITTEN and (named is None or name not in named):
                put(w, name)
                put_c(w, b": ", 2)
                put(w, <bytes>field[1])
                put_c(w, b"\r\n", 2)
        put_c(w, b"X-Forwarded-For: ", 17)
        if forwarded:
            put(w, forwarded)
            put_c(w, b", ", 2)
        put(w, self.conn.peer_ascii)
        if req.secure:
            put_c(w, b"\r\nX-Forwarded-Proto: https\r\n", 28)
        else:
            put_c(w, b"\r\nX-Forwarded-Proto: http\r\n", 27)
        if host is not None:
            put_c(w, b"X-Forwarded-Host: ", 18)
            put(w, host)
            put_c(w, b"\r\n", 2)
        if req.request_id is not None:
            put_c(w, b"X-Request-ID: ", 14)
            put(w, req.request_id)
            put_c(w, b"\r\n", 2)
        if req.chunked:
            put(w, TE_CHUNKED)
        elif req.content_length >= 0:
            put_c(w, b"Content-Length: ", 16)
            put_c(w, digits, snprintf(digits, 24, "%lld\r\n", req.content_length))
        if self.upgrade:
            put_c(w, b"Connection: upgrade\r\nUpgrade: ", 30)
            put(w, upgrade)
            put_c(w, b"\r\n", 2)
        if host_line is not None:
            put_c(w, b"Host: ", 6)
            put(w, host_line)
            put_c(w, b"\r\n\r\n", 4)
        return 0

    cdef bytes peer_host_line(self, object peer):
        address = peer.address              # "host:port", IPv6 in brackets
        return b"Host: " + (address.encode("ascii") if address.isascii()
                            else address.encode("idna")) + b"\r\n\r\n"

    cdef int next_peer(self) except -1:
        cdef ProxyRoute route = self.route
        cdef Loop loop = <Loop>route.loop
        if self.attempts > route.retries:
            return self.fail(self.last_status or 502)
        try:
            peer = route.balancer.pick(self.req.peer, loop.now,
                                       NO_PEERS if self.tried is None else self.tried)
            known = peer is None or peer in route.addrs     # the route's peers, resolved or not
        except Exception as exc:
            log.exception(f"the balancer of {self.describe()}", exc)
            return self.fail(502)
        if not known:
            log.error(f"the balancer of {self.describe()} picked {peer!r}, not one of its peers")
            return self.fail(502)
        if peer is None:
            return self.fail(self.last_status or 502)
        self.attempts += 1
        return self.use_peer(peer, True)

    cdef int use_peer(self, object peer, bint pooled) except -1:
        """Send the request to ``peer`` on an idle pooled connection or a new one."""
        cdef Upstream up = None
        cdef ProxyRoute route = self.route
        cdef Loop loop = <Loop>route.loop
        cdef PeerPool pool = route.pool_of(peer)
        cdef Py_ssize_t active
        if pooled:
            up = route.take_idle(pool)
        if up is None:
            up = Upstream.__new__(Upstream)
            up.loop = loop
            up.route = route
            up.peer = peer
            up.pool = pool
            up.out = Pipe(route.threshold)
            up.parser = Parser(8192, 8192, 65536, 100)
            up.ex = self
            up.connect(route.addrs.get(peer))
        else:
            up.reused = True
            up.ex = self
            up.state = U_ACTIVE
            up.paused = False
            up.head = None
            up.body_started = False
        active = peer.active + 1
        peer.active = active
        if active > pool.peak:
            pool.peak = active
        self.up = up
        up.out.push(self.head_bytes + self.peer_host_line(peer) if self.host_per_peer
                    else self.head_bytes)
        if self.replay:
            for data in self.replay:    # a retry after a connect failure: nothing was sent
                up.out.push(data)
        if up.state == U_ACTIVE:
            up.flush()
        return 0

    # ----------------------------------------------------------- response side
    cdef int on_upstream_data(self, Upstream up) except -1:
        cdef const unsigned char *p
        cdef const unsigned char *lf
        cdef Py_ssize_t n, used, fields_start
        cdef int rc
        cdef list chunks
        if self.state == X_DONE:
            return 0
        while self.state == X_AWAIT:
            p = up.rbuf + up.rstart
            n = up.rend - up.rstart
            if up.fields_start == 0:
                lf = <const unsigned char *>memchr(p, 10, n)
                if lf == NULL:
                    if n > MAX_STATUS_LINE:
                        return self.upstream_failed(up, True, 502, INVALID_HEAD)
                    return 0
                if lf == p or (lf - 1)[0] != 13:
                    return self.upstream_failed(up, True, 502, INVALID_HEAD)    # bare LF
                up.head = ResponseHead.__new__(ResponseHead)
                if parse_status_line(p, lf - p - 1, up.head) < 0:
                    return self.upstream_failed(up, True, 502, INVALID_HEAD)
                up.fields_start = lf - p + 1
                up.parser.begin_fields(up.fields_start)
            rc = up.parser.scan_head(p, n)
            if rc == AGAIN:
                return 0
            used = up.parser.pos
            if rc < 0 or scan_fields(p, up.fields_start, used, up.head) < 0:
                return self.upstream_failed(up, True, 502, INVALID_HEAD)
            fields_start, up.fields_start = up.fields_start, 0
            if up.head.status == 101:
                if not self.upgrade:
                    return self.upstream_failed(up, True, 502, "switched protocols unasked")
                up.rstart += used
                self.start_tunnel(up, p, fields_start, used)
                break
            if up.head.status < 200:
                up.rstart += used
                up.head = None          # an interim answer (100, 103): skip it
                continue
            up.rstart += used
            self.send_head(up, p, fields_start, used)
        # body
        while up.rend > up.rstart and self.state != X_DONE:
            if not self.conn_has_room():
                up.pause()
                return 0
            chunks = []
            used = up.parser.feed_body(up.rbuf + up.rstart, up.rend - up.rstart, chunks)
            if used < 0:
                return self.cut(up, "sent an invalid body")    # never a fake end
            up.rstart += used
            self.relay(chunks)
            if up.parser.body_done():
                return self.complete(up)    # which sends it (head and body in one write)
            if chunks:
                self.conn.flush()
                if self.state == X_DONE:
                    return 0                # sending found the client gone
            if used == 0:
                break
        if self.state != X_DONE:
            if up.parser.body_done():
                return self.complete(up)
            if self.conn is not None:
                self.conn.flush()       # a head without its body yet
        return 0

    cdef int start_tunnel(self, Upstream up, const unsigned char *p, Py_ssize_t fields_start,
                          Py_ssize_t end) except -1:
        """101 Switching Protocols: relay its head, then bytes both ways until a close."""
        cdef ResponseHead h = up.head
        cdef bytes tail = (b"Connection: upgrade\r\nUpgrade: %b\r\n\r\n"
                           % (h.upgrade or b"websocket"))
        self.state = X_TUNNEL
        self.close_down = True
        self.conn.push_head(self.req, relay_head(p, fields_start, end, h, False, tail), 101)
        peer_succeeded(up.peer)
        up.parser.start_framing(False, -1, True)
        self.conn.flush()
        if self.conn is not None:
            self.conn.start_tunnel()
        return 0

    cdef bint conn_has_room(self):
        return self.conn is not None and self.conn.out.has_room()

    cdef int send_head(self, Upstream up, const unsigned char *p, Py_ssize_t fields_start,
                       Py_ssize_t end) except -1:
        cdef ResponseHead h = up.head
        cdef Request req = self.req
        cdef bint head_only = req.method == b"HEAD"
        cdef bint with_length = False
        cdef int connection             # the Connection line we add: none, close, keep-alive
        cdef bytes tail, head
        self.no_body = head_only or h.status == 204 or h.status == 304
        if self.no_body:
            with_length = head_only and h.length >= 0
            up.parser.start_framing(False, 0, False)
        elif h.length >= 0 and not h.chunked:
            with_length = True
            up.parser.start_framing(False, h.length, False)
        else:
            # chunked or delimited by the upstream closing: chunked for 1.1 clients
            if req.version == 11:
                self.chunked_down = True
            else:
                self.close_down = True
            up.parser.start_framing(h.chunked, -1, not h.chunked)
        if not req.keep_alive or self.conn.close_after:
            self.close_down = True
        connection = 1 if self.close_down else 2 if req.version == 10 else 0
        tail = HEAD_TAILS[self.chunked_down * 3 + connection]
        if req.policy is None:
            head = relay_head(p, fields_start, end, h, with_length, tail)
        else:
            head = with_policy(req, h.status, relay_head(p, fields_start, end, h, with_length,
                                                         CRLF), tail)
        self.conn.push_head(self.req, head, h.status)
        if self.conn.record is not None:
            self.conn.note_upstream(up.peer.address.encode("ascii", "replace"),
                                    (<Loop>self.route.loop).now - self.conn.started)
        self.state = X_RELAY
        peer_succeeded(up.peer)
        # not flushed here: the body that came with the head goes out in the same send
        return 0

    cdef int relay(self, list chunks) except -1:
        cdef bytes c
        cdef Pipe out = self.conn.out
        for c in chunks:
            if c:
                out.push(b"%x\r\n%b\r\n" % (len(c), c) if self.chunked_down else c)

    cdef int on_upstream_eof(self, Upstream up) except -1:
        if self.state == X_DONE:
            return 0
        if self.state != X_AWAIT and up.rend == up.rstart and up.parser.bstate != 0:
            # close-delimited bodies end here; anything else was cut short
            if up.head.length < 0 and not up.head.chunked and not self.no_body:
                up.parser.bstate = 0
                return self.complete(up)
            return self.cut(up, "closed the connection before the end of the body")
        # reset, empty reply, or a head cut short: the request was sent
        return self.upstream_failed(up, True, 502, "closed the connection before the "
                                    "end of the response head" if up.rend > up.rstart else
                                    "closed the connection without a response")

    cdef int on_upstream_error(self, Upstream up, int err) except -1:
        """A reset or a socket error: never the end of a body, whatever its framing."""
        if self.state == X_DONE:
            return 0
        if self.state != X_AWAIT:
            return self.cut(up, _errno_reason("reading the body", err))
        return self.upstream_failed(up, True, 502, _errno_reason("reading the response", err))

    cdef int complete(self, Upstream up) except -1:
        """The whole response is in the client's pipe."""
        if self.state == X_DONE or self.conn is None:
            return 0
        cdef bint reusable = not up.head.close and up.rend == up.rstart and up.out.empty() \
            and not (up.head.length < 0 and not up.head.chunked and not self.no_body)
        if self.chunked_down:
            self.conn.out.push(LAST_CHUNK)
        self.state = X_DONE
        self.outcome = O_COMPLETE
        self.release(up, reusable and self.body_done, False)
        conn, self.conn = self.conn, None
        (<Connection>conn).task_done(not self.close_down)
        return 0

    cdef int cut(self, Upstream up, str why) except -1:
        """The response cannot be completed: close the client connection, no fake end.
        ``why``: what the upstream did, for the error log (None: logged by the caller)."""
        if why is not None and up is not None:
            log.error(f"upstream {up.peer.address} {why}; the response to {self.describe()} "
                      "was cut short")
        self.state = X_DONE
        self.outcome = O_CUT
        if up is not None:
            self.release(up, False, True)
        conn, self.conn = self.conn, None
        if conn is not None:
            (<Connection>conn).flush()        # what was relayed still goes out
            (<Connection>conn).end_task()
            (<Connection>conn).close()
        return 0

    cdef int release(self, Upstream up, bint reusable, bint failed) except -1:
        if up is self.up:
            self.up = None
        up.peer.active -= 1
        if failed:
            peer_failed(up.peer, (<Loop>self.route.loop).now)
        if reusable and up.state == U_ACTIVE:
            up.rstart = up.rend = 0
            up.head = None
            self.route.give_back(up)
        else:
            up.close()

    cdef int upstream_failed(self, Upstream up, bint sent, int status, str why) except -1:
        """Connecting, writing or reading the head failed (``sent``: the request, or part
        of it, reached the upstream). Retry on the next peer when that is safe: nothing was
        sent, or the request is idempotent and has no body (nginx's proxy_next_upstream)."""
        if self.state == X_DONE:
            up.close()
            return 0
        if self.state != X_AWAIT:
            return self.cut(up, why)
        # a pooled connection the upstream had closed says nothing about the peer's health:
        # the same peer is tried again on a new connection
        cdef bint stale = up.reused and sent and status == 502
        cdef object peer = up.peer
        if stale:
            if log.enabled("debug"):
                log.debug(f"upstream {peer.address} {why} on a pooled connection; "
                          f"retrying {self.describe()} on a new one")
        else:
            log.error(f"upstream {peer.address} {why} ({self.describe()})")
        self.release(up, False, not stale)
        self.last_status = status
        if not sent or (self.idempotent and not self.has_body):
            if stale:
                return self.use_peer(peer, False)
            if self.tried is None:
                self.tried = set()
            self.tried.add(peer)
            return self.next_peer()
        return self.fail(status)

    cdef int fail(self, int status) except -1:
        """Answer the client ourselves (502/504) and end the exchange."""
        cdef Connection conn = self.conn
        self.state = X_DONE
        self.outcome = O_ANSWERED
        if conn is None:
            return 0
        self.conn = None
        if not self.body_done:
            conn.close_after = True     # the rest of the request body is not read
        conn.respond_error(self.req, status)
        conn.task_done(self.body_done)
        return 0

    cdef int fault(self, BaseException exc) except -1:
        """One of our calls raised (the caller logged it): 502 if the client has had nothing
        of the response yet, else its connection is cut. Either way the exchange is over."""
        if self.state == X_DONE:
            return 0
        if self.state == X_AWAIT:
            if self.up is not None:
                self.release(self.up, False, False)
            return self.fail(502)
        return self.cut(self.up, None)

    cdef str describe(self):
        return f"the exchange for {self.req.method.decode('latin-1')} " \
               f"{self.req.target.decode('latin-1')[:200]} from {self.req.peer}"

    # tests: where the exchange stands
    @property
    def state_name(self):
        return ("AWAIT", "RELAY", "TUNNEL", "DONE")[self.state]

    @property
    def outcome_name(self):
        return OUTCOMES[self.outcome]
