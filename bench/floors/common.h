/* What both C floors share: argument parsing, the socket, the buffers, the
 * stop signal and the final report. No Python, no event loop: a floor is the
 * least CPU a reader of this socket can spend, measured as its own process.
 *
 * usage: floor_X PORT RCVBUF SECONDS
 *   binds 127.0.0.1:PORT (0: any free port), asks SO_RCVBUFFORCE (root) or
 *   SO_RCVBUF for RCVBUF bytes, prints "ready PORT GRANTED" and reads until
 *   SIGTERM, SIGINT or SECONDS have passed (0: no time bound but 3600 s);
 *   then prints "count N" (datagrams read) and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define BUF_SIZE 2048 /* 2 KiB per datagram: a heartbeat is at most 1024 bytes */
#define MAX_SECONDS 3600

static volatile sig_atomic_t stop;
static unsigned char bufs[BATCH][BUF_SIZE];
static struct iovec iov[BATCH];
static struct mmsghdr msgs[BATCH];

static void on_signal(int sig) { (void)sig; stop = 1; }

/* SIGTERM, SIGINT and SIGALRM end the loop. No SA_RESTART: a blocking
 * recvmmsg(2) returns EINTR, so the loop sees the flag at once. */
static void setup_signals(unsigned seconds)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGALRM, &sa, NULL);
    alarm(seconds ? seconds : MAX_SECONDS);
}

static void setup_buffers(void)
{
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = BUF_SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
}

static int open_socket(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s PORT RCVBUF SECONDS\n", argv[0]);
        exit(2);
    }
    int port = atoi(argv[1]);
    int want = atoi(argv[2]);
    unsigned seconds = (unsigned)atoi(argv[3]);
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        exit(1);
    }
    /* SO_RCVBUFFORCE passes net.core.rmem_max (CAP_NET_ADMIN); else SO_RCVBUF,
     * capped by rmem_max. The kernel doubles the value for its bookkeeping. */
    if (setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &want, sizeof(want)) < 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &want, sizeof(want));
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        perror("bind");
        exit(1);
    }
    socklen_t len = sizeof(addr);
    getsockname(fd, (struct sockaddr *)&addr, &len);
    int granted = 0;
    len = sizeof(granted);
    getsockopt(fd, SOL_SOCKET, SO_RCVBUF, &granted, &len);
    setup_buffers();
    setup_signals(seconds);
    printf("ready %d %d\n", ntohs(addr.sin_port), granted / 2);
    fflush(stdout);
    return fd;
}

static int report(unsigned long long count)
{
    printf("count %llu\n", count);
    fflush(stdout);
    return 0;
}
