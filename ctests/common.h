/*
 * Shared helpers of the oxcow C tests: checks that record failures, a tiny test registry
 * (each program runs one named test or all of them), scratch directories, host-file helpers
 * and wrappers around qemu-img, the oracle.
 */
#ifndef OXCOW_CTEST_COMMON_H
#define OXCOW_CTEST_COMMON_H

#define _GNU_SOURCE 1

#include <oxcow.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static int g_failures;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            g_failures++;                                                            \
        }                                                                            \
    } while (0)

/* Integer equality with both values printed on failure. */
#define CHECK_EQ(a, b)                                                                    \
    do {                                                                                  \
        long long check_a_ = (long long)(a), check_b_ = (long long)(b);                   \
        if (check_a_ != check_b_) {                                                       \
            fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%lld vs %lld)\n", __FILE__, \
                    __LINE__, #a, #b, check_a_, check_b_);                                \
            g_failures++;                                                                 \
        }                                                                                 \
    } while (0)

/* A call that must succeed; on failure the test cannot meaningfully go on. */
#define REQUIRE_OK(call)                                                                   \
    do {                                                                                   \
        int require_rc_ = (call);                                                          \
        if (require_rc_ != 0) {                                                            \
            fprintf(stderr, "%s:%d: REQUIRE_OK failed: %s returned %d (%s)\n", __FILE__,   \
                    __LINE__, #call, require_rc_, strerror(-require_rc_));                 \
            g_failures++;                                                                  \
            return;                                                                        \
        }                                                                                  \
    } while (0)

#define REQUIRE(cond)                                                                  \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond); \
            g_failures++;                                                              \
            return;                                                                    \
        }                                                                              \
    } while (0)

/* Checks that an error object matches the return code and carries a message; frees it. */
#define CHECK_ERR(rc, err, expected_errno)                                                 \
    do {                                                                                   \
        int check_rc_ = (rc);                                                              \
        oxcow_error *check_err_ = (err);                                                   \
        CHECK_EQ(check_rc_, -(expected_errno));                                            \
        CHECK(check_err_ != NULL);                                                         \
        if (check_err_ != NULL) {                                                          \
            const char *check_msg_ = oxcow_error_message(check_err_);                      \
            CHECK_EQ(oxcow_error_errno(check_err_), -check_rc_);                           \
            CHECK(check_msg_ != NULL && check_msg_[0] != '\0');                            \
            if (getenv("OXCOW_CTEST_VERBOSE") && check_msg_)                               \
                fprintf(stderr, "  error %d: %s\n", oxcow_error_errno(check_err_),         \
                        check_msg_);                                                       \
            oxcow_error_free(check_err_);                                                  \
        }                                                                                  \
    } while (0)

/* ---- test registry ---- */

typedef void (*test_fn)(void);
struct test_case {
    const char *name;
    test_fn fn;
};

/* Runs the test named by argv[1], or all of them; exit status 0 only if every check held. */
static inline int run_tests(const struct test_case *tests, size_t n, int argc, char **argv) {
    size_t i;
    int ran = 0;
    for (i = 0; i < n; i++) {
        if (argc > 1 && strcmp(argv[1], tests[i].name) != 0)
            continue;
        {
            int before = g_failures;
            tests[i].fn();
            fprintf(stderr, "%s: %s\n", tests[i].name, g_failures == before ? "ok" : "FAILED");
        }
        ran++;
    }
    if (ran == 0) {
        fprintf(stderr, "no test named '%s'\n", argc > 1 ? argv[1] : "");
        return 2;
    }
    return g_failures == 0 ? 0 : 1;
}

/* ---- scratch directory ---- */

static char g_dir[4096];

/* Creates a fresh scratch directory (removing the previous one); returns its path. */
static inline const char *scratch_dir(void);

/* Removes every file in the scratch directory and the directory itself. */
static inline void scratch_cleanup(void) {
    DIR *d;
    struct dirent *e;
    char p[8192];
    if (g_dir[0] == '\0')
        return;
    d = opendir(g_dir);
    if (d != NULL) {
        while ((e = readdir(d)) != NULL) {
            if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
                continue;
            snprintf(p, sizeof p, "%s/%s", g_dir, e->d_name);
            unlink(p);
        }
        closedir(d);
    }
    rmdir(g_dir);
    g_dir[0] = '\0';
}

static inline const char *scratch_dir(void) {
    const char *base = getenv("TMPDIR");
    static int registered;
    scratch_cleanup();
    snprintf(g_dir, sizeof g_dir, "%s/oxcow-ctest-XXXXXX", base && base[0] ? base : "/tmp");
    if (mkdtemp(g_dir) == NULL) {
        perror("mkdtemp");
        exit(2);
    }
    if (!registered) {
        atexit(scratch_cleanup);
        registered = 1;
    }
    return g_dir;
}

