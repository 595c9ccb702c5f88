# cython: language_level=3
# Not freethreading_compatible: a table's mutex is taken with the GIL held
# (Python callers) or without it (its reader thread, which never takes the
# GIL); a free-threaded build keeps the GIL on import.
# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: binding=False
# Compiled twin of _core_py.py: the same algorithm on C arrays, so a datagram
# is parsed in the receive buffer and applied to the table with no Python
# object, and both twins return identical results in identical order.
# The reader thread (described in _core_py's docstring) is a pthread that
# blocks in recvmmsg(MSG_WAITFORONE) into its own buffers, takes the table's
# mutex to apply a batch, and is stopped by shutdown(SHUT_RD) on its socket.

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.errno cimport EAGAIN, EINTR, errno
from libc.math cimport floor
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport strtod
from libc.string cimport memchr, memcmp, memcpy, memset
from posix.time cimport (
    CLOCK_MONOTONIC,
    CLOCK_REALTIME,
    clock_gettime,
    nanosleep,
    timespec,
)
from posix.unistd cimport close

from ._syscalls cimport (
    CMSG_DATA,
    CMSG_FIRSTHDR,
    CMSG_LEN,
    CMSG_NXTHDR,
    CMSG_SPACE,
    MSG_CMSG_CLOEXEC,
    MSG_CTRUNC,
    SCM_CREDENTIALS,
    SCM_RIGHTS,
    SO_RXQ_OVFL,
    SOL_SOCKET,
    cmsghdr,
    ucred,
    MSG_DONTWAIT,
    MSG_TRUNC,
    MSG_WAITFORONE,
    PTHREAD_MUTEX_RECURSIVE,
    SHUT_RD,
    iovec,
    mmsghdr,
    pthread_create,
    pthread_join,
    pthread_mutex_destroy,
    pthread_mutex_init,
    pthread_mutex_lock,
    pthread_mutex_t,
    pthread_mutex_trylock,
    pthread_mutex_unlock,
    pthread_mutexattr_destroy,
    pthread_mutexattr_init,
    pthread_mutexattr_settype,
    pthread_mutexattr_t,
    pthread_t,
    recvmmsg,
    shutdown,
)

cdef extern from *:
    # gcc and clang: start loading a cache line we will need soon.
    void __builtin_prefetch(const void *addr) noexcept nogil

cdef extern from "<string.h>" nogil:
    void *memrchr(const void *s, int c, size_t n)  # GNU, with _GNU_SOURCE

import os

from ._core_py import (
    ERROR_PAUSE,
    FLOOD_BATCH,
    FLOOD_READ,
    FLOOD_SMOOTHING,
    LONGEST_WAIT,
    DrainCounts,
    _check_args,
    _check_reader_args,
    _check_pid,
    _check_seconds,
    _wheel_size,
)

cdef enum:
    MAX_DATAGRAM = 1024
    # One recvmmsg call moves up to BATCH datagrams: 64 keeps the
    # receive buffers (64 x 1025 bytes) inside L2 while amortising the syscall.
    BATCH = 64
    RECV_SIZE = MAX_DATAGRAM + 1  # one spare byte tells an oversized datagram
    # SCM_RIGHTS descriptors that fit the control buffer; the kernel closes
    # the rest and sets MSG_CTRUNC (unix(7)).  _core_py._MAX_PASSED_FDS.
    MAX_PASSED_FDS = 32
    NONE = -1
    EMPTY = 0  # hash key of a free entry: 0 is never a valid pid

cdef enum:
    # Indices of a counts array: DrainCounts' fields after ``datagrams``,
    # then heartbeats that could not be re-filed (no memory).
    HEARTBEATS = 0
    UNKNOWN = 1
    MALFORMED = 2
    STALE = 3
    UNFILED = 4

cdef double FLOOD_PASS = FLOOD_BATCH
cdef double FLOOD_AIM = FLOOD_READ
cdef double LONGEST = LONGEST_WAIT
cdef double FLOOD_WEIGHT = 1.0 / FLOOD_SMOOTHING
cdef double ERROR_SLEEP = ERROR_PAUSE
cdef int32_t PID_MAX = 2147483647  # as _core_py's (the twin tests hold both)

# Room for the control messages of one datagram: SO_RXQ_OVFL (a uint32_t drop
# count), SCM_CREDENTIALS (a struct ucred) and SCM_RIGHTS (up to
# MAX_PASSED_FDS ints), each padded by CMSG_SPACE(3) as this platform's
# headers define it; _core_py._CONTROL_SIZE is the same sum (socket.CMSG_SPACE).
cdef size_t CONTROL_SIZE = (
    CMSG_SPACE(sizeof(uint32_t))
    + CMSG_SPACE(sizeof(ucred))
    + CMSG_SPACE(MAX_PASSED_FDS * sizeof(int))
)


ctypedef struct RecvBuf:
    # BATCH datagrams of RECV_SIZE bytes and their control data, for recvmmsg.
    unsigned char *data
    mmsghdr *msgs
    iovec *iov
    unsigned char *control


