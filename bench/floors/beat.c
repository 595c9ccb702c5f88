/* A fleet process for bench/e2e/fleetrate.py: a real pid that beats as a
 * watched process does. usage: beat PORT
 * Once a second, at a random phase (seeded from its pid), it sends
 * "PID;TIMESTAMP" (its own pid, the wall clock with 3 decimals: the daemon's
 * default format) to 127.0.0.1:PORT, and sleeps in clock_nanosleep(2)
 * (TIMER_ABSTIME) in between. Unconnected UDP: while nothing is bound to
 * PORT the kernel drops the datagram and the sender sees no error.
 * SIGTERM ends it (the default action). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NS 1000000000L

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof(addr));
    addr.sin_family = AF_INET;
    addr.sin_port = htons((unsigned short)atoi(argv[1]));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int pid = (int)getpid();
    srand((unsigned)pid);
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    next.tv_nsec += rand() % NS;
    if (next.tv_nsec >= NS) {
        next.tv_nsec -= NS;
        next.tv_sec++;
    }
    char buf[64];
    for (;;) {
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL))
            ; /* EINTR: sleep again until the same instant */
        struct timespec wall;
        clock_gettime(CLOCK_REALTIME, &wall);
        int len = snprintf(buf, sizeof(buf), "%d;%.3f", pid,
                           (double)wall.tv_sec + (double)wall.tv_nsec / 1e9);
        sendto(fd, buf, (size_t)len, 0, (struct sockaddr *)&addr, sizeof(addr));
        next.tv_sec++;
    }
}
