/* A fleet process for bench/e2e/fleetrate.py: a real pid that costs nothing.
 * It sleeps in pause(2) until a signal ends it (SIGTERM's default action). */
#include <unistd.h>

int main(void) {
    for (;;)
        pause();
}
