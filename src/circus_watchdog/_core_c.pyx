# cython: language_level=3
# Not freethreading_compatible: a HeartbeatTable and its receive buffers are
# not safe to share between threads (no locks; the engine drives each table
# from its one event loop), so a free-threaded build keeps the GIL on import.
# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# cython: binding=False
# Compiled twin of _core_py.py: the same algorithm on C arrays, so a datagram
# is parsed in the receive buffer and applied to the table with no Python
# object, and both twins return identical results in identical order.

from cpython.bytes cimport (
    PyBytes_AS_STRING,
    PyBytes_FromStringAndSize,
    PyBytes_GET_SIZE,
)
from cpython.mem cimport PyMem_RawFree, PyMem_RawMalloc, PyMem_RawRealloc
from libc.errno cimport EAGAIN, EINTR, errno
from libc.math cimport floor
from libc.stdint cimport int32_t, int64_t, uint32_t, uint64_t
from libc.stdlib cimport strtod
from libc.string cimport memchr, memcmp, memcpy, memset
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
    iovec,
    mmsghdr,
    recvmmsg,
)

cdef extern from *:
    # gcc and clang: start loading a cache line we will need soon.
    void __builtin_prefetch(const void *addr) noexcept nogil

cdef extern from "<string.h>" nogil:
    void *memrchr(const void *s, int c, size_t n)  # GNU, with _GNU_SOURCE

import os

