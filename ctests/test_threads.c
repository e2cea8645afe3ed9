/*
 * One oxcow_image shared by several threads: disjoint writers (separate regions, interleaved
 * clusters, and quarters of the same clusters), each reading back its own data while other
 * threads write, plus a thread calling flush/block_status/get_info concurrently. Afterwards the
 * whole image is compared with the expected contents and checked by qemu-img.
 */
#include "common.h"

#include <pthread.h>

#define MiB (1ull << 20)
#define KiB (1ull << 10)
#define CL (64 * KiB)
#define NTHREADS 4
#define SIZE (16 * MiB)

enum layout {
    REGIONS,     /* thread t owns [t * SIZE/4, (t+1) * SIZE/4) */
    CLUSTERS,    /* thread t owns clusters c with c % 4 == t */
    SUBCLUSTERS, /* thread t owns bytes [c*CL + t*CL/4, +CL/4) of every cluster c */
};

struct worker {
    oxcow_image *img;
    enum layout layout;
    int t;
    unsigned char *expected; /* shared SIZE-byte model; each thread writes only its part */
    int failures;
    int round;
};

static volatile int g_stop;

/* The i-th piece (offset, length) thread t owns under `layout`; 0 when there are no more. */
static int piece(enum layout layout, int t, uint64_t i, uint64_t *off, size_t *len) {
    switch (layout) {
    case REGIONS: {
        const uint64_t chunk = 100 * KiB + 7; /* unaligned chunks */
        uint64_t base = (uint64_t)t * (SIZE / NTHREADS), o = i * chunk;
        if (o >= SIZE / NTHREADS)
            return 0;
        *off = base + o;
        *len = (size_t)(o + chunk > SIZE / NTHREADS ? SIZE / NTHREADS - o : chunk);
        return 1;
    }
    case CLUSTERS: {
        uint64_t c = i * NTHREADS + (uint64_t)t;
        if (c >= SIZE / CL)
            return 0;
        *off = c * CL;
        *len = CL;
        return 1;
    }
    case SUBCLUSTERS: {
        if (i >= SIZE / CL / 2) /* half the clusters, to keep the run short */
            return 0;
        *off = i * CL + (uint64_t)t * (CL / NTHREADS);
        *len = CL / NTHREADS;
        return 1;
    }
    }
    return 0;
}

static void *writer(void *arg) {
    struct worker *w = (struct worker *)arg;
    unsigned char *buf = (unsigned char *)malloc(200 * KiB), *back = (unsigned char *)malloc(200 * KiB);
    uint64_t i, off;
    size_t len;
    if (buf == NULL || back == NULL) {
        w->failures++;
        free(buf);
        free(back);
        return NULL;
    }
    for (i = 0; piece(w->layout, w->t, i, &off, &len); i++) {
        int rc;
        fill_pattern(buf, len, off, (unsigned)(w->t * 131 + w->round * 7 + 1));
        if (i % 5 == 3) {
            /* Some pieces go through the vectored path, split in three. */
            struct iovec iov[3];
            iov[0].iov_base = buf;
            iov[0].iov_len = len / 3;
            iov[1].iov_base = buf + len / 3;
            iov[1].iov_len = len / 3;
            iov[2].iov_base = buf + 2 * (len / 3);
            iov[2].iov_len = len - 2 * (len / 3);
            rc = oxcow_pwritev(w->img, iov, 3, off);
        } else {
            rc = oxcow_pwrite(w->img, buf, len, off);
        }
        if (rc != 0) {
            fprintf(stderr, "thread %d: write at %" PRIu64 " failed: %d\n", w->t, off, rc);
            w->failures++;
            continue;
        }
        memcpy(w->expected + off, buf, len);
        memset(back, 0, len);
        rc = oxcow_pread(w->img, back, len, off);
        if (rc != 0 || memcmp(back, buf, len) != 0) {
            fprintf(stderr, "thread %d: read-back at %" PRIu64 " differs (rc %d)\n", w->t, off, rc);
            w->failures++;
        }
    }
    /* Verify everything this thread wrote, once more, while others may still write. */
    for (i = 0; piece(w->layout, w->t, i, &off, &len); i++) {
        if (oxcow_pread(w->img, back, len, off) != 0 || memcmp(back, w->expected + off, len) != 0) {
            fprintf(stderr, "thread %d: final read at %" PRIu64 " differs\n", w->t, off);
            w->failures++;
        }
    }
    free(buf);
    free(back);
    return NULL;
}

