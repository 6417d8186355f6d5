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

``flush_tls`` is the same sink over TLS (a stdlib ``_ssl._SSLSocket`` on the connection's
own descriptor, so OpenSSL encrypts straight from our bytes and writes to the socket: no
memory BIO, no extra copy). Small items are joined into one write of at most TLS_CHUNK
bytes (one or a few records, one system call); a large item goes out in TLS_CHUNK slices;
a file is read with ``pread`` into a TLS_CHUNK buffer at a time, never whole. A write that
would block is retried later with the same bytes (``inflight``), as OpenSSL requires.

Ownership: file descriptors in FileSegments belong to the pipe and are closed when sent or
when the pipe is cleared.
"""
import os
import ssl
import sys

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.memoryview cimport PyMemoryView_FromMemory
from cpython.buffer cimport PyBUF_WRITE
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from cpython.ref cimport PyObject
from posix.dlfcn cimport dlopen, dlsym, RTLD_NOW
from expserver._sys cimport *
from expserver._access cimport Record

# ---- direct libssl calls on the stdlib's own SSL objects ---------------------------------
# The stdlib's _ssl._SSLSocket keeps its SSL* right after the object header and a weakref
# (CPython 3.7-3.13). The functions are looked up through the _ssl module's own handle,
# so they are the very libssl that made the SSL* (no second OpenSSL in the process); if any
# is missing, or the layout check in tls_direct_check fails, the stdlib's methods are used.
cdef extern from *:
    """
    typedef struct { PyObject_HEAD PyObject *Socket; void *ssl; } exp_PySSLSocket;
    """
    ctypedef struct exp_PySSLSocket:
        void *ssl

ctypedef int (*f_read_ex)(void *, void *, size_t, size_t *) nogil
ctypedef int (*f_write_ex)(void *, const void *, size_t, size_t *) nogil
ctypedef int (*f_ssl_int)(void *) nogil
ctypedef int (*f_get_error)(void *, int) nogil
ctypedef void (*f_void)() nogil
ctypedef unsigned long (*f_ulong)() nogil
ctypedef void (*f_set_int)(void *, int) nogil

cdef f_read_ex p_read_ex = NULL
cdef f_write_ex p_write_ex = NULL
cdef f_get_error p_get_error = NULL
cdef f_ssl_int p_has_pending = NULL
cdef f_ssl_int p_get_fd = NULL
cdef f_void p_clear_error = NULL
cdef f_ulong p_peek_error = NULL
cdef f_set_int p_set_read_ahead = NULL
cdef f_set_int p_set_shutdown = NULL
cdef bint DIRECT = False
cdef object SSLSocketType = ssl._ssl._SSLSocket

DEF SSL_ERROR_SSL = 1
DEF SSL_ERROR_WANT_READ = 2
DEF SSL_ERROR_WANT_WRITE = 3
DEF SSL_ERROR_SYSCALL = 5
DEF SSL_ERROR_ZERO_RETURN = 6
DEF SSL_R_UNEXPECTED_EOF_WHILE_READING = 294


cdef void _load_libssl():
    global p_read_ex, p_write_ex, p_get_error, p_has_pending, p_get_fd, p_clear_error
    global p_peek_error, p_set_read_ahead, p_set_shutdown, DIRECT
    cdef bytes path = ssl._ssl.__file__.encode()
    cdef void *h = dlopen(path, RTLD_NOW)
    if h == NULL:
        return
    p_read_ex = <f_read_ex>dlsym(h, "SSL_read_ex")
    p_write_ex = <f_write_ex>dlsym(h, "SSL_write_ex")
    p_get_error = <f_get_error>dlsym(h, "SSL_get_error")
    p_has_pending = <f_ssl_int>dlsym(h, "SSL_has_pending")
    p_get_fd = <f_ssl_int>dlsym(h, "SSL_get_fd")
    p_clear_error = <f_void>dlsym(h, "ERR_clear_error")
    p_peek_error = <f_ulong>dlsym(h, "ERR_peek_error")
    p_set_read_ahead = <f_set_int>dlsym(h, "SSL_set_read_ahead")
    p_set_shutdown = <f_set_int>dlsym(h, "SSL_set_shutdown")
    DIRECT = (p_read_ex != NULL and p_write_ex != NULL and p_get_error != NULL and
              p_has_pending != NULL and p_get_fd != NULL and p_clear_error != NULL and
              p_peek_error != NULL and p_set_read_ahead != NULL and p_set_shutdown != NULL)
    # the object layout is known for these versions only; EXPSERVER_TLS_STDLIB=1 forces the
    # stdlib's methods (the tests run both paths)
    if not (3, 7) <= sys.version_info[:2] <= (3, 13) or os.environ.get("EXPSERVER_TLS_STDLIB"):
        DIRECT = False

_load_libssl()


cdef inline void *ssl_of(object tls):
    if DIRECT and type(tls) is SSLSocketType:
        return (<exp_PySSLSocket *><PyObject *>tls).ssl
    return NULL


cdef bint tls_direct_check(object tls, int fd, bint read_ahead):
    """Once per connection: the SSL* found is the one on fd (else direct calls are off for
    good); with read_ahead, OpenSSL reads whole records (and what follows) in one recv."""
    global DIRECT
    cdef void *s = ssl_of(tls)
    if s == NULL:
        return False
    if p_get_fd(s) != fd:
        DIRECT = False
        return False
    if read_ahead:
        p_set_read_ahead(s, 1)
    return True


cdef void tls_keep_session(object tls):
    """Before the SSL object is freed: mark both directions shut (no syscall, as nginx does),
    because OpenSSL drops from its cache the session of a connection freed without
    SSL_SENT_SHUTDOWN -- and OpenSSL 3.0 clears that flag when, with
    OP_IGNORE_UNEXPECTED_EOF, a read meets the peer's EOF after our close_notify."""
    cdef void *s = ssl_of(tls)
    if s != NULL:
        p_set_shutdown(s, 3)            # SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN
        return
    try:
        tls.shutdown()                  # sends close_notify (and sets the flag)
    except Exception:
        pass