cdef int _recvbuf_alloc(RecvBuf *b) noexcept:
    # 0, or -1 (with nothing left allocated) when memory is short.
    cdef int i
    b.data = <unsigned char *>PyMem_RawMalloc(BATCH * RECV_SIZE)
    b.msgs = <mmsghdr *>PyMem_RawMalloc(BATCH * sizeof(mmsghdr))
    b.iov = <iovec *>PyMem_RawMalloc(BATCH * sizeof(iovec))
    b.control = <unsigned char *>PyMem_RawMalloc(BATCH * CONTROL_SIZE)
    if b.data == NULL or b.msgs == NULL or b.iov == NULL or b.control == NULL:
        _recvbuf_free(b)
        return -1
    memset(b.msgs, 0, BATCH * sizeof(mmsghdr))
    for i in range(BATCH):
        b.iov[i].iov_base = b.data + i * RECV_SIZE
        b.iov[i].iov_len = RECV_SIZE
        b.msgs[i].msg_hdr.msg_iov = &b.iov[i]
        b.msgs[i].msg_hdr.msg_iovlen = 1
        b.msgs[i].msg_hdr.msg_control = b.control + i * CONTROL_SIZE
    return 0


cdef void _recvbuf_free(RecvBuf *b) noexcept nogil:
    PyMem_RawFree(b.data)
    PyMem_RawFree(b.msgs)
    PyMem_RawFree(b.iov)
    PyMem_RawFree(b.control)
    memset(b, 0, sizeof(RecvBuf))


cdef inline int _recvmmsg(RecvBuf *b, int fd, int want, int flags) noexcept nogil:
    # recvmmsg(2) into b, retried on EINTR: the count, or -1 with errno set.
    cdef int i, n
    for i in range(want):
        b.msgs[i].msg_hdr.msg_flags = 0
        b.msgs[i].msg_hdr.msg_controllen = CONTROL_SIZE
    while True:
        n = recvmmsg(fd, b.msgs, want, flags | MSG_CMSG_CLOEXEC, NULL)
        if n >= 0 or errno != EINTR:
            return n


