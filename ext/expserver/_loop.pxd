from libc.stdint cimport uint32_t
from expserver._sys cimport epoll_event

cdef enum:
    SMALL_BUFFER = 16384     # a client connection's first receive buffer
    LARGE_BUFFER = 65536     # an upstream connection's receive buffer

cdef class Handle

cdef class Loop:
    cdef int epfd
    cdef bint running
    cdef dict handles            # fd -> Handle: keeps registered handles alive
    cdef list timers             # heap of (when, seq, Handle)
    cdef long long seq
    cdef public double now       # monotonic time of the current iteration
    cdef list ready              # callbacks to run on the next iteration
    cdef list graveyard          # handles closed during a batch, kept alive until its end
    cdef epoll_event *evbuf
    cdef int maxevents
    cdef public object _wakeup_w
    cdef void *spares[2][16]     # freed receive buffers of the two usual sizes, for reuse
    cdef int nspares[2]
    cdef double update_time(self)
    cdef int push_timer(self, Handle h, double when) except -1
    cdef int run_timers(self) except -1
    cdef unsigned char *take_buffer(self, Py_ssize_t size) except NULL
    cdef void give_buffer(self, unsigned char *buf, Py_ssize_t size) noexcept


cdef class Handle:
    """Something the loop watches: a file descriptor, a deadline, or both."""
    cdef public int fd
    cdef Loop loop
    cdef double deadline          # monotonic seconds; 0 = no deadline
    cdef double heap_deadline     # deadline of this handle's timer-heap entry; 0 = none
    cdef uint32_t interest        # epoll events currently asked for
    cdef bint registered          # the fd is in the epoll set
    cdef int on_events(self, uint32_t events) except -1
    cdef int on_timeout(self) except -1
    cdef int set_deadline(self, double when) except -1
    cdef int watch(self, uint32_t events) except -1
    cdef int unwatch(self) except -1