cdef bint tls_pending(object tls) except -1:
    """Bytes OpenSSL holds that the socket will not announce again (decrypted or not)."""
    cdef void *s = ssl_of(tls)
    if s != NULL:
        return p_has_pending(s) != 0
    return tls.pending() > 0

DEF MAX_IOV = 64
DEF SENDFILE_CHUNK = 1048576
DEF TLS_CHUNK = 65536

cdef object SSLWantReadError = ssl.SSLWantReadError
cdef object SSLWantWriteError = ssl.SSLWantWriteError
cdef tuple SSL_CLOSED = (ssl.SSLZeroReturnError, ssl.SSLEOFError)
cdef object SSLError = ssl.SSLError


cdef ssize_t tls_recv(object tls, unsigned char *p, Py_ssize_t n) except -2:
    """``recv`` over TLS into p[:n]: bytes read, 0 at the end, or -1 with errno (EAGAIN:
    nothing decrypted yet; ECONNRESET: a TLS error)."""
    global errno
    cdef void *s = ssl_of(tls)
    cdef size_t got = 0
    cdef int rc, e
    if s != NULL:
        p_clear_error()
        rc = p_read_ex(s, p, n, &got)
        if rc == 1:
            return got
        e = p_get_error(s, rc)
        if e == SSL_ERROR_WANT_READ or e == SSL_ERROR_WANT_WRITE:
            errno = EAGAIN
            return -1
        if e == SSL_ERROR_ZERO_RETURN:
            return 0
        if e == SSL_ERROR_SSL and (p_peek_error() & 0x7FFFFF) == SSL_R_UNEXPECTED_EOF_WHILE_READING:
            p_clear_error()
            return 0                    # the stdlib's SSLEOFError
        if e == SSL_ERROR_SYSCALL and errno == 0:
            return 0
        p_clear_error()
        errno = ECONNRESET
        return -1
    try:
        return tls.read(n, PyMemoryView_FromMemory(<char *>p, n, PyBUF_WRITE))
    except SSLWantReadError:
        errno = EAGAIN
    except SSLWantWriteError:
        errno = EAGAIN          # no renegotiation: only a peer's key update gets here
    except SSL_CLOSED:
        return 0
    except (SSLError, OSError):
        errno = ECONNRESET
    return -1

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


cdef class OpenFile:
    """A descriptor that several answers send at once (a static route's open-file cache):
    closed when the last of them, and the cache, let go of it. sendfile and pread take
    their own offsets, so sharing one descriptor is safe."""

    def __cinit__(self, int fd):
        self.fd = fd

    def __dealloc__(self):
        if self.fd >= 0:
            close(self.fd)

    def __repr__(self):
        return f"OpenFile(fd={self.fd})"


cdef class FileRange:
    """A handler's body: ``length`` bytes of open file ``fd`` from ``offset`` (see
    expserver/response.py); the connection closes ``fd``, unless it is ``shared``'s."""

    def __init__(self, int fd, long long offset, long long length, OpenFile shared=None):
        self.fd = fd
        self.offset = offset
        self.length = length
        self.shared = shared

    def __repr__(self):
        return f"FileRange(fd={self.fd}, offset={self.offset}, length={self.length})"


cdef class FileSegment:
    pass


