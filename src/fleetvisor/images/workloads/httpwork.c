/*
 * httpwork: a single-threaded HTTP/1.0 server that burns a fixed amount of CPU per
 * request. It models a one-worker service (one Node.js or Python process): exactly one
 * request is served at a time, in accept order, so queueing shows up as latency and a
 * sibling instance is the only way to add throughput.
 *
 *   env PORT       listen port on 0.0.0.0 (default 8080; 0 picks a free one)
 *   env WORK_US    CPU microseconds burnt per GET (default 10000, at most 1000000)
 *   env SERVED_BY  value of the X-Served-By header (default: the host name)
 *
 *   GET /healthz            200 at once, no work
 *   GET <any>[?work_us=N]   burns N (else WORK_US) us of thread CPU time, then 200
 *   other methods           405        malformed request line or headers   400
 *   head not read in 5 s    408 (or a plain close if the client sent nothing)
 *
 * Every response has Content-Length, Connection: close and X-Served-By; the connection
 * is closed after it. SIGTERM/SIGINT: the request in progress is finished, then exit 0.
 *
 * Build: gcc -O2 -static -Wall -Wextra -o httpwork httpwork.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define HEAD_MAX 8192          /* request head limit (request line + headers) */
#define HEAD_TIMEOUT_MS 5000   /* a slow or silent client holds the only worker this long */
#define LINGER_MS 1000         /* how long an oversized head is drained before closing */
#define WORK_US_MAX 1000000L   /* cap of WORK_US and work_us=N */
#define NAME_MAX_LEN 255

static volatile sig_atomic_t stopping = 0;
static char served_by[NAME_MAX_LEN + 1];
static long default_work_us = 10000;

static void on_signal(int sig) {
    (void)sig;
    stopping = 1;
}

/* Parse a decimal number made of digits only; values above `cap` are clamped to it. */
static int parse_us(const char *s, size_t len, long cap, long *out) {
    long value = 0;
    if (len == 0) return -1;
    for (size_t i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        if (value <= cap) value = value * 10 + (s[i] - '0');
    }
    *out = value > cap ? cap : value;
    return 0;
}

static long long thread_cpu_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static long long monotonic_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000LL + ts.tv_nsec / 1000000L;
}

/* Busy loop until this thread has used `us` microseconds of CPU: CPU time, not wall
 * time, so a worker that is descheduled (CPU contention) still does the same work. */
static void burn_cpu(long us) {
    long long end = thread_cpu_ns() + (long long)us * 1000LL;
    volatile unsigned x = 1;
    while (thread_cpu_ns() < end) {
        for (int i = 0; i < 256; i++) x = x * 1103515245u + 12345u;
    }
}

/* recv() that gives up at `deadline_ms` (CLOCK_MONOTONIC): a whole-head deadline, so a
 * client trickling one byte at a time cannot hold the worker either. EAGAIN = late. */
static ssize_t recv_until(int fd, char *buf, size_t len, long long deadline_ms) {
    for (;;) {
        long long left = deadline_ms - monotonic_ms();
        if (left <= 0) {
            errno = EAGAIN;
            return -1;
        }
        struct timeval tv = {(time_t)(left / 1000), (suseconds_t)(left % 1000) * 1000};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        ssize_t n = recv(fd, buf, len, 0);
        if (n < 0 && errno == EINTR) continue;
        return n;
    }
}

