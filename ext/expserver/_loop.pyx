# cython: language_level=3
"""The event loop: level-triggered epoll, a timer heap, deferred callbacks, signals.

Theory of operation
-------------------
* A ``Handle`` owns one file descriptor (or none, for a pure timer). ``watch(events)``
  registers or changes its epoll interest; the event's ``data.ptr`` is the Handle itself, and
  ``Loop.handles`` holds the reference that keeps it alive while it is registered. A handle
  closed in the middle of a batch goes to ``graveyard`` so a later event of the same batch
  never points at freed memory.
* Level-triggered: a handle that stops wanting input (its output pipe is full) drops
  EPOLLIN from its interest; it is never left readable-but-ignored, which would spin.
* Timers: each Handle has one ``deadline``. Moving a deadline later (every keep-alive
  request does) is a field write; the heap entry stays and, when it comes due, is re-pushed
  at the new deadline. Only an earlier deadline pushes a new entry; the old one is then
  stale (its time differs from ``heap_deadline``) and is dropped when popped. So arming is
  O(1) or O(log n) and nothing ever scans all connections.
* Signals: Python's ``signal.set_wakeup_fd`` writes to a pipe the loop watches; the
  handlers themselves are plain Python functions run by ``PyErr_CheckSignals`` right after
  ``epoll_wait`` returns. They only set flags or call ``stop``; the loop acts.
* The GIL is released only around ``epoll_wait``. Callbacks never let an exception escape
  into the loop's C code: an exception from a handle is logged and that handle is closed.
"""
import heapq
import os
import signal
import sys
import traceback

from cpython.exc cimport PyErr_CheckSignals
from libc.stdlib cimport malloc, free
from expserver._sys cimport *

cdef object _heappush = heapq.heappush
cdef object _heappop = heapq.heappop


cdef inline int _size_class(Py_ssize_t size) noexcept:
    return 0 if size == SMALL_BUFFER else 1 if size == LARGE_BUFFER else -1


cdef class Handle:

    def __cinit__(self):
        self.fd = -1
        self.deadline = 0
        self.heap_deadline = 0
        self.interest = 0

    cdef int on_events(self, uint32_t events) except -1:
        return 0

    cdef int on_timeout(self) except -1:
        return 0

    cdef int set_deadline(self, double when) except -1:
        self.deadline = when
        if when > 0 and (self.heap_deadline == 0 or when < self.heap_deadline):
            self.loop.push_timer(self, when)

    cdef int watch(self, uint32_t events) except -1:
        """Register the fd or change its events (0: only hang-ups and errors)."""
        cdef epoll_event ev
        if self.registered and events == self.interest:
            return 0
        ev.events = events
        ev.data.ptr = <void *>self
        if not self.registered:
            if epoll_ctl(self.loop.epfd, EPOLL_CTL_ADD, self.fd, &ev) < 0:
                raise OSError(errno, os.strerror(errno))
            self.loop.handles[self.fd] = self
            self.registered = True
        elif epoll_ctl(self.loop.epfd, EPOLL_CTL_MOD, self.fd, &ev) < 0:
            raise OSError(errno, os.strerror(errno))
        self.interest = events
        return 0

    cdef int unwatch(self) except -1:
        """Stop watching the fd (before closing it) and keep self alive to the batch end."""
        cdef epoll_event ev
        if self.registered:
            epoll_ctl(self.loop.epfd, EPOLL_CTL_DEL, self.fd, &ev)
            self.interest = 0
            self.registered = False
            self.loop.graveyard.append(self)
            del self.loop.handles[self.fd]
        return 0


cdef class Timer(Handle):
    """A one-shot Python callback at a deadline (``Loop.call_later``)."""
    cdef object callback

    cdef int on_timeout(self) except -1:
        cb, self.callback = self.callback, None
        if cb is not None:
            cb()
        return 0

    def cancel(self):
        self.callback = None
        self.set_deadline(0)


cdef class _Wakeup(Handle):
    """Read end of the signal wake-up pipe: drained; the Python handlers do the work."""

    cdef int on_events(self, uint32_t events) except -1:
        cdef char buf[256]
        while read(self.fd, buf, sizeof(buf)) > 0:
            pass
        return 0


cdef class PyHandle(Handle):
    """A file descriptor watched on behalf of plain Python code (``Loop.add_reader``)."""
    cdef object callback

    cdef int on_events(self, uint32_t events) except -1:
        self.callback()
        return 0


