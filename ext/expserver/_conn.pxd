from libc.stdint cimport uint32_t
from expserver._loop cimport Loop, Handle
from expserver._pipe cimport Pipe, FileRange
from expserver._http cimport Parser, Request
from expserver._access cimport AccessLog, Record


cdef class Stats:
    cdef public long long conn_accepted, conn_current, conn_error, conn_timeout
    cdef public long long conn_accepted_error
    cdef public long long req_total, req_current
    cdef public long long res_1xx, res_2xx, res_3xx, res_4xx, res_5xx
    cdef public long long recv_bytes, send_bytes
    cdef public double res_time_total, res_time_peak
    cdef long long hist[14]       # responses by time to their head (see DURATION_BUCKETS)


cdef class Settings:
    cdef public double keepalive_timeout, header_timeout, body_timeout, send_timeout
    cdef public long long max_body_size
    cdef public int max_line, max_field, max_head, max_fields
    cdef public Py_ssize_t pipe_threshold
    cdef public int max_connections


cdef class Core:
    cdef public Loop loop
    cdef public Stats stats
    cdef public set connections
    cdef public bint draining


cdef class Listener(Handle):
    cdef public object sock
    cdef public object handler
    cdef public Settings settings
    cdef public object tls_context   # an ssl.SSLContext: connections start with a handshake
    cdef public object access_log    # the AccessLog of its requests (a site's may differ)
    cdef Core core
    cdef bint paused
    cdef void _pause(self, double seconds)
    cdef Connection accept_fd(self, int fd, str peer)


cdef class Deferred:
    """An answer that is not ready when the handler returns (the proxy's exchanges, Later).

    The handler returns the deferred instead of a tuple; the connection then calls ``start``, feeds
    the request body through ``on_body`` while ``body_full`` is false, tells ``on_drain``
    when its pipe has room again, ``abort`` if the client goes away, and ``fault`` if one of
    these calls raised. The deferred queues its response head with ``conn.push_head`` and
    the body into ``conn.out``, and calls ``conn.task_done()`` when it is complete.
    """
    cdef int start(self, Connection conn, Request req) except -1
    cdef bint body_full(self)
    cdef int on_body(self, list chunks, bint done) except -1
    cdef int on_drain(self) except -1
    cdef int abort(self) except -1
    cdef int fault(self, BaseException exc) except -1


cdef class Later(Deferred):
    cdef Connection conn
    cdef Request req


# What the next bytes from the client mean (see the transition table in _conn.pyx).
cdef enum ConnState:
    C_HANDSHAKE = -1  # TLS: the handshake is in progress
    C_IDLE = 0      # between requests, nothing buffered
    C_HEAD = 1      # part of a request head is buffered
    C_BODY = 2      # reading the body of the request being answered
    C_WAIT = 3      # a deferred answer is being produced; later bytes wait unparsed
    C_TUNNEL = 4    # after 101: every byte belongs to the deferred (WebSocket)
    C_CLOSING = 5   # no further request is read: the queued answers go out, then LINGER
    C_LINGER = 6    # our side is shut: reading and discarding until EOF or a deadline
    C_CLOSED = 7


cdef class Connection(Handle):
    cdef Listener listener
    cdef Core core
    cdef public Settings settings
    cdef public str peer
    cdef bytes peer_ascii      # the same, for the proxy's X-Forwarded-For
    cdef object tls            # TLS: the stdlib's _ssl._SSLSocket on our descriptor
    cdef object tls_sock       # ... and the socket object it needs alive (detached on close)
    cdef object __weakref__    # the TLS owner, for the SNI callback
    cdef bytes tls_proto       # "TLSv1.3", for the access log
    cdef Record record         # the access-log record of the response being produced
    cdef unsigned char *rbuf
    cdef Py_ssize_t rcap, rstart, rend
    cdef Parser parser
    cdef Pipe out
    cdef public int state      # a ConnState
    cdef bint close_after      # the response being produced is the last one
    cdef bint owed             # a request was dispatched and its response head is not queued
    cdef bint read_eof         # the client shut its sending side
    cdef bint blocked          # the socket is full: waiting for EPOLLOUT
    cdef bint stalled          # parsing stopped for a full pipe: resume once it has room
    cdef double head_deadline  # total deadline of the head being read (0: none yet)
    cdef double started        # when the current request's head was complete
    cdef Deferred task         # the deferred answer in progress, if any
    cdef Request current       # the request being answered (for errors raised late)
    cdef public double body_timeout   # of the current request (its route may set it)

    cdef void init(self, Listener listener, int fd, str peer)
    cdef int start_tls(self, object context) except -1
    cdef int handshake(self) except -1
    cdef int tls_failed(self, BaseException exc) except -1
    cdef int read(self) except -1
    cdef int make_room(self) except -1
    cdef int process(self) except -1
    cdef int feed_body(self) except -1
    cdef int next_request(self) except -1
    cdef int dispatch(self, Request req) except -1
    cdef int respond_error(self, Request req, int status) except -1
    cdef int respond(self, Request req, int status, bytes headers, object body) except -1
    cdef int push_head(self, Request req, bytes head, int status) except -1
    cdef int end_record(self) except -1
    cdef int finished(self, Request req) except -1
    cpdef note_upstream(self, bytes address, double seconds)
    cdef int count(self, int status) except -1
    cdef void close_file(self, FileRange fr)
    cdef int fail(self, int status) except -1
    cdef int flush(self) except -1
    cdef int arm_deadline(self, long long sent_before) except -1
    cdef int update_interest(self) except -1
    cdef int end_task(self) except -1
    cdef int task_done(self, bint reusable) except -1
    cdef int start_tunnel(self) except -1
    cdef void drain(self)
    cdef int start_linger(self) except -1
    cdef int linger_read(self) except -1
