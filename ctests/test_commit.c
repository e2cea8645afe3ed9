/*
 * oxcow_commit(): arguments and refusals, and commits (emptying the top, then keeping it)
 * while pthreads keep writing to the top: the final guest content equals the model, and
 * qemu-img finds both files clean and the top identical to the model.
 */
#include "common.h"

#include <pthread.h>

#define MiB (1ull << 20)
#define SIZE (8 * MiB)
#define BLK 4096ull
#define NWRITERS 3

static unsigned char *g_model;
static int g_stop;

struct writer {
    oxcow_image *img;
    unsigned id;
    int failures;
    unsigned long writes;
};

/* Each writer owns the 4 KiB blocks b with b % NWRITERS == id, so the model needs no lock. */
static void *writer_main(void *arg) {
    struct writer *w = (struct writer *)arg;
    unsigned char buf[BLK];
    uint64_t x = 0x9e3779b97f4a7c15ull * (w->id + 1);
    unsigned seq = 0;
    while (!__atomic_load_n(&g_stop, __ATOMIC_SEQ_CST)) {
        uint64_t b;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b = (x % (SIZE / BLK / NWRITERS)) * NWRITERS + w->id;
        fill_pattern(buf, BLK, b * BLK, ++seq * NWRITERS + w->id);
        if (oxcow_pwrite(w->img, buf, BLK, b * BLK) != 0) {
            w->failures++;
            break;
        }
        memcpy(g_model + b * BLK, buf, BLK);
        w->writes++;
    }
    return NULL;
}

struct progress {
    unsigned calls;
    uint64_t last_done, total;
    int backwards;
};

static void on_progress(void *opaque, uint64_t done, uint64_t total) {
    struct progress *p = (struct progress *)opaque;
    if (p->calls > 0 && done < p->last_done && total == p->total)
        p->backwards = 1;
    p->calls++;
    p->last_done = done;
    p->total = total;
}

/* `base` with data in its first half, `top` over it (naming it `base_name`); the model holds base's data. */
static int make_chain(const char *base, const char *base_name, const char *top) {
    oxcow_create_options co;
    oxcow_error *err = NULL;
    oxcow_image *img;
    unsigned char *buf = (unsigned char *)malloc(SIZE / 2);
    int rc;
    if (buf == NULL || create_default(base, SIZE) != 0 || (img = open_image(base, OXCOW_OPEN_RDWR)) == NULL) {
        free(buf);
        return -1;
    }
    fill_pattern(buf, SIZE / 2, 0, 7);
    rc = oxcow_pwrite(img, buf, SIZE / 2, 0);
    rc |= oxcow_close(img);
    memset(g_model, 0, SIZE);
    memcpy(g_model, buf, SIZE / 2);
    free(buf);
    oxcow_create_options_init(&co);
    co.backing_file = base_name;
    co.backing_format = "qcow2";
    rc |= oxcow_create(top, SIZE, &co, &err);
    if (err != NULL) {
        fprintf(stderr, "create top: %s\n", oxcow_error_message(err));
        oxcow_error_free(err);
    }
    return rc;
}

static int guest_equals_model(oxcow_image *img) {
    unsigned char *buf = (unsigned char *)malloc(SIZE);
    int same = buf != NULL && oxcow_pread(img, buf, SIZE, 0) == 0 && memcmp(buf, g_model, SIZE) == 0;
    free(buf);
    return same;
}

