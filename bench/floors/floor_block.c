/* Floor 1: blocking recvmmsg(2) with MSG_WAITFORONE in a loop. The call
 * sleeps until a datagram arrives, then returns what is queued (up to 64)
 * without waiting for more: one wake-up per arrival burst. */
#include "common.h"

int main(int argc, char **argv)
{
    int fd = open_socket(argc, argv);
    unsigned long long count = 0;
    while (!stop) {
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n > 0)
            count += (unsigned long long)n;
        else if (n < 0 && errno != EINTR) {
            perror("recvmmsg");
            return 1;
        }
    }
    return report(count);
}
