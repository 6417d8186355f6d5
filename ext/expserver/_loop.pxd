from cpython.object cimport PyObject
from libc.stdint cimport uint32_t
from expserver._sys cimport epoll_event

cdef enum:
    SMALL_BUFFER = 16384     # a client connection's first receive buffer
    LARGE_BUFFER = 65536     # an upstream connection's receive buffer

cdef class Handle

cdef struct TimerEntry:
    double key                   # <= the handle's deadline
    unsigned long long seq       # arming order: equal keys fire first-in first-out
    PyObject *handle             # borrowed: ``Loop.timed`` holds the reference

cdef class Loop:
    cdef int epfd
    cdef bint running
    cdef dict handles            # fd -> Handle: keeps registered handles alive
    cdef TimerEntry *heap        # binary min-heap by (key, seq)
    cdef set timed               # the handles in the heap, owned where the GC can see them
    cdef Py_ssize_t nheap, heapcap
    cdef unsigned long long seq
    cdef public double now       # monotonic time of the current iteration
    cdef public unsigned long long dispatched   # events handed to handles so far (tests)
    cdef bint frozen             # tests: ``now`` moves only by ``advance``
    cdef list ready              # callbacks to run on the next iteration
    cdef list graveyard          # handles closed during a batch, kept alive until its end
    cdef list signals            # signal numbers received, acted on by the loop
    cdef object on_signal
    cdef epoll_event *evbuf
    cdef int maxevents
    cdef Handle waker            # the read end of the signal wake-up pipe (watch_signals)
    cdef int wake_r, wake_w      # the pipe; wake_w is Python's wake-up fd; -1: none
    cdef int wake_prev           # the wake-up fd before ours, put back when we stop
    cdef void *spares[2][16]     # freed receive buffers of the two usual sizes, for reuse
    cdef int nspares[2]
    cdef double update_time(self) noexcept
    cdef int heap_push(self, Handle h, double key) except -1
    cdef void heap_remove(self, Handle h) noexcept
    cdef void heap_rekey(self, Py_ssize_t i, double key) noexcept
    cdef void sift_up(self, Py_ssize_t i) noexcept
    cdef void sift_down(self, Py_ssize_t i) noexcept
    cdef int run_timers(self) except -1
    cdef int iterate(self, int timeout) except -1
    cdef int fault(self, Handle h, BaseException exc) except -1
    cdef int close_wakeup(self, bint unwatch) except -1
    cdef unsigned char *take_buffer(self, Py_ssize_t size) except NULL
    cdef void give_buffer(self, unsigned char *buf, Py_ssize_t size) noexcept


cdef class Handle:
    """Something the loop watches: a file descriptor, a deadline, or both."""
    cdef public int fd
    cdef Loop loop
    cdef double deadline          # monotonic seconds; 0 = no deadline
    cdef Py_ssize_t heap_index    # its entry in the loop's timer heap; -1: none
    cdef uint32_t interest        # epoll events currently asked for
    cdef bint registered          # the fd is in the epoll set
    cdef int on_events(self, uint32_t events) except -1
    cdef int on_timeout(self) except -1
    cdef int on_error(self, BaseException exc) except -1
    cdef str describe(self)
    cdef int close(self) except -1
    cdef int set_deadline(self, double when) except -1
    cdef int watch(self, uint32_t events) except -1
    cdef int unwatch(self) except -1