static void test_under_load(void) {
    const char *base = scratch_path("base.qcow2"), *top = scratch_path("top.qcow2");
    const char *raw = scratch_path("model.raw");
    pthread_t th[NWRITERS];
    struct writer w[NWRITERS];
    struct progress p;
    oxcow_commit_options opts;
    oxcow_image *img;
    oxcow_error *err = NULL;
    unsigned i, round;
    g_model = (unsigned char *)malloc(SIZE);
    REQUIRE(g_model != NULL);
    REQUIRE(make_chain(base, "base.qcow2", top) == 0);
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    g_stop = 0;
    for (i = 0; i < NWRITERS; i++) {
        memset(&w[i], 0, sizeof w[i]);
        w[i].img = img;
        w[i].id = i;
        REQUIRE(pthread_create(&th[i], NULL, writer_main, &w[i]) == 0);
    }
    for (round = 0; round < 4; round++) {
        memset(&p, 0, sizeof p);
        oxcow_commit_options_init(&opts);
        opts.flags = round % 2 ? OXCOW_COMMIT_KEEP_TOP : 0;
        opts.progress = on_progress;
        opts.progress_opaque = &p;
        usleep(20000);
        CHECK_EQ(oxcow_commit(img, &opts, &err), 0);
        if (err != NULL) {
            fprintf(stderr, "commit: %s\n", oxcow_error_message(err));
            oxcow_error_free(err);
            err = NULL;
        }
        CHECK(p.calls > 0);
        CHECK(!p.backwards);
        CHECK_EQ(p.last_done, p.total);
    }
    __atomic_store_n(&g_stop, 1, __ATOMIC_SEQ_CST);
    for (i = 0; i < NWRITERS; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ(w[i].failures, 0);
        CHECK(w[i].writes > 0);
    }
    CHECK(guest_equals_model(img));
    CHECK_EQ(oxcow_close(img), 0);
    /* And as a new handle reads the files. */
    img = open_image(top, 0);
    REQUIRE(img != NULL);
    CHECK(guest_equals_model(img));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(base), 0);
    CHECK_EQ(qemu_check(top), 0);
    REQUIRE(write_file_at(raw, g_model, SIZE, 0) == 0);
    CHECK_EQ(qemu_compare_raw(raw, top), 0);
    free(g_model);
}

static void test_arguments(void) {
    const char *base = scratch_path("abase.qcow2"), *top = scratch_path("atop.qcow2");
    oxcow_commit_options opts;
    oxcow_image *img;
    oxcow_error *err = NULL;
    g_model = (unsigned char *)malloc(SIZE);
    REQUIRE(g_model != NULL);
    REQUIRE(make_chain(base, "abase.qcow2", top) == 0);
    CHECK_EQ(oxcow_commit(NULL, NULL, NULL), -EINVAL);
    img = open_image(top, 0);
    REQUIRE(img != NULL);
    CHECK_ERR(oxcow_commit(img, NULL, &err), err, EROFS);
    err = NULL;
    CHECK_EQ(oxcow_close(img), 0);
    img = open_image(base, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    CHECK_ERR(oxcow_commit(img, NULL, &err), err, EINVAL); /* no backing file */
    err = NULL;
    CHECK_EQ(oxcow_close(img), 0);
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    oxcow_commit_options_init(&opts);
    opts.flags = 0x80;
    CHECK_ERR(oxcow_commit(img, &opts, &err), err, EINVAL);
    err = NULL;
    oxcow_commit_options_init(&opts);
    opts.struct_size = 4;
    CHECK_ERR(oxcow_commit(img, &opts, &err), err, EINVAL);
    err = NULL;
    oxcow_commit_options_init(&opts);
    opts.base = "nowhere.qcow2";
    CHECK_ERR(oxcow_commit(img, &opts, &err), err, EINVAL);
    err = NULL;
    /* The base by its path; NULL options are the defaults. */
    CHECK_EQ(oxcow_pwrite(img, "commit", 6, 1 * MiB), 0);
    memcpy(g_model + 1 * MiB, "commit", 6);
    opts.base = base;
    CHECK_EQ(oxcow_commit(img, &opts, NULL), 0);
    CHECK_EQ(oxcow_commit(img, NULL, NULL), 0);
    CHECK(guest_equals_model(img));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(base), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK_EQ(run("qemu-img compare -q '%s' '%s' 1>&2", base, top), 0);
    free(g_model);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"under_load", test_under_load},
        {"arguments", test_arguments},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
