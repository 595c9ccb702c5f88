/* A count-only drain for the core benchmark of `table.drain`: recvmmsg(2) in
 * batches of 64 into a static buffer, counting datagrams and looking at
 * nothing else. bench/conftest.py compiles it with `gcc -O2 -shared -fPIC`
 * and calls it through ctypes, as `table.drain` is called from Python: the two
 * differ only in what is done per datagram. It is a reference for the drain
 * function, not a floor for a receiver (those are bench/floors/, programs of
 * their own, measured by bench/e2e).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define BATCH 64
#define RECV_SIZE 1025 /* as the core: 1024 bytes plus one to spot oversize */

static unsigned char buf[BATCH][RECV_SIZE];
static struct iovec iov[BATCH];
static struct mmsghdr msgs[BATCH];
static int ready;

/* Reads up to `budget` queued datagrams without blocking; returns how many,
 * or -errno on a socket error. Stops at the first short batch, as the core
 * does: a short batch means the queue is empty. */
long count_drain(int fd, long budget)
{
    long total = 0;
    if (!ready) {
        memset(msgs, 0, sizeof(msgs));
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = buf[i];
            iov[i].iov_len = RECV_SIZE;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        ready = 1;
    }
    while (total < budget) {
        unsigned int want = budget - total > BATCH ? BATCH : (unsigned int)(budget - total);
        int n = recvmmsg(fd, msgs, want, MSG_DONTWAIT, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -errno;
        }
        total += n;
        if ((unsigned int)n < want)
            break;
    }
    return total;
}
