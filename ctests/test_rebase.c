/*
 * oxcow_rebase(): argument checks; a safe rebase onto another file and onto nothing while a
 * pthread writes to the top keeps every guest byte (the model); an unsafe rebase changes only
 * the header. qemu-img checks the results and reads the chains.
 */
#include "common.h"

#include <pthread.h>

#define MiB (1ull << 20)
#define CL (64ull << 10)
#define SIZE (4 * MiB)
#define ROUNDS 200

struct writer {
    oxcow_image *img;
    int failures;
};

/* The pattern the writer puts in cluster `c` of the upper half. */
static unsigned char writer_byte(uint64_t c) { return (unsigned char)(0x80 | (c & 0x3f)); }

static void *writer_main(void *arg) {
    struct writer *w = arg;
    unsigned char *buf = malloc(CL);
    uint64_t i;
    if (!buf) {
        w->failures++;
        return NULL;
    }
    for (i = 0; i < ROUNDS; i++) {
        uint64_t c = SIZE / 2 / CL + (i * 7) % (SIZE / 2 / CL);
        memset(buf, writer_byte(c), CL);
        if (oxcow_pwrite(w->img, buf, CL, c * CL) != 0)
            w->failures++;
    }
    free(buf);
    return NULL;
}

/* old: 0x11 over the first 3 MiB; new: 0x11 over the first MiB, 0x22 at 2 MiB; top: 0x33
 * in its first cluster. */
static void make_chain(const char *dir) {
    REQUIRE(run("cd '%s' && qemu-img create -q -f qcow2 old.qcow2 4M && "
                "qemu-io -c 'write -P 0x11 0 3M' old.qcow2 >/dev/null && "
                "qemu-img create -q -f qcow2 new.qcow2 4M && "
                "qemu-io -c 'write -P 0x11 0 1M' -c 'write -P 0x22 2M 64k' new.qcow2 >/dev/null && "
                "qemu-img create -q -f qcow2 -b old.qcow2 -F qcow2 top.qcow2 && "
                "qemu-io -c 'write -P 0x33 0 64k' top.qcow2 >/dev/null",
                dir) == 0);
}

/* Reads the whole guest and checks it against the chain's content before the rebase and
 * the writer's clusters. */
static void check_guest(oxcow_image *img) {
    unsigned char *buf = malloc(SIZE);
    uint64_t c;
    REQUIRE(buf != NULL);
    CHECK_EQ(oxcow_pread(img, buf, SIZE, 0), 0);
    for (c = 0; c < SIZE / CL; c++) {
        const unsigned char *p = buf + c * CL;
        unsigned char want = c == 0 ? 0x33 : c < 3 * MiB / CL ? 0x11 : 0;
        if (c >= SIZE / 2 / CL && p[0] == writer_byte(c))
            want = writer_byte(c);
        if (!all_bytes(p, CL, want)) {
            fprintf(stderr, "cluster %" PRIu64 ": expected 0x%02x\n", c, want);
            g_failures++;
            break;
        }
    }
    free(buf);
}

static void test_safe_live(void) {
    const char *dir = scratch_dir();
    char top[4096], out[4096];
    oxcow_image *img;
    pthread_t th;
    struct writer w = {0};
    make_chain(dir);
    snprintf(top, sizeof top, "%s/top.qcow2", dir);
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    w.img = img;
    REQUIRE(pthread_create(&th, NULL, writer_main, &w) == 0);
    CHECK_EQ(oxcow_rebase(img, "new.qcow2", "qcow2", 0, NULL), 0);
    pthread_join(th, NULL);
    CHECK_EQ(w.failures, 0);
    check_guest(img);
    CHECK_EQ(oxcow_rebase(img, "", NULL, 0, NULL), 0);
    check_guest(img);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK(capture(out, sizeof out, "qemu-img info '%s'", top) == 0);
    CHECK(strstr(out, "backing file") == NULL);
    img = open_image(top, 0);
    REQUIRE(img != NULL);
    check_guest(img);
    CHECK_EQ(oxcow_close(img), 0);
}

static void test_unsafe(void) {
    const char *dir = scratch_dir();
    char top[4096], out[4096];
    oxcow_image *img;
    unsigned char b[512];
    make_chain(dir);
    snprintf(top, sizeof top, "%s/top.qcow2", dir);
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    CHECK_EQ(oxcow_rebase(img, "new.qcow2", "qcow2", OXCOW_REBASE_UNSAFE, NULL), 0);
    /* The handle reads through the new chain now: 0x22 at 2 MiB, zeros at 1 MiB. */
    CHECK_EQ(oxcow_pread(img, b, sizeof b, 2 * MiB), 0);
    CHECK(all_bytes(b, sizeof b, 0x22));
    CHECK_EQ(oxcow_pread(img, b, sizeof b, 1 * MiB), 0);
    CHECK(all_bytes(b, sizeof b, 0));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK(capture(out, sizeof out, "qemu-img info '%s'", top) == 0);
    CHECK(strstr(out, "backing file: new.qcow2") != NULL);
    CHECK(strstr(out, "backing file format: qcow2") != NULL);
    CHECK(run("qemu-img compare -q '%s/new.qcow2' '%s' >/dev/null", dir, top) != 0);
}

