# Declarations shared by the HTTP parser and the connection (see _http.pyx).

cdef enum ParseResult:
    AGAIN = 0    # need more bytes
    DONE = 1     # a head (or a whole body) is complete
    # negative values are -status: the error response to send, then close


cdef struct FieldLine:
    Py_ssize_t colon          # index of the ':'
    Py_ssize_t value_start    # the value without its surrounding whitespace
    Py_ssize_t value_end
    Py_ssize_t end            # index of the line's CR

cdef FieldLine field_line(const unsigned char *p, Py_ssize_t start, Py_ssize_t limit) noexcept nogil
cdef bytes lower_bytes(const unsigned char *p, Py_ssize_t n)
# p[:n] equals the lower-case literal lit[:m], ignoring ASCII case
cdef bint ieq(const unsigned char *p, Py_ssize_t n, const char *lit, Py_ssize_t m) noexcept
# the next element of the comma-separated list p[i:n] as p[s:e]; returns where to go on
cdef Py_ssize_t list_item(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, Py_ssize_t *s,
                          Py_ssize_t *e) noexcept
# the comma-separated list p[:n] holds the lower-case token tok[:m]
cdef bint has_token(const unsigned char *p, Py_ssize_t n, const char *tok, Py_ssize_t m) noexcept


cdef class Request:
    cdef public bytes method
    cdef public bytes target
    cdef public bytes path
    cdef public bytes query
    cdef public int version          # 10 or 11
    cdef public list headers         # [(lower-case name, value), ...] in arrival order
    cdef public bytes host           # lower-case, port stripped; b"" when absent
    cdef public long long content_length   # -1: no Content-Length field
    cdef public bint chunked
    cdef public bint keep_alive
    cdef public bint expect_continue
    cdef public object body          # filled by RequestParser (tests/embedding) only
    cdef public str peer             # client address, set by the connection
    cdef public bytes request_id     # X-Request-ID as sent upstream and logged, or None
    cdef public object done          # called once when its answer is complete or cut (limit_conn)
    cdef public object access_log    # its site's AccessLog, False for none, None: the listener's
    cdef public bint secure          # it came over TLS
    cdef public object policy        # the route's response policy (expserver.policy), or None
    cdef public long long body_limit  # largest body this request may send (0: none); the
                                      # connection sets the listener's, its route may lower it
    cpdef object get(self, bytes name)


cdef class Parser:
    # head scanning
    cdef int state
    cdef Py_ssize_t pos          # where scanning resumes, relative to the head start
    cdef Py_ssize_t line_start   # start of the line being scanned
    cdef Py_ssize_t head_start   # first byte of the request line (after skipped empty lines)
    cdef Py_ssize_t target_start
    cdef Py_ssize_t target_end
    cdef Py_ssize_t version_start
    cdef int nfields
    # limits
    cdef public int max_line
    cdef public int max_field
    cdef public int max_head
    cdef public int max_fields
    # body decoding
    cdef int bstate
    cdef long long remaining
    cdef long long received
    cdef Py_ssize_t aux          # chunk extension / trailer byte counter
    # last error
    cdef public int error_status
    cdef public str error_reason

    cdef void reset(self) noexcept
    cdef int _fail(self, int status, str reason) noexcept
    cdef int _check_version(self, const unsigned char *buf, Py_ssize_t cr) noexcept
    cdef bint _set_host(self, Request req, const unsigned char *p, Py_ssize_t n) except -1
    cdef int scan_head(self, const unsigned char *buf, Py_ssize_t n) noexcept
    cdef Request build(self, const unsigned char *buf)
    cdef void start_body(self, Request req) noexcept
    cdef void begin_fields(self, Py_ssize_t pos) noexcept
    cdef void start_framing(self, bint chunked, long long length, bint until_eof) noexcept
    cdef Py_ssize_t feed_body(self, const unsigned char *p, Py_ssize_t n, list out) except -2
    cdef inline bint body_done(self) noexcept:
        return self.bstate == 0
