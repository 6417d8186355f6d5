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
* Timers: an intrusive binary heap of Handles (a C array; each handle knows its
  ``heap_index``), so a handle is in the heap at most once and leaves it the moment its
  deadline is cancelled: a closed connection leaves nothing behind, whatever its deadline
  was. The set ``timed`` holds the references, not the C array, so that the cycle collector
  sees them: a loop dropped with deadlines pending is freed like any other. Invariant: a
  handle's entry has ``key <= deadline``. Moving a deadline later (every keep-alive request
  does) is a field write; when the stale key comes due the handle is re-keyed at its real
  deadline (one sift-down). An earlier deadline sifts up; cancelling (deadline 0) removes
  the entry. So arming, re-arming and cancelling are O(1) or O(log n),
  and nothing ever scans all connections. Equal deadlines fire in arming order.
* Signals: Python's ``signal.set_wakeup_fd`` writes to a pipe the loop watches; the Python
  handlers run by ``PyErr_CheckSignals`` after ``epoll_wait`` only append the signal number
  to ``signals``; the loop then calls ``on_signal`` for each, between two batches of events.
  The loop owns that pipe: ``unwatch_signals`` (or the loop's end) puts the previous wake-up
  fd back and closes both ends, so no signal is ever written to a descriptor reused since.
* The GIL is released only around ``epoll_wait``. Nothing raises through the loop: an
  exception from a handle's callback goes to that handle's ``on_error`` (by default: logged
  once with the handle's description, and the handle closed); from a deferred callback, it
  is logged. The loop itself goes on.
* Time: ``now`` is the monotonic clock read once per iteration. Tests may ``freeze_time``
  and ``advance`` it by hand, and step the loop with ``run_once``: no sleeping.
"""
import os
import signal
import threading

from cpython.exc cimport PyErr_CheckSignals
from cpython.object cimport PyObject
from libc.stdlib cimport malloc, realloc, free
from expserver._sys cimport *

from expserver import log

DEF HEAP_MIN = 64


cdef inline int _size_class(Py_ssize_t size) noexcept:
    return 0 if size == SMALL_BUFFER else 1 if size == LARGE_BUFFER else -1


cdef inline bint _before(TimerEntry *heap, Py_ssize_t i, Py_ssize_t j) noexcept:
    return heap[i].key < heap[j].key or (heap[i].key == heap[j].key and heap[i].seq < heap[j].seq)


cdef inline void _swap(TimerEntry *heap, Py_ssize_t i, Py_ssize_t j) noexcept:
    cdef TimerEntry t = heap[i]
    heap[i] = heap[j]
    heap[j] = t
    (<Handle>heap[i].handle).heap_index = i
    (<Handle>heap[j].handle).heap_index = j


cdef class Handle:

    def __cinit__(self):
        self.fd = -1
        self.deadline = 0
        self.heap_index = -1
        self.interest = 0

    cdef int on_events(self, uint32_t events) except -1:
        return 0

    cdef int on_timeout(self) except -1:
        return 0

    cdef int on_error(self, BaseException exc) except -1:
        """An exception escaped one of this handle's callbacks: say so once, and close it.
        Subclasses that owe someone an answer override this to give it first."""
        log.exception(f"internal error in {self.describe()}", exc)
        self.close()
        return 0

    cdef str describe(self):
        return type(self).__name__

    cdef int close(self) except -1:
        """Stop watching and cancel the deadline (subclasses also close what they own)."""
        self.unwatch()
        self.set_deadline(0)
        return 0

    cdef int set_deadline(self, double when) except -1:
        cdef Loop loop = self.loop
        self.deadline = when
        if when == 0:
            if self.heap_index >= 0:
                loop.heap_remove(self)
        elif self.heap_index < 0:
            loop.heap_push(self, when)
        elif when < loop.heap[self.heap_index].key:
            loop.heap_rekey(self.heap_index, when)
        # later than its key: re-keyed when the old key comes due (see run_timers)
        return 0

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

    # for tests: what the loop holds of this handle
    @property
    def in_heap(self):
        return self.heap_index >= 0

    @property
    def when(self):
        return self.deadline


cdef class Timer(Handle):
    """A one-shot Python callback at a deadline (``Loop.call_later``)."""
    cdef object callback

    cdef int on_timeout(self) except -1:
        cb, self.callback = self.callback, None
        if cb is not None:
            cb()
        return 0

    cdef int on_error(self, BaseException exc) except -1:
        log.exception(f"timer callback {self.describe()}", exc)
        return 0

    cdef str describe(self):
        return repr(self.callback)

    def cancel(self):
        self.callback = None
        self.set_deadline(0)


cdef class _Wakeup(Handle):
    """Read end of the signal wake-up pipe: drained; the Python handlers queue the signals."""

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

    cdef int on_error(self, BaseException exc) except -1:
        log.exception(f"reader callback {self.callback!r}", exc)
        return 0


cdef class Loop:

    def __cinit__(self, int maxevents=512):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, os.strerror(errno))
        self.maxevents = maxevents
        self.evbuf = <epoll_event *>malloc(sizeof(epoll_event) * maxevents)
        self.heap = <TimerEntry *>malloc(sizeof(TimerEntry) * HEAP_MIN)
        if self.evbuf == NULL or self.heap == NULL:
            raise MemoryError()
        self.heapcap = HEAP_MIN
        self.nheap = 0
        self.handles = {}
        self.timed = set()
        self.ready = []
        self.graveyard = []
        self.signals = []
        self.seq = 0
        self.running = False
        self.frozen = False
        self.wake_r = self.wake_w = -1
        self.update_time()

    def __dealloc__(self):
        cdef int k, i
        cdef Py_ssize_t j
        try:
            self.close_wakeup(False)    # its handle may be gone (cycle collector): no unwatch
        except BaseException:
            pass
        if self.epfd >= 0:
            close(self.epfd)
        free(self.evbuf)
        if self.heap != NULL:
            if self.timed is not None:
                # freed by its last reference: the handles still in the heap outlive it
                # (after the cycle collector's clear, ``timed`` is gone and so may they be)
                for j in range(self.nheap):
                    (<Handle>self.heap[j].handle).heap_index = -1
            free(self.heap)
        for k in range(2):
            for i in range(self.nspares[k]):
                free(self.spares[k][i])

    cdef double update_time(self) noexcept:
        cdef timespec ts
        if not self.frozen:
            clock_gettime(CLOCK_MONOTONIC, &ts)
            self.now = ts.tv_sec + ts.tv_nsec * 1e-9
        return self.now

    # ------------------------------------------------------------------ timer heap
    cdef void sift_up(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t parent
        while i > 0:
            parent = (i - 1) >> 1
            if not _before(self.heap, i, parent):
                break
            _swap(self.heap, i, parent)
            i = parent

    cdef void sift_down(self, Py_ssize_t i) noexcept:
        cdef Py_ssize_t child
        while True:
            child = 2 * i + 1
            if child >= self.nheap:
                break
            if child + 1 < self.nheap and _before(self.heap, child + 1, child):
                child += 1
            if not _before(self.heap, child, i):
                break
            _swap(self.heap, i, child)
            i = child

    cdef int heap_push(self, Handle h, double key) except -1:
        cdef TimerEntry *grown
        cdef Py_ssize_t i = self.nheap
        if i == self.heapcap:
            grown = <TimerEntry *>realloc(self.heap, sizeof(TimerEntry) * self.heapcap * 2)
            if grown == NULL:
                raise MemoryError()
            self.heap = grown
            self.heapcap *= 2
        self.timed.add(h)
        self.seq += 1
        self.heap[i].key = key
        self.heap[i].seq = self.seq
        self.heap[i].handle = <PyObject *>h
        h.heap_index = i
        self.nheap += 1
        self.sift_up(i)
        return 0

    cdef void heap_remove(self, Handle h) noexcept:
        cdef Py_ssize_t i = h.heap_index
        cdef TimerEntry *grown
        h.heap_index = -1
        self.nheap -= 1
        if i != self.nheap:
            self.heap[i] = self.heap[self.nheap]
            (<Handle>self.heap[i].handle).heap_index = i
            self.sift_down(i)
            self.sift_up(i)
        if self.heapcap > HEAP_MIN and self.nheap < self.heapcap // 4:
            # after a burst of connections: give the memory back
            grown = <TimerEntry *>realloc(self.heap, sizeof(TimerEntry) * (self.heapcap // 2))
            if grown != NULL:
                self.heap = grown
                self.heapcap //= 2
        self.timed.discard(h)   # last: it may free h

    cdef void heap_rekey(self, Py_ssize_t i, double key) noexcept:
        cdef bint earlier = key < self.heap[i].key
        self.heap[i].key = key
        self.seq += 1
        self.heap[i].seq = self.seq
        if earlier:
            self.sift_up(i)
        else:
            self.sift_down(i)

    cdef int run_timers(self) except -1:
        cdef Handle h
        while self.nheap > 0 and self.heap[0].key <= self.now:
            h = <Handle>self.heap[0].handle     # a new reference: on_timeout may free it
            if h.deadline > self.now:
                self.heap_rekey(0, h.deadline)  # moved later since it was keyed
                continue
            self.heap_remove(h)
            h.deadline = 0
            try:
                h.on_timeout()
            except BaseException as exc:
                self.fault(h, exc)
        return 0

    cdef int fault(self, Handle h, BaseException exc) except -1:
        """Give an exception from ``h``'s callback to ``h.on_error``; never raise (but for
        the interpreter asking to exit)."""
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise exc
        try:
            h.on_error(exc)
        except BaseException as again:
            log.exception(f"while recovering {type(h).__name__}", again)
            try:
                h.close()
            except BaseException:
                Handle.close(h)             # at least stop watching it
        return 0

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

    # -------------------------------------------------------------- Python API
    @property
    def time(self):
        return self.now

    @property
    def timer_count(self):
        """Handles in the timer heap (each at most once)."""
        return self.nheap

    def freeze_time(self, now=None):
        """Tests: from now on ``now`` moves only by ``advance``."""
        self.frozen = True
        if now is not None:
            self.now = now

    def advance(self, double seconds):
        self.now += seconds

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
        """Call ``handler(signum)`` from the loop for each of ``signals`` received (main
        thread only). Called again, it replaces the handler; the loop keeps one pipe."""
        self.close_wakeup(True)
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        cdef _Wakeup wake = _Wakeup.__new__(_Wakeup)
        wake.loop = self
        wake.fd = r
        try:
            wake.watch(EPOLLIN)
            self.wake_prev = signal.set_wakeup_fd(w)
        except BaseException:
            wake.unwatch()
            os.close(r)
            os.close(w)
            raise
        self.waker = wake
        self.wake_r = r
        self.wake_w = w
        self.on_signal = handler
        queue = self.signals
        for s in signals:
            signal.signal(s, lambda signum, frame: queue.append(signum))

    def unwatch_signals(self):
        """Stop watching signals: the wake-up fd goes back to the one before
        ``watch_signals`` and the pipe is closed. The Python signal handlers stay (the caller
        restores them): a signal received later is queued, and nothing acts on it."""
        self.close_wakeup(True)

    cdef int close_wakeup(self, bint unwatch) except -1:
        if self.wake_w < 0:
            return 0
        if threading.current_thread() is not threading.main_thread():
            return 0        # only the main thread may set the wake-up fd: ours stays open
        try:
            mine = signal.set_wakeup_fd(self.wake_prev)
        except (OSError, ValueError):
            mine = signal.set_wakeup_fd(-1)     # the earlier fd is closed by now
        if mine != self.wake_w:
            signal.set_wakeup_fd(mine)          # another's since ours: it stays
        if unwatch and self.waker is not None:
            self.waker.unwatch()
        self.waker = None
        close(self.wake_r)
        close(self.wake_w)
        self.wake_r = self.wake_w = -1
        return 0

    def close(self):
        """Release the loop's descriptors now (epoll, the wake-up pipe), not when the last
        reference goes (a thread may hold one: the proxy's resolver holds its route's).
        Idempotent; a closed loop cannot run again."""
        self.close_wakeup(True)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    def stop(self):
        self.running = False

    def run_once(self, double timeout=0):
        """Tests: one iteration, waiting at most ``timeout`` seconds for an event."""
        self.iterate(<int>(timeout * 1000))

    def run(self):
        """Run until ``stop()``."""
        cdef int timeout
        cdef double delay
        self.running = True
        while self.running:
            if self.ready or self.signals:
                timeout = 0
            elif self.nheap > 0:
                delay = self.heap[0].key - self.update_time()
                # epoll takes an int of milliseconds: a far deadline is simply waited for again
                timeout = 0 if delay <= 0 else <int>(min(delay, 2000000.0) * 1000) + 1
            else:
                timeout = -1
            self.iterate(timeout)

    cdef int iterate(self, int timeout) except -1:
        cdef int n, i
        cdef Handle h
        cdef list ready
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
            self.dispatched += 1
            try:
                h.on_events(self.evbuf[i].events)
            except BaseException as exc:
                self.fault(h, exc)
        if self.nheap > 0:
            self.run_timers()
        while self.signals:
            signum = self.signals.pop(0)
            try:
                self.on_signal(signum)
            except BaseException as exc:
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                log.exception(f"handling signal {signum}", exc)
        if self.ready:
            ready, self.ready = self.ready, []
            for cb in ready:
                try:
                    cb()
                except (KeyboardInterrupt, SystemExit):
                    raise
                except BaseException as exc:
                    log.exception(f"deferred callback {cb!r}", exc)
        if self.graveyard:
            self.graveyard = []
        return 0