from ._core_py import (
    DrainCounts,
    _check_args,
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
    cdef unsigned char *_rbuf
    cdef mmsghdr *_msgs
    cdef iovec *_iov
    cdef unsigned char *_control
    cdef uint32_t _drops
    cdef int64_t _ctrunc  # datagrams whose control data did not fit
    cdef bint _passed  # the last batch carried SCM_RIGHTS descriptors
    cdef int32_t _sender[BATCH]  # pid from SCM_CREDENTIALS, 0 if none

    def __cinit__(self, timeout, tick):
        self._slots = NULL
        self._entries = NULL
        self._buckets = NULL
        self._spare.items = NULL
        self._rbuf = NULL
        self._msgs = NULL
        self._iov = NULL
        self._control = NULL
        self._wlimit = NULL

    def __init__(self, timeout, tick):
        cdef int64_t size, i
        self._timeout, self._tick = _check_args(timeout, tick)
        size = _wheel_size(self._timeout, self._tick)
        self._mask = size - 1
        self._buckets = <Bucket *>PyMem_RawMalloc(size * sizeof(Bucket))
        self._bits = 4
        self._entries = <Entry *>PyMem_RawMalloc((1 << self._bits) * sizeof(Entry))
        self._cap = 16
        self._slots = <Slot *>PyMem_RawMalloc(self._cap * sizeof(Slot))
        self._rbuf = <unsigned char *>PyMem_RawMalloc(BATCH * RECV_SIZE)
        self._msgs = <mmsghdr *>PyMem_RawMalloc(BATCH * sizeof(mmsghdr))
        self._iov = <iovec *>PyMem_RawMalloc(BATCH * sizeof(iovec))
        self._control = <unsigned char *>PyMem_RawMalloc(BATCH * CONTROL_SIZE)
        self._wcap = 8
        self._wlimit = <double *>PyMem_RawMalloc(self._wcap * sizeof(double))
        if (self._wlimit == NULL or self._buckets == NULL or self._entries == NULL
                or self._slots == NULL
                or self._rbuf == NULL or self._msgs == NULL or self._iov == NULL
                or self._control == NULL):
            raise MemoryError()
        memset(self._buckets, 0, size * sizeof(Bucket))
        memset(&self._spare, 0, sizeof(Bucket))
        memset(self._entries, 0, (1 << self._bits) * sizeof(Entry))
        memset(self._msgs, 0, BATCH * sizeof(mmsghdr))
        for i in range(BATCH):
            self._iov[i].iov_base = self._rbuf + i * RECV_SIZE
            self._iov[i].iov_len = RECV_SIZE
            self._msgs[i].msg_hdr.msg_iov = &self._iov[i]
            self._msgs[i].msg_hdr.msg_iovlen = 1
            self._msgs[i].msg_hdr.msg_control = self._control + i * CONTROL_SIZE
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
        PyMem_RawFree(self._slots)
        PyMem_RawFree(self._entries)
        cdef int64_t i
        if self._buckets != NULL:
            for i in range(self._mask + 1):
                PyMem_RawFree(self._buckets[i].items)
        PyMem_RawFree(self._buckets)
        PyMem_RawFree(self._spare.items)
        PyMem_RawFree(self._rbuf)
        PyMem_RawFree(self._msgs)
        PyMem_RawFree(self._iov)
        PyMem_RawFree(self._control)
        PyMem_RawFree(self._wlimit)

    @property
    def timeout(self):
        """Seconds of silence after which a pid expires."""
        return self._timeout

    @property
    def tick(self):
        """Granularity of the timing wheel, in seconds."""
        return self._tick

    def __len__(self):
        return self._count

    def __contains__(self, pid):
        if type(pid) is not int or not 1 <= pid <= PID_MAX:
            return False
        return self._find(pid) != NONE

    def pids(self):
        """The monitored pids, in no particular order."""
        cdef int32_t i
        return [self._entries[i].pid for i in range(1 << self._bits)
                if self._entries[i].pid != EMPTY]

    def watcher_of(self, pid):
        """Name of the watcher that owns ``pid``; KeyError if not monitored."""
        return self._watchers[self._slots[self._slot_of(pid)].wid]

    def last_seen(self, pid):
        """Time of the last heartbeat (or add) of ``pid``; KeyError if unknown."""
        return self._slots[self._slot_of(pid)].last

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

    cdef inline int _file(self, int32_t slot, double deadline) except -1:
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
                raise MemoryError()
            bucket.items = grown
            bucket.cap = cap
        bucket.items[bucket.len] = slot
        self._slots[slot].bucket = b
        self._slots[slot].pos = bucket.len
        bucket.len += 1
        return 0

    cdef inline void _unlink(self, int32_t slot) noexcept nogil:
        cdef Bucket *bucket = &self._buckets[self._slots[slot].bucket]
        cdef int32_t pos = self._slots[slot].pos
        cdef int32_t moved = bucket.items[bucket.len - 1]
        bucket.items[pos] = moved
        self._slots[moved].pos = pos
        bucket.len -= 1

    cdef inline int _refresh(self, int32_t slot, double now) except -1:
        cdef Slot *s = &self._slots[slot]
        cdef double limit = self._wlimit[s.wid]
        if now > s.last:
            s.last = now
        if s.limit != limit:
            # The grace period ends (or the watcher's timeout changed): the
            # deadline may move earlier than the bucket it is filed in.
            s.limit = limit
            self._unlink(slot)
            self._file(slot, s.last + limit)
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
        self._wlimit[self._intern(watcher)] = _check_seconds("timeout", timeout)

    def watcher_timeout(self, str watcher):
        """The timeout of ``watcher``'s pids."""
        wid = self._watcher_ids.get(watcher)
        return self._timeout if wid is None else self._wlimit[<int32_t>wid]

    def add(self, pid, str watcher, double now, grace=None):
        """Monitor ``pid`` of ``watcher`` (again) with a fresh deadline, ``grace``
        seconds away if given (until its first beat), else its timeout."""
        cdef int32_t slot, p, wid
        cdef double limit
        cdef Slot *grown
        _check_pid(pid)
        p = pid
        wid = self._intern(watcher)
        limit = self._wlimit[wid] if grace is None else _check_seconds("grace", grace)
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
        self._file(slot, now + limit)

    def remove(self, pid):
        """Stop monitoring ``pid``; False if it was not monitored."""
        cdef int32_t slot
        if type(pid) is not int or not 1 <= pid <= PID_MAX:
            return False
        slot = self._find(pid)
        if slot == NONE:
            return False
        self._unlink(slot)
        self._release(slot)
        return True

    def beat(self, pid, double now):
        """Record a heartbeat; False (and nothing created) for an unknown pid."""
        cdef int32_t slot
        if type(pid) is not int or not 1 <= pid <= PID_MAX:
            return False
        slot = self._find(pid)
        if slot == NONE:
            return False
        self._refresh(slot, now)
        return True

    def expire(self, double now):
        """Remove and return ``(pid, watcher)`` of every pid silent for longer
        than ``timeout`` at ``now``."""
        cdef int64_t now_tick, span, i
        cdef int32_t b, slot, j
        cdef double deadline
        cdef Bucket walked
        cdef Slot *s
        cdef list out = []
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
                else:
                    self._file(slot, deadline)
            walked.len = 0
            self._spare = walked  # every slot left it: reuse its memory
        self._next_tick = now_tick  # the current tick is walked again next time
        return out

    # -- sockets --------------------------------------------------------------

    cdef int _recv(self, int fd, int want, bint keep_fds=False) except -2:
        # recvmmsg(2) without MSG_WAITFORONE/timeout: returns what is queued,
        # up to `want`, or -1 with EAGAIN when nothing is.  Descriptors a
        # sender passed (SCM_RIGHTS) are closed before returning, or, with
        # keep_fds, by the caller's _close_passed once it has read the batch.
        # MSG_CMSG_CLOEXEC: none of them leaks into a child meanwhile.
        cdef int n, i
        for i in range(want):
            self._msgs[i].msg_hdr.msg_flags = 0
            self._msgs[i].msg_hdr.msg_controllen = CONTROL_SIZE
        while True:
            n = recvmmsg(fd, self._msgs, want, MSG_DONTWAIT | MSG_CMSG_CLOEXEC, NULL)
            if n >= 0:
                self._note_drops(n)
                if not keep_fds:
                    self._close_passed(n)
                return n
            if errno == EINTR:
                continue
            if errno == EAGAIN:  # == EWOULDBLOCK on Linux: nothing queued
                return 0
            raise OSError(errno, os.strerror(errno))

    cdef inline void _note_drops(self, int n) noexcept nogil:
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
            if self._msgs[i].msg_hdr.msg_flags & MSG_CTRUNC:
                self._ctrunc += 1
            if self._msgs[i].msg_hdr.msg_controllen == 0:
                continue
            c = CMSG_FIRSTHDR(&self._msgs[i].msg_hdr)
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
                c = CMSG_NXTHDR(&self._msgs[i].msg_hdr, c)

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
            if self._msgs[i].msg_hdr.msg_controllen == 0:
                continue
            c = CMSG_FIRSTHDR(&self._msgs[i].msg_hdr)
            while c != NULL:
                if c.cmsg_level == SOL_SOCKET and c.cmsg_type == SCM_RIGHTS:
                    count = (c.cmsg_len - CMSG_LEN(0)) // sizeof(int)
                    for k in range(count):
                        memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof(int))
                        close(fd)
                c = CMSG_NXTHDR(&self._msgs[i].msg_hdr, c)

    @property
    def kernel_drops(self):
        """Datagrams the kernel dropped on the drained socket, as of the last
        datagram read (needs SO_RXQ_OVFL set on the socket; 0 otherwise)."""
        return self._drops

    @property
    def control_truncated(self):
        """Datagrams whose control data (credentials, passed descriptors) did
        not fit the receive buffer (MSG_CTRUNC); the kernel closed the rest."""
        return self._ctrunc

    def drain(self, sock, double now, int budget, double max_age=0.0,
              double wall=0.0):
        """Read up to ``budget`` waiting datagrams and apply their heartbeats."""
        cdef int fd = sock if type(sock) is int else sock.fileno()
        cdef int64_t datagrams = 0, heartbeats = 0, unknown = 0, malformed = 0
        cdef int64_t stale = 0
        cdef int n, i, want
        cdef int32_t pid, slot
        cdef int32_t pids[BATCH]
        cdef int32_t found[BATCH]
        cdef unsigned int length
        cdef double ts
        while datagrams < budget:
            want = BATCH if budget - datagrams > BATCH else <int>(budget - datagrams)
            n = self._recv(fd, want)
            # Three passes over the batch, so the cache misses of one
            # datagram's hash entry and slot overlap with the others' work.
            for i in range(n):
                length = self._msgs[i].msg_len
                if self._msgs[i].msg_hdr.msg_flags & MSG_TRUNC:
                    pid = 0
                else:
                    pid = _parse(self._rbuf + i * RECV_SIZE, length)
                if pid == 0:
                    malformed += 1
                elif max_age > 0 and not (
                    _timestamp(self._rbuf + i * RECV_SIZE, length, &ts)
                    and wall - max_age <= ts <= wall + max_age
                ):
                    stale += 1
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
                    unknown += 1
                else:
                    heartbeats += 1
                    self._refresh(found[i], now)
            datagrams += n
            if n < want:
                break
        return DrainCounts(datagrams, heartbeats, unknown, malformed, stale)

    def drain_notify(self, sock, double now, int budget, resolve=None):
        """Read up to ``budget`` sd_notify datagrams from a Unix socket with
        SO_PASSCRED and apply ``WATCHDOG=1`` as a heartbeat of the sender's pid
        (or of ``resolve(pid)`` when the sender is not in the table)."""
        cdef int fd = sock if type(sock) is int else sock.fileno()
        cdef int64_t datagrams = 0, heartbeats = 0, unknown = 0, malformed = 0
        cdef int n, i, want, kind
        cdef int32_t pid, slot
        while datagrams < budget:
            want = BATCH if budget - datagrams > BATCH else <int>(budget - datagrams)
            # The batch's descriptors stay open until it is read: a
            # systemd-notify waits on its BARRIER=1 pipe, so it is still
            # there for resolve to find its parent.
            n = self._recv(fd, want, True)
            try:
                for i in range(n):
                    pid = self._sender[i]
                    if self._msgs[i].msg_hdr.msg_flags & MSG_TRUNC or pid <= 0:
                        malformed += 1
                        continue
                    kind = _notify_kind(
                        self._rbuf + i * RECV_SIZE, self._msgs[i].msg_len
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
                    self._refresh(slot, now)
            finally:
                self._close_passed(n)
            datagrams += n
            if n < want:
                break
        return DrainCounts(datagrams, heartbeats, unknown, malformed)

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
        while got < budget:
            want = BATCH if budget - got > BATCH else budget - got
            n = self._recv(fd, want)
            for i in range(n):
                length = self._msgs[i].msg_len
                if self._msgs[i].msg_hdr.msg_flags & MSG_TRUNC or length > MAX_DATAGRAM:
                    oversized += 1
                else:
                    payloads.append(PyBytes_FromStringAndSize(
                        <char *>self._rbuf + i * RECV_SIZE, length))
            got += n
            if n < want:
                break
        return payloads, oversized