/* send() all of buf; MSG_NOSIGNAL so a vanished client is an error, not SIGPIPE. */
static int send_all(int fd, const char *buf, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

static void respond(int fd, int status, const char *extra_headers, const char *body) {
    const char *reason = status == 200   ? "OK"
                         : status == 400 ? "Bad Request"
                         : status == 405 ? "Method Not Allowed"
                         : status == 408 ? "Request Timeout"
                                         : "Error";
    char out[1024];
    int n = snprintf(out, sizeof out,
                     "HTTP/1.0 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\nX-Served-By: %s\r\n%s\r\n%s",
                     status, reason, strlen(body), served_by, extra_headers, body);
    if (n < 0 || (size_t)n >= sizeof out) return; /* cannot happen: bounded inputs */
    (void)send_all(fd, out, (size_t)n);
}

/* Close after a response: FIN first, then discard what the client already sent that we
 * did not read (closing with unread data would send RST, which can destroy the response
 * before the client reads it). `linger` waits for more of it, for an oversized head. */
static void close_connection(int fd, int linger) {
    char sink[4096];
    shutdown(fd, SHUT_WR);
    if (linger) {
        long long deadline = monotonic_ms() + LINGER_MS;
        while (recv_until(fd, sink, sizeof sink, deadline) > 0) {
        }
    } else {
        while (recv(fd, sink, sizeof sink, MSG_DONTWAIT) > 0) {
        }
    }
    close(fd);
}

static int is_tchar(char c) {
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* Header lines after the request line: each "name: value", name a token, no control
 * bytes but TAB. `p`..`end` spans the lines, each ending in "\n" (CR already allowed). */
static int headers_valid(const char *p, const char *end) {
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *line_end = eol ? eol : end;
        if (line_end > p && line_end[-1] == '\r') line_end--;
        if (line_end == p) return 1; /* the blank line */
        const char *colon = memchr(p, ':', (size_t)(line_end - p));
        if (colon == NULL || colon == p) return 0;
        for (const char *c = p; c < colon; c++)
            if (!is_tchar(*c)) return 0;
        for (const char *c = colon + 1; c < line_end; c++)
            if ((unsigned char)*c < 0x20 && *c != '\t') return 0;
        if (!eol) return 0;
        p = eol + 1;
    }
    return 0;
}

/* Serve one request on `fd`: read the head, parse, answer, close. Never exits. */
static void serve(int fd) {
    char head[HEAD_MAX + 1];
    size_t len = 0;
    const char *end_of_head = NULL;
    long long deadline = monotonic_ms() + HEAD_TIMEOUT_MS;
    struct timeval send_tv = {HEAD_TIMEOUT_MS / 1000, 0}; /* a client that never reads */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &send_tv, sizeof send_tv);

    while (end_of_head == NULL && len < HEAD_MAX) {
        ssize_t n = recv_until(fd, head + len, HEAD_MAX - len, deadline);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (len > 0) respond(fd, 408, "", "request head not received in time\n");
            close_connection(fd, 0);
            return;
        }
        if (n <= 0) { /* EOF or reset before a whole head: nobody to answer */
            close(fd);
            return;
        }
        size_t from = len >= 3 ? len - 3 : 0;
        len += (size_t)n;
        head[len] = '\0';
        /* the blank line that ends the head: CRLF CRLF, or bare LF LF (lenient) */
        for (size_t i = from; i < len && end_of_head == NULL; i++) {
            if (head[i] != '\n') continue;
            if (i >= 1 && head[i - 1] == '\n') end_of_head = head + i + 1;
            if (i >= 2 && head[i - 1] == '\r' && head[i - 2] == '\n') end_of_head = head + i + 1;
        }
    }
    if (end_of_head == NULL) {
        respond(fd, 400, "", "request head too large\n");
        close_connection(fd, 1);
        return;
    }

    /* request line: METHOD SP TARGET SP HTTP/D.D */
    char *line_end = memchr(head, '\n', (size_t)(end_of_head - head));
    char *line_stop = (line_end > head && line_end[-1] == '\r') ? line_end - 1 : line_end;
    char *sp1 = memchr(head, ' ', (size_t)(line_stop - head));
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_stop - sp1 - 1)) : NULL;
    int ok = sp1 != NULL && sp2 != NULL && sp1 > head && sp2 > sp1 + 1 && sp1[1] == '/';
    if (ok) {
        for (char *c = head; c < sp1; c++)
            ok = ok && is_tchar(*c);
        for (char *c = sp1 + 1; c < sp2; c++)
            ok = ok && (unsigned char)*c > 0x20 && (unsigned char)*c < 0x7f;
        const char *v = sp2 + 1;
        ok = ok && line_stop - v == 8 && memcmp(v, "HTTP/", 5) == 0 && v[5] >= '0' &&
             v[5] <= '9' && v[6] == '.' && v[7] >= '0' && v[7] <= '9';
    }
    if (!ok || !headers_valid(line_end + 1, end_of_head)) {
        respond(fd, 400, "", "malformed request\n");
        close_connection(fd, 0);
        return;
    }
    if (sp1 - head != 3 || memcmp(head, "GET", 3) != 0) {
        respond(fd, 405, "Allow: GET\r\n", "only GET is served\n");
        close_connection(fd, 0);
        return;
    }

    char *target = sp1 + 1;
    size_t target_len = (size_t)(sp2 - target);
    char *query = memchr(target, '?', target_len);
    size_t path_len = query ? (size_t)(query - target) : target_len;
    if (path_len == 8 && memcmp(target, "/healthz", 8) == 0) {
        respond(fd, 200, "", "ok\n");
        close_connection(fd, 0);
        return;
    }

    long work_us = default_work_us;
    if (query) { /* work_us=N among &-separated parameters; the last one wins */
        char *p = query + 1;
        while (p < sp2) {
            char *amp = memchr(p, '&', (size_t)(sp2 - p));
            char *param_end = amp ? amp : sp2;
            if (param_end - p >= 8 && memcmp(p, "work_us=", 8) == 0 &&
                parse_us(p + 8, (size_t)(param_end - p - 8), WORK_US_MAX, &work_us) != 0) {
                respond(fd, 400, "", "work_us must be a number of microseconds\n");
                close_connection(fd, 0);
                return;
            }
            p = param_end + 1;
        }
    }
    burn_cpu(work_us);
    char body[NAME_MAX_LEN + 64];
    snprintf(body, sizeof body, "served_by=%s work_us=%ld\n", served_by, work_us);
    respond(fd, 200, "", body);
    close_connection(fd, 0);
}

