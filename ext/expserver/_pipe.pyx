# cython: language_level=3
"""Pipes: eXpServer's one-way byte channel from sources to a sink, with a threshold.

Theory of operation
-------------------
A connection's response side is one ``Pipe`` whose sink is the client socket. Items are
queued in the order they must be sent: ``bytes`` (response heads, small bodies), a
``FileSegment`` (sent with ``sendfile``, never through user space) or an iterator source
(e.g. a compressor) that is pulled for one chunk at a time, only when it reaches the head
of the queue. So the bytes held in user space are bounded by what the connection queued
itself plus one chunk; ``size`` counts them and ``full()`` (size >= threshold, or a file or
stream still queued) is the backpressure signal: the owner stops reading new requests while
its pipe is full, so a pipelining client holds at most one open file at a time.

``flush`` gathers consecutive bytes items into one ``sendmsg`` (at most 64 iovecs) and
passes MSG_MORE when a file follows, so a response head and a small file share a segment.
Ownership: file descriptors in FileSegments belong to the pipe and are closed when sent or
when the pipe is cleared.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.string cimport memcpy
from expserver._sys cimport *

DEF MAX_IOV = 64
DEF SENDFILE_CHUNK = 1048576

cdef bytes CHUNK_END = b"\r\n"
cdef bytes LAST_CHUNK = b"0\r\n\r\n"


cdef bytes join_bytes(list parts):
    """``b"".join(parts)`` for a list of bytes, without a buffer request per part."""
    cdef Py_ssize_t size = 0
    cdef bytes b, out
    cdef char *q
    for b in parts:
        size += len(b)
    out = PyBytes_FromStringAndSize(NULL, size)
    q = PyBytes_AS_STRING(out)
    for b in parts:
        memcpy(q, PyBytes_AS_STRING(b), len(b))
        q += len(b)
    return out


cdef class FileRange:
    """A handler's body: ``length`` bytes of open file ``fd`` from ``offset`` (see
    expserver/response.py); the connection closes ``fd``."""

    def __init__(self, int fd, long long offset, long long length):
        self.fd = fd
        self.offset = offset
        self.length = length

    def __repr__(self):
        return f"FileRange(fd={self.fd}, offset={self.offset}, length={self.length})"


cdef class FileSegment:
    pass


cdef class _Source:
    """An iterator of bytes chunks, framed as HTTP chunks when ``chunked``."""
    cdef object it
    cdef bint chunked


cdef class Pipe:

    def __cinit__(self, Py_ssize_t threshold=65536):
        self.items = []
        self.head = 0
        self.off = 0
        self.size = 0
        self.streams = 0
        self.threshold = threshold
        self.sent = 0

    def __dealloc__(self):
        self.clear()

    # tests: the state the owner sees
    @property
    def is_full(self):
        return self.full()

    @property
    def is_empty(self):
        return self.empty()

    cpdef int push(self, bytes data) except -1:
        if len(data):
            self.items.append(data)
            self.size += len(data)
        return 0

    cpdef int push_file(self, int fd, long offset, long long length) except -1:
        cdef FileSegment seg = FileSegment.__new__(FileSegment)
        seg.fd = fd
        seg.offset = offset
        seg.remaining = length
        self.items.append(seg)
        self.streams += 1
        return 0

    cpdef int push_source(self, object iterator, bint chunked) except -1:
        cdef _Source src = _Source.__new__(_Source)
        src.it = iter(iterator)
        src.chunked = chunked
        self.items.append(src)
        self.streams += 1
        return 0

    cpdef void clear(self):
        cdef object item
        if self.items is None:
            return
        for item in self.items[self.head:]:
            if type(item) is FileSegment and (<FileSegment>item).fd >= 0:
                close((<FileSegment>item).fd)
                (<FileSegment>item).fd = -1
        self.items = []
        self.head = 0
        self.off = 0
        self.size = 0
        self.streams = 0

    cdef int _pull(self, object source) except -1:
        cdef _Source src = <_Source>source
        """Replace the source at the head by its next chunk (and keep it behind)."""
        cdef bytes chunk
        try:
            chunk = next(src.it)
            while not chunk:
                chunk = next(src.it)
        except StopIteration:
            self.streams -= 1
            if src.chunked:
                self.items[self.head] = LAST_CHUNK
                self.size += len(LAST_CHUNK)
            else:
                self.items[self.head] = None
                self.head += 1
            return 0
        if src.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        self.items.insert(self.head, chunk)
        self.size += len(chunk)
        return 0

    cpdef int flush(self, int fd) except -2:
        cdef iovec iov[MAX_IOV]
        cdef msghdr msg
        cdef int n, flags
        cdef Py_ssize_t i, nitems, written, left, total
        cdef object item
        cdef bytes b
        cdef FileSegment seg
        cdef ssize_t r
        cdef list items = self.items
        while True:
            if self.head > 32:
                del items[:self.head]     # keep a long stream's list short
                self.head = 0
            nitems = len(items)
            if self.head == nitems:
                items.clear()
                self.head = 0
                return FLUSH_DONE
            item = items[self.head]
            if type(item) is bytes:
                n = 0
                total = 0
                i = self.head
                while i < nitems and n < MAX_IOV and type(items[i]) is bytes:
                    b = <bytes>items[i]
                    iov[n].iov_base = <char *>b + (self.off if i == self.head else 0)
                    iov[n].iov_len = len(b) - (self.off if i == self.head else 0)
                    total += iov[n].iov_len
                    n += 1
                    i += 1
                flags = MSG_NOSIGNAL
                if i < nitems and type(items[i]) is FileSegment:
                    flags |= MSG_MORE
                msg.msg_name = NULL
                msg.msg_namelen = 0
                msg.msg_iov = iov
                msg.msg_iovlen = n
                msg.msg_control = NULL
                msg.msg_controllen = 0
                msg.msg_flags = 0
                r = sendmsg(fd, &msg, flags)
                if r < 0:
                    if errno == EAGAIN or errno == EINTR:
                        return FLUSH_AGAIN
                    return FLUSH_ERROR
                self.sent += r
                self.size -= r
                written = r
                # advance over what was written
                while written > 0:
                    left = len(<bytes>items[self.head]) - self.off
                    if written >= left:
                        written -= left
                        items[self.head] = None
                        self.head += 1
                        self.off = 0
                    else:
                        self.off += written
                        written = 0
                if r < total:
                    return FLUSH_AGAIN      # partial write: the socket is full
                # a whole batch (MAX_IOV items) went out: go on with the next one
            elif type(item) is FileSegment:
                seg = <FileSegment>item
                while seg.remaining > 0:
                    r = sendfile(fd, seg.fd, &seg.offset,
                                 SENDFILE_CHUNK if seg.remaining > SENDFILE_CHUNK
                                 else <size_t>seg.remaining)
                    if r < 0:
                        if errno == EAGAIN or errno == EINTR:
                            return FLUSH_AGAIN
                        return FLUSH_ERROR
                    if r == 0:
                        # the file shrank under us: the promised length cannot be kept
                        return FLUSH_ERROR
                    seg.remaining -= r
                    self.sent += r
                close(seg.fd)
                seg.fd = -1
                self.streams -= 1
                items[self.head] = None
                self.head += 1
            else:
                self._pull(<_Source>item)