/* Concurrent control-plane calls: flush, block_status, get_info. */
static void *observer(void *arg) {
    struct worker *w = (struct worker *)arg;
    uint64_t off = 0;
    while (!g_stop) {
        oxcow_extent e;
        oxcow_info info;
        if (oxcow_flush(w->img) != 0) {
            fprintf(stderr, "observer: flush failed\n");
            w->failures++;
        }
        if (oxcow_block_status(w->img, off, SIZE - off, &e) != 0 || e.offset != off ||
            e.length == 0 || e.length > SIZE - off) {
            fprintf(stderr, "observer: block_status failed at %" PRIu64 "\n", off);
            w->failures++;
            off = 0;
        } else {
            off = (off + e.length) % SIZE;
        }
        oxcow_info_init(&info);
        if (oxcow_get_info(w->img, &info) != 0 || info.virtual_size != SIZE) {
            fprintf(stderr, "observer: get_info failed\n");
            w->failures++;
        }
    }
    return NULL;
}

static void run_layout(enum layout layout, const char *name) {
    const char *path;
    oxcow_image *img;
    unsigned char *expected = (unsigned char *)calloc(1, SIZE), *got = (unsigned char *)malloc(SIZE);
    struct worker w[NTHREADS + 1];
    pthread_t th[NTHREADS + 1];
    int t, round;
    REQUIRE(expected != NULL && got != NULL);
    scratch_dir();
    path = scratch_path(name);
    REQUIRE_OK(create_default(path, SIZE));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);

    /* Round 0 allocates, round 1 overwrites allocated clusters. */
    for (round = 0; round < 2; round++) {
        g_stop = 0;
        for (t = 0; t <= NTHREADS; t++) {
            w[t].img = img;
            w[t].layout = layout;
            w[t].t = t;
            w[t].expected = expected;
            w[t].failures = 0;
            w[t].round = round;
            REQUIRE(pthread_create(&th[t], NULL, t < NTHREADS ? writer : observer, &w[t]) == 0);
        }
        for (t = 0; t < NTHREADS; t++)
            pthread_join(th[t], NULL);
        g_stop = 1;
        pthread_join(th[NTHREADS], NULL);
        for (t = 0; t <= NTHREADS; t++)
            CHECK_EQ(w[t].failures, 0);
    }

    memset(got, 0xee, SIZE);
    CHECK_EQ(oxcow_pread(img, got, SIZE, 0), 0);
    CHECK(memcmp(got, expected, SIZE) == 0);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);

    /* Reopened, and as QEMU sees it. */
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    memset(got, 0xee, SIZE);
    CHECK_EQ(oxcow_pread(img, got, SIZE, 0), 0);
    CHECK(memcmp(got, expected, SIZE) == 0);
    CHECK_EQ(oxcow_close(img), 0);
    {
        const char *raw = scratch_path("expected.raw");
        CHECK_EQ(write_file_at(raw, expected, SIZE, 0), 0);
        CHECK_EQ(qemu_compare_raw(raw, path), 0);
    }
    free(expected);
    free(got);
}

static void test_regions(void) { run_layout(REGIONS, "regions.qcow2"); }
static void test_clusters(void) { run_layout(CLUSTERS, "clusters.qcow2"); }
static void test_subclusters(void) { run_layout(SUBCLUSTERS, "subclusters.qcow2"); }

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"regions", test_regions},
        {"interleaved_clusters", test_clusters},
        {"shared_clusters", test_subclusters},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
