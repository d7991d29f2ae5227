/*
 * memcounter: holds MEM_MB of incompressible memory and counts, in memory, every
 * TICK_MS. It makes checkpoint/restore and live migration observable:
 *
 *   - the counter lives only in memory: it is NOT read back from /data/counter at start,
 *     so after a live restore it continues, while a cold restart begins at 1 again;
 *   - the memory region is filled with pseudo-random data from a random seed chosen at
 *     start, so its checksum (printed on SIGUSR1) survives only if memory did.
 *
 *   env MEM_MB    MiB to allocate and fill (default 100; 0 allowed)
 *   env TICK_MS   tick period in milliseconds (default 100)
 *   env DATA_DIR  where `counter` is written (default /data; created if missing)
 *
 * stdout (line-buffered by hand: fflush after each line):
 *   memcounter: mem_mb=N tick_ms=T seed=0x... ready     once the memory is touched
 *   counter N                                           every tick (N = 1, 2, ...)
 *   checksum 0x0123456789abcdef                         after each SIGUSR1
 * Each tick also writes N to DATA_DIR/counter (write to counter.tmp, then rename).
 * SIGTERM/SIGINT: exit 0.
 *
 * Build: gcc -O2 -static -Wall -Wextra -o memcounter memcounter.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stopping = 0;
static volatile sig_atomic_t want_checksum = 0;

static void on_stop(int sig) {
    (void)sig;
    stopping = 1;
}

static void on_usr1(int sig) {
    (void)sig;
    want_checksum = 1;
}

static long env_long(const char *name, long fallback, long max) {
    const char *text = getenv(name);
    if (text == NULL || *text == '\0') return fallback;
    char *end = NULL;
    errno = 0;
    long value = strtol(text, &end, 10);
    if (errno != 0 || *end != '\0' || value < 0 || value > max) {
        fprintf(stderr, "memcounter: %s=%s is not a number in 0..%ld\n", name, text, max);
        exit(2);
    }
    return value;
}

/* xorshift64*: never 0 from a non-zero state, so every word is non-zero. */
static uint64_t next_random(uint64_t *state) {
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* FNV-1a style mix over 64-bit words: order-sensitive, cheap (~30 ms per 100 MiB). */
static uint64_t checksum(const uint64_t *words, size_t count) {
    uint64_t hash = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < count; i++) {
        hash ^= words[i];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

static void write_counter(const char *dir, unsigned long long value) {
    char tmp[4096], final[4096], text[32];
    snprintf(tmp, sizeof tmp, "%s/counter.tmp", dir);
    snprintf(final, sizeof final, "%s/counter", dir);
    int len = snprintf(text, sizeof text, "%llu\n", value);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t done = write(fd, text, (size_t)len);
    close(fd);
    if (done == len) rename(tmp, final);
}

int main(void) {
    long mem_mb = env_long("MEM_MB", 100, 1L << 20);
    long tick_ms = env_long("TICK_MS", 100, 3600L * 1000);
    const char *dir = getenv("DATA_DIR");
    if (dir == NULL || *dir == '\0') dir = "/data";
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "memcounter: cannot create %s: %s\n", dir, strerror(errno));
        return 1;
    }

    struct sigaction stop = {0}, usr1 = {0};
    stop.sa_handler = on_stop;
    usr1.sa_handler = on_usr1;
    sigaction(SIGTERM, &stop, NULL);
    sigaction(SIGINT, &stop, NULL);
    sigaction(SIGUSR1, &usr1, NULL);

    size_t bytes = (size_t)mem_mb << 20;
    size_t count = bytes / sizeof(uint64_t);
    uint64_t *words = NULL;
    if (bytes > 0) {
        words = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (words == MAP_FAILED) {
            fprintf(stderr, "memcounter: cannot map %ld MiB: %s\n", mem_mb, strerror(errno));
            return 1;
        }
    }
    uint64_t seed = 0;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed || seed == 0)
        seed = ((uint64_t)time(NULL) << 20) ^ (uint64_t)getpid() ^ 0x9E3779B97F4A7C15ULL;
    uint64_t state = seed;
    for (size_t i = 0; i < count; i++) words[i] = next_random(&state);

    printf("memcounter: mem_mb=%ld tick_ms=%ld seed=0x%016llx ready\n", mem_mb, tick_ms,
           (unsigned long long)seed);
    fflush(stdout);

    struct timespec period = {tick_ms / 1000, (tick_ms % 1000) * 1000000L};
    unsigned long long counter = 0;
    while (!stopping) {
        if (want_checksum) {
            want_checksum = 0;
            printf("checksum 0x%016llx\n", (unsigned long long)checksum(words, count));
            fflush(stdout);
        }
        counter++;
        write_counter(dir, counter);
        printf("counter %llu\n", counter);
        fflush(stdout);
        struct timespec left = period;
        while (nanosleep(&left, &left) != 0 && errno == EINTR && !stopping && !want_checksum) {
        }
    }
    return 0;
}
