/*
 * oxcow_resize(): argument and mode checks, and a live handle resized (shrunk and grown again
 * and again) while pthreads write and read whole clusters on both sides of the boundary. No
 * request may succeed while the image was small throughout, none inside the small size may
 * fail, reads see zeros or a complete cluster, and qemu-img finds the result clean.
 */
#include "common.h"

#include <pthread.h>

#define MiB (1ull << 20)
#define CL (64ull << 10)
#define SMALL (8 * MiB)
#define BIG (12 * MiB)
#define FIRST ((SMALL - 2 * MiB) / CL) /* first slot (cluster) used */
#define SLOTS (BIG / CL - FIRST)
#define NWRITERS 2
#define NREADERS 2
#define ROUNDS 30

/* 0 big, 1 shrinking, 2 small, 3 growing (mod 4); bumped by the resizing thread. */
static uint64_t g_phase;
static int g_stop;

static uint64_t phase_now(void) { return __atomic_load_n(&g_phase, __ATOMIC_SEQ_CST); }
static void phase_bump(void) { __atomic_fetch_add(&g_phase, 1, __ATOMIC_SEQ_CST); }

struct worker {
    oxcow_image *img;
    unsigned id;
    int failures;
    unsigned long ok;
};

static void fill_slot(unsigned char *buf, uint64_t slot, uint64_t seq) {
    uint64_t word = slot << 32 | seq, i;
    for (i = 0; i < CL; i += 8)
        memcpy(buf + i, &word, 8);
}

/* 1 when the cluster is all zeros or holds only words written for `slot` (an in-place
 * overwrite racing the read may mix two of its writes, never another slot's data). */
static int cluster_valid(const unsigned char *buf, uint64_t slot) {
    uint64_t word, i;
    if (all_bytes(buf, CL, 0))
        return 1;
    for (i = 0; i < CL; i += 8) {
        memcpy(&word, buf + i, 8);
        if (word >> 32 != slot)
            return 0;
    }
    return 1;
}

/* Whether a request's outcome fits the phases seen before and after it. */
static int outcome_ok(int rc, int past_small, uint64_t p0, uint64_t p1) {
    if (rc != 0 && rc != -EINVAL)
        return 0;
    if (!past_small)
        return rc == 0;
    if (p0 == p1 && p0 % 4 == 2)
        return rc == -EINVAL;
    if (p0 == p1 && p0 % 4 == 0)
        return rc == 0;
    return 1;
}

static void *writer_main(void *arg) {
    struct worker *w = arg;
    unsigned char *buf = malloc(CL);
    uint64_t seq = 1, r = w->id + 1;
    if (!buf) {
        w->failures++;
        return NULL;
    }
    while (!__atomic_load_n(&g_stop, __ATOMIC_SEQ_CST)) {
        uint64_t slot, p0, p1;
        int rc;
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        slot = FIRST + ((r >> 33) % (SLOTS / NWRITERS)) * NWRITERS + w->id;
        fill_slot(buf, slot, seq++);
        p0 = phase_now();
        rc = oxcow_pwrite(w->img, buf, CL, slot * CL);
        p1 = phase_now();
        if (!outcome_ok(rc, slot * CL >= SMALL, p0, p1)) {
            fprintf(stderr, "writer %u: slot %llu rc %d phases %llu..%llu\n", w->id,
                    (unsigned long long)slot, rc, (unsigned long long)p0,
                    (unsigned long long)p1);
            w->failures++;
        }
        w->ok += rc == 0;
    }
    free(buf);
    return NULL;
}

