# The access log's records and formatter (see _access.pyx).

cdef class AccessLog

cdef class Record:
    cdef AccessLog log
    cdef bytes peer, method, target, host, referer, agent, tls, request_id
    cdef public bytes upstream            # the proxy's peer, "host:port"
    cdef public double upstream_time      # seconds to the upstream's response head (-1: none)
    cdef int version, status
    cdef long long head                   # bytes of the response head
    cdef double started                   # monotonic: the request head was complete
    cdef int done(self, long long sent) except -1


cdef class AccessLog:
    cdef int kind                 # COMBINED, JSON, TEMPLATE
    cdef list ops                 # TEMPLATE: (literal bytes, field number) pairs
    cdef char *buf
    cdef Py_ssize_t used, cap
    cdef int lines                # lines in buf
    cdef public object sink       # .submit(bytes) -> bool (False: dropped, never waits)
    cdef public long long written, dropped
    cdef bytes when, iso          # the time of the current second, formatted
    cdef long long when_second
    cdef int put(self, const char *p, Py_ssize_t n) except -1
    cdef int put_bytes(self, bytes b) except -1
    cdef int put_escaped(self, bytes b, bint json) except -1
    cdef int put_field(self, Record r, int field, long long size, double duration) except -1
    cdef int emit(self, Record r, long long sent) except -1
    cdef int json(self, Record r, long long sent, double duration) except -1
    cdef Record record(self, object req, bytes peer, bytes tls, double started, int status,
                       long long head)
