/* Floor 2: recvmmsg(2) with MSG_DONTWAIT until EAGAIN, then nanosleep(1 ms).
 * The cheapest a timer-driven reader can be: its wake-ups grow with time
 * (1,000/s at most), not with datagrams. */
#include "common.h"

int main(int argc, char **argv)
{
    int fd = open_socket(argc, argv);
    unsigned long long count = 0;
    const struct timespec pause = {0, 1000000}; /* 1 ms */
    while (!stop) {
        int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
        if (n > 0) {
            count += (unsigned long long)n;
            continue;
        }
        if (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            perror("recvmmsg");
            return 1;
        }
        nanosleep(&pause, NULL);
    }
    return report(count);
}