static void *reader_main(void *arg) {
    struct worker *w = arg;
    unsigned char *buf = malloc(3 * CL);
    uint64_t r = w->id + 77;
    if (!buf) {
        w->failures++;
        return NULL;
    }
    while (!__atomic_load_n(&g_stop, __ATOMIC_SEQ_CST)) {
        uint64_t slot, n, p0, p1, i;
        int rc;
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        slot = FIRST + (r >> 33) % (SLOTS - 3);
        n = 1 + (r >> 20) % 3;
        p0 = phase_now();
        rc = oxcow_pread(w->img, buf, n * CL, slot * CL);
        p1 = phase_now();
        if (!outcome_ok(rc, (slot + n) * CL > SMALL, p0, p1)) {
            fprintf(stderr, "reader %u: slot %llu+%llu rc %d\n", w->id,
                    (unsigned long long)slot, (unsigned long long)n, rc);
            w->failures++;
        }
        for (i = 0; rc == 0 && i < n; i++) {
            if (!cluster_valid(buf + i * CL, slot + i)) {
                fprintf(stderr, "reader %u: slot %llu holds foreign data\n", w->id,
                        (unsigned long long)(slot + i));
                w->failures++;
            }
        }
        w->ok += rc == 0;
    }
    free(buf);
    return NULL;
}

static void test_live_boundary(void) {
    const char *path = scratch_path("live.qcow2");
    pthread_t th[NWRITERS + NREADERS];
    struct worker w[NWRITERS + NREADERS];
    struct oxcow_info info;
    oxcow_image *img;
    unsigned i;
    char out[256];
    REQUIRE(create_default(path, BIG) == 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    g_stop = 0;
    g_phase = 0;
    for (i = 0; i < NWRITERS + NREADERS; i++) {
        w[i].img = img;
        w[i].id = i < NWRITERS ? i : i - NWRITERS;
        w[i].failures = 0;
        w[i].ok = 0;
        REQUIRE(pthread_create(&th[i], NULL, i < NWRITERS ? writer_main : reader_main, &w[i]) ==
                0);
    }
    for (i = 0; i < ROUNDS; i++) {
        usleep(3000);
        phase_bump();
        CHECK_EQ(oxcow_resize(img, SMALL, OXCOW_RESIZE_SHRINK, NULL), 0);
        phase_bump();
        usleep(3000);
        phase_bump();
        CHECK_EQ(oxcow_resize(img, BIG, 0, NULL), 0);
        phase_bump();
    }
    __atomic_store_n(&g_stop, 1, __ATOMIC_SEQ_CST);
    for (i = 0; i < NWRITERS + NREADERS; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ(w[i].failures, 0);
        CHECK(w[i].ok > 0);
    }
    oxcow_info_init(&info);
    CHECK_EQ(oxcow_get_info(img, &info), 0);
    CHECK_EQ(info.virtual_size, BIG);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
    CHECK(capture(out, sizeof out, "qemu-img info --output=json '%s' | grep '\"virtual-size\"'",
                  path) == 0);
    CHECK(strstr(out, "12582912") != NULL);
}

static void test_arguments(void) {
    const char *path = scratch_path("args.qcow2");
    oxcow_error *err = NULL;
    oxcow_image *img;
    struct oxcow_info info;
    REQUIRE(create_default(path, 4 * MiB) == 0);
    CHECK_EQ(oxcow_resize(NULL, 8 * MiB, 0, NULL), -EINVAL);
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    CHECK_ERR(oxcow_resize(img, 8 * MiB, 0, &err), err, EROFS);
    err = NULL;
    CHECK_EQ(oxcow_close(img), 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    CHECK_ERR(oxcow_resize(img, 8 * MiB, 0x80, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_resize(img, 2 * MiB, 0, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_resize(img, 8 * MiB + 100, 0, &err), err, EINVAL);
    err = NULL;
    CHECK_EQ(oxcow_resize(img, 6 * MiB + 512, 0, &err), 0);
    CHECK(err == NULL);
    oxcow_info_init(&info);
    CHECK_EQ(oxcow_get_info(img, &info), 0);
    CHECK_EQ(info.virtual_size, 6 * MiB + 512);
    CHECK_EQ(oxcow_resize(img, 1 * MiB, OXCOW_RESIZE_SHRINK, NULL), 0);
    {
        unsigned char b[512];
        CHECK_EQ(oxcow_pread(img, b, sizeof b, 1 * MiB), -EINVAL);
    }
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"live_boundary", test_live_boundary},
        {"arguments", test_arguments},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