cdef void let_go(FileSegment seg):
    """The segment is sent or dropped: its descriptor is closed, or its OpenFile released."""
    if seg.shared is None:
        if seg.fd >= 0:
            close(seg.fd)
    else:
        seg.shared = None
    seg.fd = -1


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

    cpdef int push_file(self, int fd, long offset, long long length,
                        OpenFile shared=None) except -1:
        cdef FileSegment seg = FileSegment.__new__(FileSegment)
        seg.fd = fd
        seg.shared = shared
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

    cdef int push_record(self, Record record) except -1:
        """An access-log record, reached once everything queued before it is written."""
        if self.head == len(self.items):
            self.reach(record)
        else:
            self.items.append(record)
        return 0

    cdef int reach(self, Record record) except -1:
        record.done(self.sent - self.mark_sent)    # the bytes since the last record: its own
        self.mark_sent = self.sent
        return 0

    cpdef void clear(self):
        cdef object item
        self.inflight = None
        if self.items is None:
            return
        for item in self.items[self.head:]:
            if type(item) is FileSegment:
                let_go(<FileSegment>item)
            elif type(item) is Record:
                try:
                    self.reach(<Record>item)     # a response cut short: what went out
                except Exception:
                    pass
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
        cdef Py_ssize_t i, nitems, total
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
                self.advance(r)
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
                let_go(seg)
                self.streams -= 1
                items[self.head] = None
                self.head += 1
            elif type(item) is Record:
                items[self.head] = None
                self.head += 1
                self.reach(<Record>item)
            else:
                self._pull(<_Source>item)

    cdef int advance(self, Py_ssize_t written) except -1:
        """Mark ``written`` bytes of the bytes items at the head as sent."""
        cdef Py_ssize_t left
        cdef list items = self.items
        self.sent += written
        self.size -= written
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
        return 0

    cdef object next_tls_chunk(self):
        """The bytes to hand to SSL_write next (None: the pipe is empty), and how they are
        accounted once written (``inflight_file``: from the file at the head)."""
        cdef list items = self.items
        cdef Py_ssize_t i, nitems, total
        cdef object item
        cdef bytes b, out
        cdef list parts
        cdef FileSegment seg
        cdef ssize_t r
        while True:
            if self.head > 32:
                del items[:self.head]
                self.head = 0
            nitems = len(items)
            if self.head == nitems:
                items.clear()
                self.head = 0
                return None
            item = items[self.head]
            if type(item) is bytes:
                b = <bytes>item
                self.inflight_file = False
                if len(b) - self.off >= TLS_CHUNK or self.head + 1 == nitems \
                        or type(items[self.head + 1]) is not bytes:
                    if self.off == 0 and len(b) <= TLS_CHUNK:
                        return b
                    return memoryview(b)[self.off:self.off + TLS_CHUNK]
                parts = [b[self.off:] if self.off else b]
                total = len(b) - self.off
                i = self.head + 1
                while i < nitems and type(items[i]) is bytes and \
                        total + len(<bytes>items[i]) <= TLS_CHUNK:
                    parts.append(items[i])
                    total += len(<bytes>items[i])
                    i += 1
                return join_bytes(parts)
            if type(item) is FileSegment:
                seg = <FileSegment>item
                if seg.remaining == 0:
                    let_go(seg)
                    self.streams -= 1
                    items[self.head] = None
                    self.head += 1
                    continue
                total = TLS_CHUNK if seg.remaining > TLS_CHUNK else <Py_ssize_t>seg.remaining
                out = PyBytes_FromStringAndSize(NULL, total)
                r = pread(seg.fd, PyBytes_AS_STRING(out), total, seg.offset)
                if r <= 0:
                    return False        # unreadable, or shrank under us: cannot keep the length
                self.inflight_file = True
                return out if r == total else out[:r]
            if type(item) is Record:
                items[self.head] = None
                self.head += 1
                self.reach(<Record>item)
                continue
            self._pull(<_Source>item)

    cpdef int flush_tls(self, object tls) except -2:
        """``flush`` through a TLS connection (see the module docstring)."""
        cdef object chunk
        cdef Py_ssize_t n
        cdef FileSegment seg
        while True:
            chunk = self.inflight
            if chunk is None:
                chunk = self.next_tls_chunk()
                if chunk is None:
                    return FLUSH_DONE
                if chunk is False:
                    return FLUSH_ERROR
            n = _direct_write(tls, chunk) if ssl_of(tls) != NULL else _stdlib_write(tls, chunk)
            if n == -1:
                self.inflight = chunk
                return FLUSH_AGAIN
            if n == -2:
                return FLUSH_ERROR
            self.inflight = None
            if self.inflight_file:
                seg = <FileSegment>self.items[self.head]
                seg.offset += n
                seg.remaining -= n
                self.sent += n
            else:
                self.advance(n)


cdef Py_ssize_t _stdlib_write(object tls, object chunk) except -3:
    """The same through the stdlib's method (no direct libssl calls)."""
    try:
        return tls.write(chunk)
    except (SSLWantWriteError, SSLWantReadError):
        return -1
    except (SSLError, OSError):
        return -2


cdef Py_ssize_t _direct_write(object tls, object chunk) except -3:
    """SSL_write_ex of a bytes or memoryview chunk: bytes written, -1 (retry the same chunk
    later) or -2 (the connection is broken)."""
    cdef Py_buffer buf
    cdef size_t written = 0
    cdef int rc, e
    cdef void *s = ssl_of(tls)
    PyObject_GetBuffer(chunk, &buf, PyBUF_SIMPLE)
    try:
        p_clear_error()
        rc = p_write_ex(s, buf.buf, buf.len, &written)
    finally:
        PyBuffer_Release(&buf)
    if rc == 1:
        return written
    e = p_get_error(s, rc)
    if e == SSL_ERROR_WANT_WRITE or e == SSL_ERROR_WANT_READ:
        return -1
    p_clear_error()
    return -2
