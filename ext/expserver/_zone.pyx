# cython: language_level=3
"""Shared zones: per-key counters all workers see (rate limits, connection limits).

Theory of operation
-------------------
A ``Zone`` is an anonymous shared memory map made by the master before it forks, so every
worker of a generation updates the same table: a limit of 10 requests a second is 10 for
the whole server, not 10 per worker. The table has a fixed number of slots (memory per
zone is bounded whatever the clients send); a key (a client address, a header value) is
hashed (FNV-1a: the same in every process) and looked for in PROBES consecutive slots. A
key not found takes an empty slot among them or, when they are all used, the one touched
longest ago (eviction: an attacker cycling addresses only evicts idle keys of its own
kind first).

One spinlock word guards the table; every critical section is a few dozen instructions and
never calls out. A worker killed while holding it must not freeze the others: after
SPIN_LIMIT failed tries the lock is taken anyway.

Rate limits are nginx's leaky bucket (ngx_http_limit_req_module): ``excess`` in thousandths
of a request drains at ``rate`` per second; a key's first request starts it at 0, each later
one adds 1000; over ``burst`` * 1000 a request is refused, else it may wait ``excess`` /
``rate`` (unless nodelay). Connection limits count what is in flight per key.
"""
import mmap

from libc.stdint cimport uint32_t, uint64_t, int64_t
from libc.string cimport memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE

DEF PROBES = 8
DEF SPIN_LIMIT = 1000000

cdef extern from *:
    """
    static inline int zone_trylock(uint32_t *l) {
        uint32_t expected = 0;
        return __atomic_compare_exchange_n(l, &expected, 1, 0, __ATOMIC_ACQUIRE,
                                           __ATOMIC_RELAXED);
    }
    static inline void zone_unlock(uint32_t *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }
    """
    int zone_trylock(uint32_t *l) nogil
    void zone_unlock(uint32_t *l) nogil


cdef struct Slot:
    uint64_t key          # 0: empty
    int64_t value         # excess (rate, thousandths) or count (connections)
    int64_t stamp         # ms of the last update


cdef struct Header:
    uint32_t lock
    uint32_t pad
    uint64_t evictions


cdef inline uint64_t fnv1a(bytes data) noexcept:
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(data)
    cdef Py_ssize_t i, n = PyBytes_GET_SIZE(data)
    cdef uint64_t h = 14695981039346656037ULL
    for i in range(n):
        h ^= p[i]
        h *= 1099511628211ULL
    return h if h != 0 else 1


cdef class Zone:
    """A table of ``slots`` keyed counters in memory shared with forked processes."""
    cdef object map
    cdef Py_buffer view
    cdef Header *head
    cdef Slot *slots
    cdef Py_ssize_t nslots

    def __cinit__(self, Py_ssize_t slots=10000):
        if slots < PROBES:
            slots = PROBES
        self.nslots = slots
        self.map = mmap.mmap(-1, sizeof(Header) + sizeof(Slot) * slots)
        PyObject_GetBuffer(self.map, &self.view, PyBUF_WRITABLE)
        self.head = <Header *>self.view.buf
        self.slots = <Slot *>(<char *>self.view.buf + sizeof(Header))
        memset(self.view.buf, 0, self.view.len)

    def __dealloc__(self):
        if self.view.buf != NULL:
            PyBuffer_Release(&self.view)

    cdef void lock(self) noexcept nogil:
        cdef long spins = 0
        while not zone_trylock(&self.head.lock):
            spins += 1
            if spins > SPIN_LIMIT:      # its holder died holding it
                break

    cdef Slot *find(self, uint64_t key, int64_t now) noexcept nogil:
        """The key's slot, taken (and cleared) if it had none. Call with the lock held."""
        cdef Py_ssize_t start = key % self.nslots, i, j
        cdef Slot *s
        cdef Slot *victim = NULL
        for i in range(PROBES):
            j = (start + i) % self.nslots
            s = &self.slots[j]
            if s.key == key:
                return s
            if s.key == 0:
                if victim == NULL or victim.key != 0:
                    victim = s
            elif victim == NULL or (victim.key != 0 and s.stamp < victim.stamp):
                victim = s
        if victim.key != 0:
            self.head.evictions += 1
        victim.key = key
        victim.value = -1           # fresh: the caller's first request
        victim.stamp = now
        return victim

    def take(self, bytes key, long long now_ms, long long rate_milli, long long burst):
        """A leaky-bucket request: (admitted, delay in ms) or (refused, ms until one more
        would be admitted). ``rate_milli``: requests per second times 1000, as nginx."""
        cdef uint64_t k = fnv1a(key)
        cdef Slot *s
        cdef int64_t excess, elapsed
        cdef bint ok
        cdef long long delay = 0
        self.lock()
        s = self.find(k, now_ms)
        if s.value < 0:
            excess = 0              # a key's first request (nginx's new node)
        else:
            elapsed = now_ms - s.stamp
            if elapsed < 0:
                elapsed = 0
            excess = s.value - rate_milli * elapsed // 1000 + 1000
            if excess < 0:
                excess = 0
        ok = excess <= burst * 1000
        if ok:
            s.value = excess
            s.stamp = now_ms
            delay = excess * 1000 // rate_milli
        zone_unlock(&self.head.lock)
        if ok:
            return True, delay
        return False, (excess - burst * 1000) * 1000 // rate_milli + 1

    def acquire(self, bytes key, long long now_ms, long long limit):
        """One more in flight for ``key``, unless ``limit`` are already: True if taken."""
        cdef uint64_t k = fnv1a(key)
        cdef Slot *s
        cdef bint ok
        self.lock()
        s = self.find(k, now_ms)
        if s.value < 0:
            s.value = 0
        ok = s.value < limit
        if ok:
            s.value += 1
        s.stamp = now_ms
        zone_unlock(&self.head.lock)
        return ok

    def release(self, bytes key, long long now_ms):
        cdef uint64_t k = fnv1a(key)
        cdef Slot *s
        self.lock()
        s = self.find(k, now_ms)
        if s.value > 0:
            s.value -= 1
        else:
            s.value = 0
        s.stamp = now_ms
        zone_unlock(&self.head.lock)

    @property
    def evictions(self):
        return self.head.evictions

    @property
    def size(self):
        return self.nslots
