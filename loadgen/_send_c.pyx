# cython: language_level=3
# cython: boundscheck=False, wraparound=False, cdivision=True
# cython: binding=False
# Compiled twin of _send_py.py: sendmmsg(2) in batches, so loadgen sends up to
# BATCH datagrams per system call. Not freethreading_compatible: a _Sender's
# buffers are not shared between threads, but nothing here was checked for it.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdio cimport snprintf
from libc.string cimport memset

from circus_watchdog._syscalls cimport (
    AF_INET,
    AF_INET6,
    MSG_DONTWAIT,
    htons,
    inet_pton,
    iovec,
    mmsghdr,
    sendmmsg,
    sockaddr_in,
    sockaddr_in6,
)

import os

cdef enum:
    BATCH = 64  # datagrams per sendmmsg call, as the core's recvmmsg batch
    SEND_SIZE = 48  # "2147483647;" + a %.3f timestamp fits easily


cdef int _sockaddr(sock, addr, sockaddr_in6 *out, unsigned int *outlen) except -1:
    # Numeric addresses only: loadgen resolves names before it floods.
    cdef sockaddr_in *v4 = <sockaddr_in *>out
    host, port = addr
    cdef bytes h = host.encode("ascii")
    memset(out, 0, sizeof(sockaddr_in6))
    if sock.family == AF_INET:
        v4.sin_family = AF_INET
        v4.sin_port = htons(port)
        if inet_pton(AF_INET, h, &v4.sin_addr) != 1:
            raise ValueError(f"not a numeric IPv4 address: {host!r}")
        outlen[0] = sizeof(sockaddr_in)
    elif sock.family == AF_INET6:
        out.sin6_family = AF_INET6
        out.sin6_port = htons(port)
        if inet_pton(AF_INET6, h, &out.sin6_addr) != 1:
            raise ValueError(f"not a numeric IPv6 address: {host!r}")
        outlen[0] = sizeof(sockaddr_in6)
    else:
        raise ValueError("addr is only for AF_INET and AF_INET6 sockets")
    return 0


cdef int _sendmmsg(int fd, mmsghdr *msgs, int n) except -1:
    cdef int sent = 0, r
    while sent < n:
        r = sendmmsg(fd, msgs + sent, n - sent, MSG_DONTWAIT)
        if r < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            if sent:  # report what went out; the error recurs on the next call
                break
            raise OSError(errno, os.strerror(errno))
        sent += r
    return sent


cdef class _Sender:
    # Fixed buffers for one sendmmsg batch.
    cdef mmsghdr msgs[BATCH]
    cdef iovec iov[BATCH]
    cdef char buf[BATCH * SEND_SIZE]
    cdef sockaddr_in6 name
    cdef unsigned int namelen

    def __cinit__(self):
        memset(self.msgs, 0, sizeof(self.msgs))
        self.namelen = 0

    cdef int prepare(self, sock, addr) except -1:
        cdef int i
        if addr is not None:
            _sockaddr(sock, addr, &self.name, &self.namelen)
        for i in range(BATCH):
            self.msgs[i].msg_hdr.msg_iov = &self.iov[i]
            self.msgs[i].msg_hdr.msg_iovlen = 1
            self.msgs[i].msg_hdr.msg_name = &self.name if addr is not None else NULL
            self.msgs[i].msg_hdr.msg_namelen = self.namelen if addr is not None else 0
        return 0


def send_heartbeats(sock, addr, pids, double timestamp=0.0):
    """Send one ``PID;TIMESTAMP`` datagram per pid with ``sendmmsg``."""
    cdef _Sender s = _Sender()
    cdef int fd = sock.fileno()
    cdef Py_ssize_t total = len(pids), done = 0
    cdef int n, i, sent
    cdef long long pid
    s.prepare(sock, addr)
    while done < total:
        n = BATCH if total - done > BATCH else <int>(total - done)
        for i in range(n):
            pid = pids[done + i]
            s.iov[i].iov_base = s.buf + i * SEND_SIZE
            s.iov[i].iov_len = snprintf(s.buf + i * SEND_SIZE, SEND_SIZE,
                                        b"%lld;%.3f", pid, timestamp)
        sent = _sendmmsg(fd, s.msgs, n)
        done += sent
        if sent < n:
            break
    return done


def send_datagrams(sock, addr, payloads):
    """Send each payload as one datagram with ``sendmmsg``; returns the count sent."""
    cdef _Sender s = _Sender()
    cdef int fd = sock.fileno()
    cdef Py_ssize_t total = len(payloads), done = 0
    cdef int n, i, sent
    cdef bytes p
    cdef list batch
    s.prepare(sock, addr)
    while done < total:
        n = BATCH if total - done > BATCH else <int>(total - done)
        batch = [bytes(payloads[done + i]) for i in range(n)]  # keeps buffers alive
        for i in range(n):
            p = batch[i]
            s.iov[i].iov_base = PyBytes_AS_STRING(p)
            s.iov[i].iov_len = PyBytes_GET_SIZE(p)
        sent = _sendmmsg(fd, s.msgs, n)
        done += sent
        if sent < n:
            break
    return done
