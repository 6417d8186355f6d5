cimport cython
from expserver._access cimport Record

cdef enum FlushResult:
    FLUSH_DONE = 0      # everything queued was written
    FLUSH_AGAIN = 1     # the socket is full: wait for EPOLLOUT
    FLUSH_ERROR = -1    # the peer is gone

cdef class OpenFile:
    cdef readonly int fd


cdef class FileRange:
    cdef public int fd
    cdef public long long offset
    cdef public long long length
    cdef public OpenFile shared   # None: fd is the answer's own; else it belongs to this


cdef class FileSegment:
    cdef int fd
    cdef long offset
    cdef long long remaining
    cdef OpenFile shared          # as in FileRange: who closes fd

@cython.final
cdef class Pipe:
    cdef list items               # bytes | FileSegment | iterator source, in send order
    cdef Py_ssize_t head          # index of the first unsent item
    cdef Py_ssize_t off           # bytes of items[head] already sent (bytes items)
    cdef public Py_ssize_t size   # buffered bytes not yet sent (bytes items only)
    cdef public Py_ssize_t threshold
    cdef public long long sent    # total bytes written to the sink
    cdef public int streams       # queued FileSegments and sources (each holds a file or more)
    cdef long long mark_sent      # self.sent when the last access-log Record was reached
    cdef object inflight          # TLS: the bytes of a write to retry as they are (or None)
    cdef bint inflight_file       # ... taken from the file segment at the head
    cpdef int push(self, bytes data) except -1
    cpdef int push_file(self, int fd, long offset, long long length,
                        OpenFile shared=*) except -1
    cpdef int push_source(self, object iterator, bint chunked) except -1
    cdef int push_record(self, Record record) except -1
    cdef int reach(self, Record record) except -1
    cdef inline bint full(self):
        # a queued file or stream counts as full: one open file per connection at a time,
        # whatever a pipelining client asks for
        return self.size >= self.threshold or self.streams > 0
    cdef inline bint has_room(self):
        return self.size < self.threshold
    cdef inline void hold(self):
        self.streams += 1           # a deferred answer owns the rest of the stream
    cdef inline void release(self):
        self.streams -= 1
    cdef inline bint empty(self):
        return self.head == len(self.items)
    cpdef int flush(self, int fd) except -2
    cpdef int flush_tls(self, object tls) except -2
    cdef int advance(self, Py_ssize_t written) except -1
    cdef object next_tls_chunk(self)
    cpdef void clear(self)
    cdef int _pull(self, object src) except -1


cdef bytes join_bytes(list parts)
cdef void let_go(FileSegment seg)


cdef ssize_t tls_recv(object tls, unsigned char *p, Py_ssize_t n) except -2
cdef bint tls_pending(object tls) except -1
cdef void tls_keep_session(object tls)
cdef bint tls_direct_check(object tls, int fd, bint read_ahead)