cdef inline double _clock(int clock) noexcept nogil:
    cdef timespec ts
    clock_gettime(clock, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef void _sleep(double seconds) noexcept nogil:
    cdef timespec ts
    ts.tv_sec = <long>seconds
    ts.tv_nsec = <long>((seconds - ts.tv_sec) * 1e9)
    nanosleep(&ts, NULL)


cdef void *_reader_main(void *table) noexcept nogil:
    # The thread's entry: the table is kept alive by start_reader's reference.
    (<HeartbeatTable>table)._read_loop()
    return NULL


ctypedef struct Slot:
    double last      # last heartbeat (or add)
    double limit     # seconds of silence allowed: grace until a beat, then timeout
    int32_t pid
    int32_t wid      # index into the watcher name list
    int32_t bucket   # the wheel bucket holding this slot
    int32_t pos      # its index in that bucket; the free-list link once freed

ctypedef struct Bucket:
    int32_t *items   # slot ids, unordered (removal swaps the last one in)
    int32_t len
    int32_t cap

ctypedef struct Entry:
    int32_t pid      # EMPTY if free
    int32_t slot


cdef inline bint _utf8_valid(const unsigned char *s, Py_ssize_t n) noexcept nogil:
    # Strict UTF-8 as bytes.decode() applies it: no overlongs, no surrogates,
    # nothing past U+10FFFF.
    cdef Py_ssize_t i = 0
    cdef unsigned char c, lo, hi
    cdef int need, k
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if c < 0xC2:
            return False
        elif c < 0xE0:
            need = 1
        elif c < 0xF0:
            need = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif c < 0xF5:
            need = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if i + need >= n:  # truncated sequence
            return False
        if s[i + 1] < lo or s[i + 1] > hi:
            return False
        for k in range(2, need + 1):
            if s[i + k] < 0x80 or s[i + k] > 0xBF:
                return False
        i += need + 1
    return True


cdef inline int32_t _parse(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # The rules of _core_py.parse_heartbeat; returns 0 for "not a heartbeat".
    cdef Py_ssize_t i, semi
    cdef const unsigned char *found
    cdef unsigned char c
    cdef int64_t pid = 0
    if n == 0 or n > MAX_DATAGRAM:
        return 0
    if p[n - 1] == c'\n':
        n -= 1
    # memchr/memrchr scan a word at a time, the byte loops below stay short.
    if memchr(p, c'\n', n) != NULL:
        return 0
    found = <const unsigned char *>memrchr(p, c';', n)
    if found == NULL:
        return 0
    semi = found - p
    if semi <= 0 or semi > 10 or p[0] == c'0':
        return 0
    for i in range(semi):
        c = p[i]
        if c < c'0' or c > c'9':
            return 0
        pid = pid * 10 + (c - c'0')
    if pid > PID_MAX:
        return 0
    if _any_high_bit(p + semi + 1, n - semi - 1) and not _utf8_valid(
        p + semi + 1, n - semi - 1
    ):
        return 0
    return <int32_t>pid


cdef inline bint _any_high_bit(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # ASCII needs no UTF-8 check; look at 8 bytes at a time.
    cdef uint64_t word
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&word, p + i, 8)
        if word & 0x8080808080808080ULL:
            return True
        i += 8
    while i < n:
        if p[i] & 0x80:
            return True
        i += 1
    return False


cdef bint _timestamp(const unsigned char *p, Py_ssize_t n, double *out) noexcept nogil:
    # The rules of _core_py.heartbeat_timestamp, on a datagram _parse accepted:
    # the text after the last `;` (less a final \n, then a final \r) must be
    # digits with at most one `.`, at most 32 characters.
    cdef Py_ssize_t start = n, end = n, i
    cdef char text[33]
    cdef bint dot = False, digit = False
    if end > 0 and p[end - 1] == c'\n':
        end -= 1
    if end > 0 and p[end - 1] == c'\r':
        end -= 1
    while start > 0 and p[start - 1] != c';':
        start -= 1
    if end - start < 1 or end - start > 32:
        return False
    for i in range(start, end):
        if p[i] == c'.' and not dot:
            dot = True
        elif c'0' <= p[i] <= c'9':
            digit = True
        else:
            return False
        text[i - start] = <char>p[i]
    text[end - start] = 0
    out[0] = strtod(text, NULL)
    return digit


def heartbeat_timestamp(data):
    """The numeric timestamp of a default-format heartbeat, else None."""
    cdef bytes b = data if type(data) is bytes else bytes(data)
    cdef double ts
    if parse_heartbeat(b) is None:
        return None
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(b)
    if _timestamp(p, PyBytes_GET_SIZE(b), &ts):
        return ts
    return None


def parse_heartbeat(data):
    """Return the pid of a default-format ``PID;TIMESTAMP`` heartbeat, else None."""
    cdef int32_t pid
    if type(data) is not bytes:
        data = bytes(data)
    # Unchecked access: the exact type was just ensured.
    pid = _parse(
        <const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data)
    )
    return pid if pid else None


cdef inline int _notify_kind(const unsigned char *p, Py_ssize_t n) noexcept nogil:
    # The rules of _core_py.notify_kind: 1 if a line is exactly WATCHDOG=1,
    # 0 for other sd_notify assignments, -1 for anything else.
    cdef Py_ssize_t start = 0, end, i
    cdef bint assignment, watchdog = False, seen = False
    cdef const char *word = b"WATCHDOG=1"
    while start <= n:
        end = start
        while end < n and p[end] != c'\n':
            end += 1
        if end > start:
            assignment = False
            for i in range(start, end):
                if p[i] == c'=':
                    assignment = i > start  # NAME=VALUE: a name before the first =
                    break
            if not assignment:
                return -1
            seen = True
            if end - start == 10 and memcmp(p + start, word, 10) == 0:
                watchdog = True
        start = end + 1
    if not seen:
        return -1
    return 1 if watchdog else 0


def notify_kind(data):
    """1 for an sd_notify message with ``WATCHDOG=1``, 0 for another sd_notify
    message, -1 for anything else."""
    cdef bytes b = data if type(data) is bytes else bytes(data)
    return _notify_kind(<const unsigned char *>PyBytes_AS_STRING(b),
                        PyBytes_GET_SIZE(b))


cdef enum:
    # Slots walked ahead of the one being checked: a bucket's slots are
    # scattered over the slot array, and a prefetch distance of a few dozen
    # nanoseconds of work hides most of a cache miss.
    PREFETCH = 16


cdef inline uint32_t _hash(int32_t pid, int bits) noexcept nogil:
    # Fibonacci hashing: pids are dense and sequential, the multiply spreads them.
    return (<uint32_t>pid * <uint32_t>2654435769u) >> (32 - bits)


cdef class HeartbeatTable:
    """Last heartbeat of every monitored pid, with a timing wheel for expiry."""

    cdef double _timeout, _tick
    cdef Slot *_slots
    cdef int32_t _nslots, _cap, _free, _count
    cdef Entry *_entries
    cdef int _bits
    cdef Bucket *_buckets
    cdef Bucket _spare  # an empty array that swaps in for a bucket being walked
    cdef int64_t _mask, _next_tick
    cdef bint _started
    cdef list _watchers
    cdef dict _watcher_ids
    cdef double *_wlimit  # timeout of each watcher id
    cdef int32_t _wcap
    cdef RecvBuf _buf  # drain, drain_notify and drain_raw read into it
    cdef uint32_t _drops
    cdef int64_t _ctrunc  # datagrams whose control data did not fit
    cdef bint _passed  # the last batch carried SCM_RIGHTS descriptors
    cdef int32_t _sender[BATCH]  # pid from SCM_CREDENTIALS, 0 if none
    # One mutex guards all of the above and below: every public method takes
    # it, and so does the reader thread to apply a batch.
    cdef pthread_mutex_t _mutex
    cdef bint _mutex_ready
    # The reader thread: its own buffer, its arguments, its counts.
    cdef pthread_t _thread
    cdef bint _reading, _stopping
    cdef RecvBuf _tbuf
    cdef int _rfd, _rbudget
    cdef double _flood_delay, _max_age
    cdef int64_t _rdatagrams, _rcounts[5]  # not yet taken by reader_counts
    cdef int64_t _wakeups, _rerrors

    def __cinit__(self, timeout, tick):
        self._slots = NULL
        self._entries = NULL
        self._buckets = NULL
        self._spare.items = NULL
        memset(&self._buf, 0, sizeof(RecvBuf))
        memset(&self._tbuf, 0, sizeof(RecvBuf))
        self._wlimit = NULL
        self._reading = False
        # Recursive: drain_notify's resolve may ask the table (__contains__).
        cdef pthread_mutexattr_t attr
        pthread_mutexattr_init(&attr)
        pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_RECURSIVE)
        self._mutex_ready = pthread_mutex_init(&self._mutex, &attr) == 0
        pthread_mutexattr_destroy(&attr)
        if not self._mutex_ready:
            raise MemoryError()

    def __init__(self, timeout, tick):
        cdef int64_t size
        self._timeout, self._tick = _check_args(timeout, tick)
        size = _wheel_size(self._timeout, self._tick)
        self._mask = size - 1
        self._buckets = <Bucket *>PyMem_RawMalloc(size * sizeof(Bucket))
        self._bits = 4
        self._entries = <Entry *>PyMem_RawMalloc((1 << self._bits) * sizeof(Entry))
        self._cap = 16
        self._slots = <Slot *>PyMem_RawMalloc(self._cap * sizeof(Slot))
        self._wcap = 8
        self._wlimit = <double *>PyMem_RawMalloc(self._wcap * sizeof(double))
        if (self._wlimit == NULL or self._buckets == NULL or self._entries == NULL
                or self._slots == NULL or _recvbuf_alloc(&self._buf) < 0):
            raise MemoryError()
        memset(self._buckets, 0, size * sizeof(Bucket))
        memset(&self._spare, 0, sizeof(Bucket))
        memset(self._entries, 0, (1 << self._bits) * sizeof(Entry))
        self._rdatagrams = 0
        memset(self._rcounts, 0, sizeof(self._rcounts))
        self._wakeups = 0
        self._rerrors = 0
        self._drops = 0
        self._ctrunc = 0
        self._passed = False
        self._nslots = 0
        self._free = NONE
        self._count = 0
        self._next_tick = 0
        self._started = False
        self._watchers = []
        self._watcher_ids = {}

    def __dealloc__(self):
        # Never while reading (the thread holds a reference), but be sure.
        if self._reading:
            self._stop()
        if self._mutex_ready:
            pthread_mutex_destroy(&self._mutex)
        PyMem_RawFree(self._slots)
        PyMem_RawFree(self._entries)
        cdef int64_t i
        if self._buckets != NULL:
            for i in range(self._mask + 1):
                PyMem_RawFree(self._buckets[i].items)
        PyMem_RawFree(self._buckets)
        PyMem_RawFree(self._spare.items)
        _recvbuf_free(&self._buf)
        _recvbuf_free(&self._tbuf)
        PyMem_RawFree(self._wlimit)

    cdef inline void _lock(self) noexcept:
        # With the GIL: wait for the mutex without it if the reader thread
        # (which never takes the GIL) holds it.
        if pthread_mutex_trylock(&self._mutex) != 0:
            with nogil:
                pthread_mutex_lock(&self._mutex)

    cdef inline void _unlock(self) noexcept nogil:
        pthread_mutex_unlock(&self._mutex)

    # timeout and tick are set once, in __init__: read without the lock.
    @property
    def timeout(self):
        """Seconds of silence after which a pid expires."""
        return self._timeout

    @property
    def tick(self):
        """Granularity of the timing wheel, in seconds."""
        return self._tick

    def __len__(self):
        self._lock()
        value = self._count
        self._unlock()
        return value

    def __contains__(self, pid):
        self._lock()
        try:
            if type(pid) is not int or not 1 <= pid <= PID_MAX:
                return False
            return self._find(pid) != NONE
        finally:
            self._unlock()

    def pids(self):
        """The monitored pids, in no particular order."""
        cdef int32_t i
        self._lock()
        try:
            return [self._entries[i].pid for i in range(1 << self._bits)
                    if self._entries[i].pid != EMPTY]
        finally:
            self._unlock()

    def watcher_counts(self):
        """How many pids each watcher has in the table (watchers with none left out)."""
        cdef int32_t i
        cdef list counts
        self._lock()
        try:
            counts = [0] * len(self._watchers)
            for i in range(1 << self._bits):
                if self._entries[i].pid != EMPTY:
                    counts[self._slots[self._entries[i].slot].wid] += 1
            return {w: n for w, n in zip(self._watchers, counts) if n}
        finally:
            self._unlock()

    def watcher_of(self, pid):
        """Name of the watcher that owns ``pid``; KeyError if not monitored."""
        self._lock()
        try:
            return self._watchers[self._slots[self._slot_of(pid)].wid]
        finally:
            self._unlock()

    def last_seen(self, pid):
        """Time of the last heartbeat (or add) of ``pid``; KeyError if unknown."""
        self._lock()
        try:
            return self._slots[self._slot_of(pid)].last
        finally:
            self._unlock()

    # -- the pid -> slot hash (linear probing, backward-shift deletion) ------

    cdef inline int32_t _find(self, int32_t pid) noexcept nogil:
        cdef uint32_t mask = (1u << self._bits) - 1
        cdef uint32_t i = _hash(pid, self._bits)
        while True:
            if self._entries[i].pid == pid:
                return self._entries[i].slot
            if self._entries[i].pid == EMPTY:
                return NONE
            i = (i + 1) & mask

    cdef int32_t _slot_of(self, pid) except -2:
        cdef int32_t slot = NONE
        if type(pid) is int and 1 <= pid <= PID_MAX:
            slot = self._find(pid)
        if slot == NONE:
            raise KeyError(pid)
        return slot

    cdef inline void _insert(self, int32_t pid, int32_t slot) noexcept nogil:
        cdef uint32_t mask = (1u << self._bits) - 1
        cdef uint32_t i = _hash(pid, self._bits)
        while self._entries[i].pid != EMPTY:
            i = (i + 1) & mask
        self._entries[i].pid = pid
        self._entries[i].slot = slot

    cdef int _grow_hash(self) except -1:
        cdef Entry *old = self._entries
        cdef uint32_t n = 1u << self._bits, i
        cdef Entry *new = <Entry *>PyMem_RawMalloc(2 * n * sizeof(Entry))
        if new == NULL:
            raise MemoryError()
        memset(new, 0, 2 * n * sizeof(Entry))
        self._entries = new
        self._bits += 1
        for i in range(n):
            if old[i].pid != EMPTY:
                self._insert(old[i].pid, old[i].slot)
        PyMem_RawFree(old)
        return 0

    cdef inline void _erase(self, int32_t pid) noexcept nogil:
        cdef uint32_t mask = (1u << self._bits) - 1
        cdef uint32_t i = _hash(pid, self._bits), j, k
        while self._entries[i].pid != pid:
            i = (i + 1) & mask
        j = i
        while True:
            j = (j + 1) & mask
            if self._entries[j].pid == EMPTY:
                break
            k = _hash(self._entries[j].pid, self._bits)
            # Entry j may stay if its home k lies cyclically in (i, j].
            if (k > i and k <= j) if i <= j else (k > i or k <= j):
                continue
            self._entries[i] = self._entries[j]
            i = j
        self._entries[i].pid = EMPTY

    # -- the wheel ------------------------------------------------------------

    cdef inline int64_t _tick_of(self, double t) noexcept nogil:
        return <int64_t>floor(t / self._tick)

    cdef inline void _start(self, double now) noexcept nogil:
        if not self._started:
            self._started = True
            self._next_tick = self._tick_of(now)

    cdef inline int _file(self, int32_t slot, double deadline) noexcept nogil:
        # 0, or -1 (and nothing changed) when the bucket cannot grow.
        cdef int64_t t = self._tick_of(deadline)
        if t < self._next_tick:
            t = self._next_tick
        cdef int32_t b = <int32_t>(t & self._mask)
        cdef Bucket *bucket = &self._buckets[b]
        cdef int32_t *grown
        cdef int32_t cap
        if bucket.len == bucket.cap:
            cap = 2 * bucket.cap if bucket.cap else 16
            grown = <int32_t *>PyMem_RawRealloc(bucket.items, cap * sizeof(int32_t))
            if grown == NULL:
                return -1
            bucket.items = grown
            bucket.cap = cap
        bucket.items[bucket.len] = slot
        self._slots[slot].bucket = b
        self._slots[slot].pos = bucket.len
        bucket.len += 1
        return 0

    cdef inline void _unlink(self, int32_t slot) noexcept nogil:
        self._unlink_at(self._slots[slot].bucket, self._slots[slot].pos)

    cdef inline void _unlink_at(self, int32_t b, int32_t pos) noexcept nogil:
        cdef Bucket *bucket = &self._buckets[b]
        cdef int32_t moved = bucket.items[bucket.len - 1]
        bucket.items[pos] = moved
        self._slots[moved].pos = pos
        bucket.len -= 1

    cdef inline int _refresh(self, int32_t slot, double now) noexcept nogil:
        # 0, or -1 when re-filing needed memory it could not get: the beat
        # then counts as seen, and the slot stays filed under its old limit.
        cdef Slot *s = &self._slots[slot]
        cdef double limit = self._wlimit[s.wid]
        cdef int32_t b = s.bucket, pos = s.pos
        if now > s.last:
            s.last = now
        if s.limit != limit:
            # The grace period ends (or the watcher's timeout changed): the
            # deadline may move earlier than the bucket it is filed in.  File
            # it anew first, so it is never in no bucket.
            if self._file(slot, s.last + limit) < 0:
                return -1
            s.limit = limit
            self._unlink_at(b, pos)
        return 0

    cdef inline void _release(self, int32_t slot) noexcept nogil:
        self._erase(self._slots[slot].pid)
        self._slots[slot].pos = self._free
        self._free = slot
        self._count -= 1

    # -- monitoring -----------------------------------------------------------

    cdef int32_t _intern(self, str watcher) except -1:
        cdef double *grown
        wid = self._watcher_ids.get(watcher)
        if wid is not None:
            return wid
        wid = len(self._watchers)
        if wid == self._wcap:
            grown = <double *>PyMem_RawRealloc(
                self._wlimit, 2 * self._wcap * sizeof(double))
            if grown == NULL:
                raise MemoryError()
            self._wlimit = grown
            self._wcap *= 2
        self._wlimit[wid] = self._timeout
        self._watcher_ids[watcher] = wid
        self._watchers.append(watcher)
        return wid

    def set_watcher_timeout(self, str watcher, timeout):
        """Give ``watcher``'s pids their own timeout, from their next beat on."""
        self._lock()
        try:
            self._wlimit[self._intern(watcher)] = _check_seconds("timeout", timeout)
        finally:
            self._unlock()

    def watcher_timeout(self, str watcher):
        """The timeout of ``watcher``'s pids."""
        self._lock()
        try:
            wid = self._watcher_ids.get(watcher)
            return self._timeout if wid is None else self._wlimit[<int32_t>wid]
        finally:
            self._unlock()

    def add(self, pid, str watcher, double now, grace=None):
        """Monitor ``pid`` of ``watcher`` (again) with a fresh deadline, ``grace``
        seconds away if given (until its first beat), else its timeout."""
        cdef int32_t slot, p, wid
        cdef double limit
        cdef Slot *grown
        self._lock()
        try:
            _check_pid(pid)
            p = pid
            wid = self._intern(watcher)
            limit = (self._wlimit[wid] if grace is None
                     else _check_seconds("grace", grace))
            self._start(now)
            slot = self._find(p)
            if slot != NONE:
                self._unlink(slot)
            else:
                if 2 * (self._count + 1) > (1 << self._bits):
                    self._grow_hash()
                if self._free != NONE:
                    slot = self._free
                    self._free = self._slots[slot].pos
                else:
                    if self._nslots == self._cap:
                        grown = <Slot *>PyMem_RawRealloc(
                            self._slots, 2 * self._cap * sizeof(Slot))
                        if grown == NULL:
                            raise MemoryError()
                        self._slots = grown
                        self._cap *= 2
                    slot = self._nslots
                    self._nslots += 1
                self._insert(p, slot)
                self._count += 1
            self._slots[slot].pid = p
            self._slots[slot].wid = wid
            self._slots[slot].last = now
            self._slots[slot].limit = limit
            if self._file(slot, now + limit) < 0:
                raise MemoryError()
        finally:
            self._unlock()

    def remove(self, pid):
        """Stop monitoring ``pid``; False if it was not monitored."""
        cdef int32_t slot
        self._lock()
        try:
            if type(pid) is not int or not 1 <= pid <= PID_MAX:
                return False
            slot = self._find(pid)
            if slot == NONE:
                return False
            self._unlink(slot)
            self._release(slot)
            return True
        finally:
            self._unlock()

    def beat(self, pid, double now):
        """Record a heartbeat; False (and nothing created) for an unknown pid."""
        cdef int32_t slot
        self._lock()
        try:
            if type(pid) is not int or not 1 <= pid <= PID_MAX:
                return False
            slot = self._find(pid)
            if slot == NONE:
                return False
            if self._refresh(slot, now) < 0:
                raise MemoryError()
            return True
        finally:
            self._unlock()

    def expire(self, double now):
        """Remove and return ``(pid, watcher)`` of every pid silent for longer
        than ``timeout`` at ``now``."""
        cdef int64_t now_tick, span, i
        cdef int32_t b, slot, j
        cdef double deadline
        cdef Bucket walked
        cdef Slot *s
        cdef list out = []
        self._lock()
        try:
            self._start(now)
            now_tick = self._tick_of(now)
            if now_tick < self._next_tick:
                now_tick = self._next_tick
            span = now_tick - self._next_tick + 1
            if span > self._mask + 1:
                span = self._mask + 1
            for i in range(span):
                b = <int32_t>((self._next_tick + i) & self._mask)
                if self._buckets[b].len == 0:
                    continue
                # Detach: slots re-filed into b go to the spare, not walked again.
                walked = self._buckets[b]
                self._buckets[b] = self._spare
                for j in range(walked.len):
                    if j + PREFETCH < walked.len:
                        __builtin_prefetch(&self._slots[walked.items[j + PREFETCH]])
                    slot = walked.items[j]
                    s = &self._slots[slot]
                    deadline = s.last + s.limit
                    if deadline < now:
                        out.append((s.pid, self._watchers[s.wid]))
                        self._release(slot)
                    elif self._file(slot, deadline) < 0:
                        raise MemoryError()
                walked.len = 0
                self._spare = walked  # every slot left it: reuse its memory
            self._next_tick = now_tick  # the current tick is walked again next time
            return out
        finally:
            self._unlock()

    # -- sockets --------------------------------------------------------------

    cdef int _recv(self, int fd, int want, bint keep_fds=False) except -2:
        # recvmmsg(2) without MSG_WAITFORONE/timeout: returns what is queued,
        # up to `want`, or -1 with EAGAIN when nothing is.  Descriptors a
        # sender passed (SCM_RIGHTS) are closed before returning, or, with
        # keep_fds, by the caller's _close_passed once it has read the batch.
        # MSG_CMSG_CLOEXEC: none of them leaks into a child meanwhile.
        cdef int n = _recvmmsg(&self._buf, fd, want, MSG_DONTWAIT)
        if n >= 0:
            self._note_drops(self._buf.msgs, n)
            if not keep_fds:
                self._close_passed(n)
            return n
        if errno == EAGAIN:  # == EWOULDBLOCK on Linux: nothing queued
            return 0
        raise OSError(errno, os.strerror(errno))

    cdef inline void _note_drops(self, mmsghdr *msgs, int n) noexcept nogil:
        # With SO_RXQ_OVFL set on the socket, a datagram queued after a drop
        # carries the socket's cumulative drop count (socket(7)); the newest
        # is the largest.  With SO_PASSCRED on a Unix socket, each carries the
        # sender's pid as the kernel saw it (unix(7)).
        cdef int i
        cdef cmsghdr *c
        cdef uint32_t count
        cdef ucred cred
        for i in range(n):
            self._sender[i] = 0
            if msgs[i].msg_hdr.msg_flags & MSG_CTRUNC:
                self._ctrunc += 1
            if msgs[i].msg_hdr.msg_controllen == 0:
                continue
            c = CMSG_FIRSTHDR(&msgs[i].msg_hdr)
            while c != NULL:
                if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SO_RXQ_OVFL:
                    memcpy(&count, CMSG_DATA(c), sizeof(uint32_t))
                    if count > self._drops:
                        self._drops = count
                elif c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_CREDENTIALS:
                    memcpy(&cred, CMSG_DATA(c), sizeof(ucred))
                    self._sender[i] = cred.pid
                elif c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
                    self._passed = True
                c = CMSG_NXTHDR(&msgs[i].msg_hdr, c)

    cdef void _close_passed(self, int n) noexcept nogil:
        # Close every descriptor the last batch carried: a sender may attach
        # any (sd_notify_barrier(3) attaches a pipe and waits for its close),
        # and one kept is one fewer under RLIMIT_NOFILE.
        cdef int i, fd
        cdef size_t k, count
        cdef cmsghdr *c
        if not self._passed:
            return
        self._passed = False
        for i in range(n):
            if self._buf.msgs[i].msg_hdr.msg_controllen == 0:
                continue
            c = CMSG_FIRSTHDR(&self._buf.msgs[i].msg_hdr)
            while c != NULL:
                if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
                    count = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                    for k in range(count):
                        memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof(int))
                        close(fd)
                c = CMSG_NXTHDR(&self._buf.msgs[i].msg_hdr, c)

    @property
    def kernel_drops(self):
        """Datagrams the kernel dropped on the drained socket, as of the last
        datagram read (needs SO_RXQ_OVFL set on the socket; 0 otherwise)."""
        self._lock()
        value = self._drops
        self._unlock()
        return value

    @property
    def control_truncated(self):
        """Datagrams whose control data (credentials, passed descriptors) did
        not fit the receive buffer (MSG_CTRUNC); the kernel closed the rest."""
        self._lock()
        value = self._ctrunc
        self._unlock()
        return value

    cdef void _apply(self, RecvBuf *b, int n, double now, double max_age,
                     double wall, int64_t *counts) noexcept nogil:
        # Parse and apply n datagrams read into b, adding them to counts (the
        # fields of DrainCounts after datagrams, then the heartbeats that
        # could not be re-filed for lack of memory).  Three passes over the
        # batch, so the cache misses of one datagram's hash entry and slot
        # overlap with the others' work.
        cdef int i
        cdef int32_t pid, slot
        cdef int32_t pids[BATCH]
        cdef int32_t found[BATCH]
        cdef unsigned int length
        cdef double ts
        for i in range(n):
            length = b.msgs[i].msg_len
            if b.msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                pid = 0
            else:
                pid = _parse(b.data + i * RECV_SIZE, length)
            if pid == 0:
                counts[MALFORMED] += 1
            elif max_age > 0 and not (
                _timestamp(b.data + i * RECV_SIZE, length, &ts)
                and wall - max_age <= ts <= wall + max_age
            ):
                counts[STALE] += 1
                pid = 0
            else:
                __builtin_prefetch(&self._entries[_hash(pid, self._bits)])
            pids[i] = pid
        for i in range(n):
            if pids[i]:
                slot = self._find(pids[i])
                found[i] = slot
                if slot != NONE:
                    __builtin_prefetch(&self._slots[slot])
        for i in range(n):
            if not pids[i]:
                continue
            if found[i] == NONE:
                counts[UNKNOWN] += 1
            else:
                counts[HEARTBEATS] += 1
                if self._refresh(found[i], now) < 0:
                    counts[UNFILED] += 1

    def drain(self, sock, double now, int budget, double max_age=0.0,
              double wall=0.0):
        """Read up to ``budget`` waiting datagrams and apply their heartbeats."""
        cdef int fd = sock if type(sock) is int else sock.fileno()
        cdef int64_t datagrams = 0
        cdef int64_t counts[5]
        cdef int n, want
        memset(counts, 0, sizeof(counts))
        self._lock()
        try:
            while datagrams < budget:
                want = <int>min(BATCH, budget - datagrams)
                n = self._recv(fd, want)
                self._apply(&self._buf, n, now, max_age, wall, counts)
                datagrams += n
                if n < want:
                    break
        finally:
            self._unlock()
        if counts[UNFILED]:
            raise MemoryError()
        return DrainCounts(datagrams, counts[HEARTBEATS], counts[UNKNOWN],
                           counts[MALFORMED], counts[STALE])

    def drain_notify(self, sock, double now, int budget, resolve=None):
        """Read up to ``budget`` sd_notify datagrams from a Unix socket with
        SO_PASSCRED and apply ``WATCHDOG=1`` as a heartbeat of the sender's pid
        (or of ``resolve(pid)`` when the sender is not in the table)."""
        cdef int fd = sock if type(sock) is int else sock.fileno()
        cdef int64_t datagrams = 0, heartbeats = 0, unknown = 0, malformed = 0
        cdef int n, i, want, kind
        cdef int32_t pid, slot
        self._lock()
        try:
            while datagrams < budget:
                want = <int>min(BATCH, budget - datagrams)
                # The batch's descriptors stay open until it is read: a
                # systemd-notify waits on its BARRIER=1 pipe, so it is still
                # there for resolve to find its parent.
                n = self._recv(fd, want, True)
                try:
                    for i in range(n):
                        pid = self._sender[i]
                        if self._buf.msgs[i].msg_hdr.msg_flags & MSG_TRUNC or pid <= 0:
                            malformed += 1
                            continue
                        kind = _notify_kind(
                            self._buf.data + i * RECV_SIZE, self._buf.msgs[i].msg_len
                        )
                        if kind < 0:
                            malformed += 1
                            continue
                        if kind == 0:
                            continue  # READY=1, STATUS=...: valid, not a heartbeat
                        slot = self._find(pid)
                        if slot == NONE and resolve is not None:
                            slot = self._slot_of_resolved(resolve(pid))
                        if slot == NONE:
                            unknown += 1
                            continue
                        heartbeats += 1
                        if self._refresh(slot, now) < 0:
                            raise MemoryError()
                finally:
                    self._close_passed(n)
                datagrams += n
                if n < want:
                    break
            return DrainCounts(datagrams, heartbeats, unknown, malformed)
        finally:
            self._unlock()

    cdef int32_t _slot_of_resolved(self, parent) except -2:
        # resolve's answer: a pid of the table, or anything else for none.
        if type(parent) is not int or not 0 < parent <= PID_MAX:
            return NONE
        return self._find(<int32_t>parent)

    def drain_raw(self, sock, int budget):
        """Read up to ``budget`` datagrams for a custom ``msg_regex``."""
        cdef int fd = sock if type(sock) is int else sock.fileno()
        cdef int n, i, want, got = 0
        cdef list payloads = []
        cdef int oversized = 0
        cdef unsigned int length
        self._lock()
        try:
            while got < budget:
                want = min(BATCH, budget - got)
                n = self._recv(fd, want)
                for i in range(n):
                    length = self._buf.msgs[i].msg_len
                    if (self._buf.msgs[i].msg_hdr.msg_flags & MSG_TRUNC
                            or length > MAX_DATAGRAM):
                        oversized += 1
                    else:
                        payloads.append(PyBytes_FromStringAndSize(
                            <char *>self._buf.data + i * RECV_SIZE, length))
                got += n
                if n < want:
                    break
            return payloads, oversized
        finally:
            self._unlock()

    # -- the reader thread ----------------------------------------------------

    def start_reader(self, sock, *, budget, flood_delay, max_age=0.0):
        """Start the one thread that reads ``sock`` (a bound UDP socket or its
        descriptor, made blocking: the thread is its only reader) and applies
        its heartbeats; RuntimeError if already reading.  The caller keeps the
        socket open until ``stop_reader`` returns."""
        cdef int fd = sock if type(sock) is int else sock.fileno()
        cdef int rc
        budget, flood_delay, max_age = _check_reader_args(budget, flood_delay, max_age)
        self._lock()
        try:
            if self._reading:
                raise RuntimeError("the table is already reading a socket")
            os.set_blocking(fd, True)
            if _recvbuf_alloc(&self._tbuf) < 0:
                raise MemoryError()
            self._rfd = fd
            self._rbudget = budget
            self._flood_delay = flood_delay
            self._max_age = max_age
            self._stopping = False
            Py_INCREF(self)  # the thread's reference, dropped by stop_reader
            rc = pthread_create(&self._thread, NULL, _reader_main, <void *>self)
            if rc != 0:
                Py_DECREF(self)
                _recvbuf_free(&self._tbuf)
                raise OSError(rc, os.strerror(rc))
            self._reading = True
        finally:
            self._unlock()

    def stop_reader(self):
        """Stop the reader thread and return once it has ended (idempotent).
        The socket is shut down for reading: it cannot be read again."""
        self._lock()
        try:
            if not self._reading or self._stopping:
                return
            self._stopping = True
        finally:
            self._unlock()
        self._stop()
        Py_DECREF(self)  # the thread's reference: the caller still holds one

    cdef void _stop(self) noexcept:
        # Wake the thread's read (on Linux, shutdown(SHUT_RD) makes a blocked
        # and any later read of a UDP socket return at once, though it
        # reports ENOTCONN) and wait for it to end.
        self._lock()
        self._stopping = True
        self._unlock()
        shutdown(self._rfd, SHUT_RD)
        with nogil:
            pthread_join(self._thread, NULL)
        self._lock()
        self._reading = False
        self._stopping = False
        _recvbuf_free(&self._tbuf)
        self._unlock()

    def reader_counts(self):
        """What the reader thread read since the last call (then zeroed)."""
        self._lock()
        try:
            counts = DrainCounts(
                self._rdatagrams, self._rcounts[HEARTBEATS], self._rcounts[UNKNOWN],
                self._rcounts[MALFORMED], self._rcounts[STALE])
            self._rdatagrams = 0
            memset(self._rcounts, 0, sizeof(self._rcounts))
            return counts
        finally:
            self._unlock()

    @property
    def reader_wakeups(self):
        """Reads the reader thread made so far (monotonic)."""
        self._lock()
        value = self._wakeups
        self._unlock()
        return value

    @property
    def reader_errors(self):
        """Read errors the reader thread met so far (each followed by a pause),
        and heartbeats it could not re-file for lack of memory."""
        self._lock()
        value = self._rerrors + self._rcounts[UNFILED]
        self._unlock()
        return value

    @property
    def reading(self):
        """Whether a reader thread is running (until stop_reader returns)."""
        self._lock()
        value = self._reading
        self._unlock()
        return value

    cdef void _read_loop(self) noexcept nogil:
        # The thread: one pass per wake-up, until stop_reader shuts the socket.
        # The sleep after a read: as _core_py._Flood, from the average time
        # per datagram over the last reads.
        cdef int got
        cdef double now, last = _clock(CLOCK_MONOTONIC), gap = self._flood_delay
        cdef double pause, longest = max(self._flood_delay, LONGEST)
        while True:
            got = self._read_pass()
            if got < 0:
                return
            if got > 0:
                now = _clock(CLOCK_MONOTONIC)
                gap += ((now - last) / got - gap) * FLOOD_WEIGHT
                last = now
            if (
                got < self._rbudget  # else more is queued: read it at once
                and self._flood_delay > 0
                and gap * FLOOD_PASS <= self._flood_delay
            ):
                pause = min(max(gap * FLOOD_AIM, self._flood_delay), longest)
                _sleep(pause)

    cdef int _read_pass(self) noexcept nogil:
        # Block for a datagram, then read what is queued up to the budget,
        # applying each batch under the mutex.  The datagrams read, or -1 once
        # stopping.
        cdef int n, want, got = 0, flags = MSG_WAITFORONE
        cdef int err
        cdef double now, wall = 0.0
        while got < self._rbudget:
            want = min(BATCH, self._rbudget - got)
            n = _recvmmsg(&self._tbuf, self._rfd, want, flags)
            err = errno
            now = _clock(CLOCK_MONOTONIC)
            if self._max_age > 0:
                wall = _clock(CLOCK_REALTIME)
            pthread_mutex_lock(&self._mutex)
            if self._stopping:
                pthread_mutex_unlock(&self._mutex)
                return -1
            if flags == MSG_WAITFORONE:
                self._wakeups += 1
            if n > 0:
                self._note_drops(self._tbuf.msgs, n)
                self._apply(&self._tbuf, n, now, self._max_age, wall, self._rcounts)
                self._rdatagrams += n
            elif n < 0 and err != EAGAIN:
                self._rerrors += 1
            pthread_mutex_unlock(&self._mutex)
            if n < 0:
                if err != EAGAIN:
                    _sleep(ERROR_SLEEP)
                break
            got += n
            flags = MSG_DONTWAIT
            if n < want:
                break
        return got