static void test_arguments(void) {
    const char *dir = scratch_dir();
    char top[4096], long_name[1100];
    oxcow_error *err = NULL;
    oxcow_image *img;
    make_chain(dir);
    snprintf(top, sizeof top, "%s/top.qcow2", dir);
    CHECK_EQ(oxcow_rebase(NULL, "new.qcow2", "qcow2", 0, NULL), -EINVAL);
    img = open_image(top, 0);
    REQUIRE(img != NULL);
    CHECK_ERR(oxcow_rebase(img, "new.qcow2", "qcow2", 0, &err), err, EROFS);
    err = NULL;
    CHECK_EQ(oxcow_close(img), 0);
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    CHECK_ERR(oxcow_rebase(img, "new.qcow2", "qcow2", 0x80, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_rebase(img, "new.qcow2", NULL, 0, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_rebase(img, "new.qcow2", "foo", 0, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_rebase(img, "new.qcow2", "vmdk", 0, &err), err, ENOTSUP);
    err = NULL;
    CHECK_ERR(oxcow_rebase(img, "missing.qcow2", "qcow2", 0, &err), err, ENOENT);
    err = NULL;
    memset(long_name, 'a', 1024);
    long_name[1024] = '\0';
    CHECK_ERR(oxcow_rebase(img, long_name, "raw", OXCOW_REBASE_UNSAFE, &err), err, EINVAL);
    err = NULL;
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(top), 0);
    /* Nothing changed: the old chain is still there. */
    CHECK(run("qemu-img info '%s' | grep -q 'backing file: old.qcow2'", top) == 0);
}

/* oxcow_amend(): refcount width and version changes match qemu-img's view, keep the
 * content, and the refusals change nothing. */
static void test_amend(void) {
    const char *dir = scratch_dir();
    char top[4096], out[4096];
    struct oxcow_amend_options o;
    oxcow_error *err = NULL;
    oxcow_image *img;
    snprintf(top, sizeof top, "%s/a.qcow2", dir);
    REQUIRE(run("cd '%s' && qemu-img create -q -f qcow2 a.qcow2 4M && "
                "qemu-io -c 'write -P 0x11 0 1M' -c 'write -z 1M 64k' a.qcow2 >/dev/null && "
                "qemu-img snapshot -c s1 a.qcow2 && cp a.qcow2 ref.qcow2",
                dir) == 0);
    oxcow_amend_options_init(&o);
    o.refcount_bits = 64;
    o.lazy_refcounts = OXCOW_AMEND_LAZY_ON;
    CHECK_EQ(oxcow_amend(top, &o, NULL), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK(capture(out, sizeof out, "qemu-img info '%s'", top) == 0);
    CHECK(strstr(out, "refcount bits: 64") != NULL);
    CHECK(strstr(out, "lazy refcounts: true") != NULL);
    /* A downgrade needs 16-bit refcounts: refused, nothing changed. */
    oxcow_amend_options_init(&o);
    o.version = 2;
    CHECK_ERR(oxcow_amend(top, &o, &err), err, EINVAL);
    err = NULL;
    o.refcount_bits = 16;
    CHECK_EQ(oxcow_amend(top, &o, NULL), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK(capture(out, sizeof out, "qemu-img info '%s'", top) == 0);
    CHECK(strstr(out, "compat: 0.10") != NULL);
    CHECK(run("qemu-img compare -q '%s' '%s/ref.qcow2'", top, dir) == 0);
    /* Arguments and refusals. */
    oxcow_amend_options_init(&o);
    CHECK_ERR(oxcow_amend(NULL, &o, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_amend(top, NULL, &err), err, EINVAL);
    err = NULL;
    o.lazy_refcounts = 7;
    CHECK_ERR(oxcow_amend(top, &o, &err), err, EINVAL);
    err = NULL;
    oxcow_amend_options_init(&o);
    o.lazy_refcounts = OXCOW_AMEND_LAZY_ON;
    CHECK_ERR(oxcow_amend(top, &o, &err), err, EINVAL); /* version 2 */
    err = NULL;
    o.lazy_refcounts = OXCOW_AMEND_LAZY_KEEP;
    o.refcount_bits = 3;
    CHECK_ERR(oxcow_amend(top, &o, &err), err, EINVAL);
    err = NULL;
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    oxcow_amend_options_init(&o);
    o.version = 3;
    CHECK_ERR(oxcow_amend(top, &o, &err), err, EAGAIN);
    err = NULL;
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(oxcow_amend(top, &o, NULL), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK(run("qemu-img compare -q '%s' '%s/ref.qcow2'", top, dir) == 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"safe_live", test_safe_live},
        {"unsafe", test_unsafe},
        {"arguments", test_arguments},
        {"amend", test_amend},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