/* A path inside the scratch directory (static buffer rotation: up to 8 live results). */
static inline const char *scratch_path(const char *name) {
    static char bufs[8][8192];
    static int next;
    char *b = bufs[next++ % 8];
    if (g_dir[0] == '\0')
        scratch_dir();
    snprintf(b, sizeof bufs[0], "%s/%s", g_dir, name);
    return b;
}

/* ---- host files ---- */

/* Reads a whole file into a malloc'ed buffer; *len receives its size. NULL on failure. */
static inline unsigned char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    unsigned char *buf;
    long n;
    if (f == NULL)
        return NULL;
    if (fseek(f, 0, SEEK_END) != 0 || (n = ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        return NULL;
    }
    buf = (unsigned char *)malloc((size_t)n + 1);
    if (buf != NULL && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = (size_t)n;
    return buf;
}

/* Writes `len` bytes at `off` of a file, creating it if needed. 0 on success. */
static inline int write_file_at(const char *path, const void *buf, size_t len, off_t off) {
    int fd = open(path, O_WRONLY | O_CREAT, 0644);
    ssize_t n;
    if (fd < 0)
        return -1;
    n = pwrite(fd, buf, len, off);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* Reads `len` bytes at `off` of a file. 0 on success. */
static inline int read_file_at(const char *path, void *buf, size_t len, off_t off) {
    int fd = open(path, O_RDONLY);
    ssize_t n;
    if (fd < 0)
        return -1;
    n = pread(fd, buf, len, off);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

/* Deterministic, position-dependent test data: byte i of a pattern with seed s. */
static inline void fill_pattern(unsigned char *buf, size_t len, uint64_t start, unsigned seed) {
    size_t i;
    for (i = 0; i < len; i++) {
        uint64_t x = (start + i) * 2654435761u + seed * 40503u;
        buf[i] = (unsigned char)((x >> 13) ^ (x >> 5) ^ seed);
    }
}

static inline int all_bytes(const unsigned char *buf, size_t len, unsigned char v) {
    size_t i;
    for (i = 0; i < len; i++)
        if (buf[i] != v)
            return 0;
    return 1;
}

/* ---- external commands ---- */

/* Runs a shell command built with printf-style formatting; returns its exit status (or -1).
 * The command's output goes to stderr so it appears in ctest's failure output. */
static inline int run(const char *fmt, ...) {
    char cmd[16384];
    va_list ap;
    int st;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    st = system(cmd);
    if (st == -1 || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

/* Runs a command and captures its stdout (up to cap-1 bytes, NUL-terminated). Exit status or
 * -1. */
static inline int capture(char *out, size_t cap, const char *fmt, ...) {
    char cmd[16384];
    va_list ap;
    FILE *p;
    size_t n = 0, r;
    int st;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    p = popen(cmd, "r");
    if (p == NULL)
        return -1;
    while (n + 1 < cap && (r = fread(out + n, 1, cap - 1 - n, p)) > 0)
        n += r;
    out[n] = '\0';
    st = pclose(p);
    if (st == -1 || !WIFEXITED(st))
        return -1;
    return WEXITSTATUS(st);
}

/* `qemu-img check` exit status: 0 clean, 2 corruptions, 3 leaks. */
static inline int qemu_check(const char *path) {
    return run("qemu-img check -q '%s' 1>&2", path);
}

/* `qemu-img compare` of a qcow2 image against a raw file: 0 identical, 1 different. */
static inline int qemu_compare_raw(const char *raw, const char *qcow2) {
    return run("qemu-img compare -q -f raw -F qcow2 '%s' '%s' 1>&2", raw, qcow2);
}

/* ---- oxcow helpers ---- */

static inline oxcow_image *open_image(const char *path, uint32_t flags) {
    oxcow_image *img = NULL;
    oxcow_error *err = NULL;
    int rc = oxcow_open(path, flags, NULL, &img, &err);
    if (rc != 0) {
        fprintf(stderr, "oxcow_open(%s) failed: %d %s\n", path, rc, oxcow_error_message(err));
        oxcow_error_free(err);
        return NULL;
    }
    return img;
}

/* Creates an image with default options. 0 on success. */
static inline int create_default(const char *path, uint64_t size) {
    oxcow_error *err = NULL;
    int rc = oxcow_create(path, size, NULL, &err);
    if (rc != 0) {
        fprintf(stderr, "oxcow_create(%s) failed: %d %s\n", path, rc, oxcow_error_message(err));
        oxcow_error_free(err);
    }
    return rc;
}

#endif /* OXCOW_CTEST_COMMON_H */