static void set_served_by(void) {
    const char *env = getenv("SERVED_BY");
    if (env != NULL && env[0] != '\0') {
        snprintf(served_by, sizeof served_by, "%s", env);
    } else if (gethostname(served_by, sizeof served_by) != 0 || served_by[0] == '\0') {
        snprintf(served_by, sizeof served_by, "unknown");
    }
    served_by[NAME_MAX_LEN] = '\0';
    for (char *c = served_by; *c; c++) /* a header value: no CR, LF or other controls */
        if ((unsigned char)*c < 0x20 || (unsigned char)*c == 0x7f) *c = '_';
}

int main(void) {
    const char *port_env = getenv("PORT");
    long port = 8080;
    if (port_env != NULL && (parse_us(port_env, strlen(port_env), 65536, &port) != 0 ||
                             port > 65535)) {
        fprintf(stderr, "httpwork: PORT=%s is not a port number\n", port_env);
        return 2;
    }
    const char *work_env = getenv("WORK_US");
    if (work_env != NULL &&
        parse_us(work_env, strlen(work_env), WORK_US_MAX, &default_work_us) != 0) {
        fprintf(stderr, "httpwork: WORK_US=%s is not a number of microseconds\n", work_env);
        return 2;
    }
    set_served_by();

    /* SIGTERM/SIGINT stay blocked except inside ppoll(): a signal never interrupts a
     * request, and one that arrives between requests wakes ppoll at once (no race). */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    sigset_t blocked, wait_mask;
    sigemptyset(&blocked);
    sigaddset(&blocked, SIGTERM);
    sigaddset(&blocked, SIGINT);
    sigprocmask(SIG_BLOCK, &blocked, &wait_mask);
    sigdelset(&wait_mask, SIGTERM);
    sigdelset(&wait_mask, SIGINT);

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (lfd < 0) {
        perror("httpwork: socket");
        return 1;
    }
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_ANY);
    addr.sin_port = htons((unsigned short)port);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) != 0 || listen(lfd, 4096) != 0) {
        fprintf(stderr, "httpwork: cannot listen on 0.0.0.0:%ld: %s\n", port, strerror(errno));
        return 1;
    }
    socklen_t addr_len = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &addr_len);
    fprintf(stderr, "httpwork: listening on 0.0.0.0:%d served_by=%s work_us=%ld\n",
            ntohs(addr.sin_port), served_by, default_work_us);

    unsigned long served = 0;
    while (!stopping) {
        struct pollfd pfd = {lfd, POLLIN, 0};
        if (ppoll(&pfd, 1, NULL, &wait_mask) < 0) continue; /* EINTR: check `stopping` */
        /* the listener is non-blocking: a connection reset while queued gives EAGAIN
         * instead of blocking the only worker in accept() */
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                struct timespec pause = {0, 10 * 1000 * 1000}; /* do not spin; retry */
                nanosleep(&pause, NULL);
            }
            continue;
        }
        serve(fd);
        served++;
    }
    close(lfd);
    fprintf(stderr, "httpwork: stopping after %lu connection(s)\n", served);
    return 0;
}