cdef class Loop:

    def __cinit__(self, int maxevents=512):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self.maxevents = maxevents
        self.evbuf = <epoll_event *>malloc(sizeof(epoll_event) * maxevents)
        if self.evbuf == NULL:
            raise MemoryError()
        self.handles = {}
        self.timers = []
        self.ready = []
        self.graveyard = []
        self.seq = 0
        self.running = False
        self.update_time()

    def __dealloc__(self):
        cdef int k, i
        if self.epfd >= 0:
            close(self.epfd)
        free(self.evbuf)
        for k in range(2):
            for i in range(self.nspares[k]):
                free(self.spares[k][i])

    cdef double update_time(self):
        cdef timespec ts
        clock_gettime(CLOCK_MONOTONIC, &ts)
        self.now = ts.tv_sec + ts.tv_nsec * 1e-9
        return self.now

    cdef int push_timer(self, Handle h, double when) except -1:
        self.seq += 1
        h.heap_deadline = when
        _heappush(self.timers, (when, self.seq, h))

    # Receive buffers: a connection holds one only while bytes are pending, so most requests
    # take one and give it back; a few spares of the two sizes in use (a client's first
    # buffer, an upstream's) save a malloc/free pair per read.
    cdef unsigned char *take_buffer(self, Py_ssize_t size) except NULL:
        cdef int k = _size_class(size)
        cdef void *buf
        if k >= 0 and self.nspares[k] > 0:
            self.nspares[k] -= 1
            return <unsigned char *>self.spares[k][self.nspares[k]]
        buf = malloc(size)
        if buf == NULL:
            raise MemoryError()
        return <unsigned char *>buf

    cdef void give_buffer(self, unsigned char *buf, Py_ssize_t size) noexcept:
        cdef int k = _size_class(size)
        if k >= 0 and self.nspares[k] < 16:
            self.spares[k][self.nspares[k]] = buf
            self.nspares[k] += 1
        else:
            free(buf)

    cdef int run_timers(self) except -1:
        cdef Handle h
        cdef double when
        cdef list timers = self.timers
        while timers and (<tuple>timers[0])[0] <= self.now:
            when, _, h = _heappop(timers)
            if when != h.heap_deadline:
                continue          # stale: an earlier entry replaced it
            h.heap_deadline = 0
            if h.deadline == 0:
                continue          # cancelled
            if h.deadline > self.now:
                self.push_timer(h, h.deadline)   # moved later since it was pushed
                continue
            h.deadline = 0
            try:
                h.on_timeout()
            except BaseException as exc:
                self._handle_error(h, exc)
        return 0

    def _handle_error(self, Handle h, exc):
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        print(f"expserver: internal error in {type(h).__name__}:", file=sys.stderr)
        traceback.print_exception(exc, file=sys.stderr)
        close = getattr(h, "abort", None)
        if close is not None:
            try:
                close()
            except Exception:
                pass

    # -------------------------------------------------------------- Python API
    @property
    def time(self):
        return self.now

    def call_soon(self, callback):
        self.ready.append(callback)

    def call_later(self, double delay, callback):
        cdef Timer t = Timer.__new__(Timer)
        t.loop = self
        t.callback = callback
        t.set_deadline(self.update_time() + delay)
        return t

    def add_reader(self, int fd, callback):
        """Watch ``fd`` for input and call ``callback()``; returns the handle."""
        cdef PyHandle h = PyHandle.__new__(PyHandle)
        h.loop = self
        h.fd = fd
        h.callback = callback
        h.watch(EPOLLIN)
        return h

    def remove_reader(self, PyHandle h):
        h.unwatch()

    def watch_signals(self, signals, handler):
        """Route ``signals`` to ``handler(signum)`` through the loop's wake-up pipe."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        cdef _Wakeup wake = _Wakeup.__new__(_Wakeup)
        wake.loop = self
        wake.fd = r
        wake.watch(EPOLLIN)
        self._wakeup_w = w
        signal.set_wakeup_fd(w)
        for s in signals:
            signal.signal(s, lambda signum, frame: handler(signum))

    def stop(self):
        self.running = False

    def run(self):
        """Run until ``stop()``."""
        cdef int n, i, timeout
        cdef Handle h
        cdef double delay
        cdef list ready
        self.running = True
        while self.running:
            if self.ready:
                timeout = 0
            elif self.timers:
                delay = (<tuple>self.timers[0])[0] - self.update_time()
                timeout = 0 if delay <= 0 else <int>(delay * 1000) + 1
            else:
                timeout = -1
            with nogil:
                n = epoll_wait(self.epfd, self.evbuf, self.maxevents, timeout)
            if n < 0:
                if errno != EINTR:
                    raise OSError(errno, os.strerror(errno))
                n = 0
            PyErr_CheckSignals()
            self.update_time()
            for i in range(n):
                h = <Handle>self.evbuf[i].data.ptr
                if not h.registered:
                    continue      # closed earlier in this batch
                try:
                    h.on_events(self.evbuf[i].events)
                except BaseException as exc:
                    self._handle_error(h, exc)
            if self.timers:
                self.run_timers()
            if self.ready:
                ready, self.ready = self.ready, []
                for cb in ready:
                    try:
                        cb()
                    except (KeyboardInterrupt, SystemExit):
                        raise
                    except BaseException:
                        traceback.print_exc()
            if self.graveyard:
                self.graveyard = []
