/* oxcow_reopen from C: read-write <-> read-only with QEMU's locks moving along, failures that
 * change nothing, and reopen racing I/O from other threads. */
#include "common.h"

#include <pthread.h>

#define MiB (1024u * 1024u)

static void test_rw_ro_rw(void) {
    const char *path;
    oxcow_image *img;
    oxcow_error *err = NULL;
    unsigned char buf[4096];
    scratch_dir();
    path = scratch_path("rwro.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    memset(buf, 0x5a, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 1000), 0);
    /* While we hold the image read-write, QEMU cannot open it. */
    CHECK(run("qemu-img info '%s' >/dev/null 2>&1", path) != 0);

    CHECK_EQ(oxcow_reopen(img, 0, &err), 0);
    CHECK(err == NULL);
    /* Flushed and unlocked for readers; writes now fail with -EROFS. */
    CHECK_EQ(run("qemu-img info '%s' >/dev/null 2>&1", path), 0);
    CHECK_EQ(qemu_check(path), 0);
    CHECK_EQ(oxcow_pwrite(img, buf, 1, 0), -EROFS);
    {
        oxcow_info info;
        oxcow_info_init(&info);
        CHECK_EQ(oxcow_get_info(img, &info), 0);
        CHECK(info.flags & OXCOW_INFO_READ_ONLY);
    }

    CHECK_EQ(oxcow_reopen(img, OXCOW_OPEN_RDWR, NULL), 0);
    CHECK(run("qemu-img info '%s' >/dev/null 2>&1", path) != 0);
    memset(buf, 0x6b, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, 512, 0), 0);
    memset(buf, 0, sizeof buf);
    CHECK_EQ(oxcow_pread(img, buf, 512, 0), 0);
    CHECK(all_bytes(buf, 512, 0x6b));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

static void test_refusals_change_nothing(void) {
    const char *path;
    oxcow_image *img;
    oxcow_error *err = NULL;
    unsigned char buf[512];
    int rc;
    scratch_dir();
    path = scratch_path("refuse.qcow2");
    REQUIRE_OK(create_default(path, MiB));

    img = open_image(path, OXCOW_OPEN_KEEP_READ_ONLY);
    REQUIRE(img != NULL);
    rc = oxcow_reopen(img, OXCOW_OPEN_RDWR, &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_reopen(img, OXCOW_OPEN_RDWR | OXCOW_OPEN_KEEP_READ_ONLY, &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 0), 0);
    CHECK_EQ(oxcow_close(img), 0);

    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    err = NULL;
    rc = oxcow_reopen(img, OXCOW_OPEN_RDWR | OXCOW_OPEN_DIRECT, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_reopen(img, OXCOW_OPEN_RDWR | OXCOW_OPEN_FORCE_SHARE, &err);
    CHECK_ERR(rc, err, EINVAL);
    /* Still read-write. */
    memset(buf, 1, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 0), 0);
    CHECK_EQ(oxcow_close(img), 0);

    /* A renamed-over path is refused with -ESTALE. */
    {
        const char *other = scratch_path("other.qcow2");
        const char *moved = scratch_path("moved.qcow2");
        REQUIRE_OK(create_default(other, MiB));
        img = open_image(path, 0);
        REQUIRE(img != NULL);
        REQUIRE(rename(path, moved) == 0);
        REQUIRE(rename(other, path) == 0);
        err = NULL;
        rc = oxcow_reopen(img, OXCOW_OPEN_RDWR, &err);
        CHECK_ERR(rc, err, ESTALE);
        CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 0), 0);
        CHECK(all_bytes(buf, sizeof buf, 1));
        CHECK_EQ(oxcow_close(img), 0);
    }
    CHECK_EQ(oxcow_reopen(NULL, 0, NULL), -EINVAL);
}

struct writer {
    oxcow_image *img;
    unsigned id;
    int acked[256];
    volatile int *stop;
};

static void *writer_main(void *arg) {
    struct writer *w = arg;
    unsigned char buf[1024];
    unsigned i = 0;
    while (i < 256 && !*w->stop) {
        int rc;
        memset(buf, (int)(w->id * 16 + (i & 15) + 1), sizeof buf);
        rc = oxcow_pwrite(w->img, buf, sizeof buf, ((uint64_t)w->id * 256 + i) * 1024);
        if (rc == 0) {
            w->acked[i] = 1;
            i++;
        } else if (rc != -EROFS) {
            w->acked[i] = -1;
            i++;
        }
    }
    return NULL;
}

static void test_reopen_races_writers(void) {
    const char *path;
    oxcow_image *img;
    struct writer w[3];
    pthread_t th[3];
    volatile int stop = 0;
    unsigned t, i, k;
    scratch_dir();
    path = scratch_path("race.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    for (t = 0; t < 3; t++) {
        memset(&w[t], 0, sizeof w[t]);
        w[t].img = img;
        w[t].id = t;
        w[t].stop = &stop;
        REQUIRE(pthread_create(&th[t], NULL, writer_main, &w[t]) == 0);
    }
    for (k = 0; k < 10; k++) {
        CHECK_EQ(oxcow_reopen(img, 0, NULL), 0);
        CHECK_EQ(oxcow_reopen(img, OXCOW_OPEN_RDWR, NULL), 0);
    }
    for (t = 0; t < 3; t++)
        pthread_join(th[t], NULL);
    stop = 1;
    CHECK_EQ(oxcow_reopen(img, 0, NULL), 0);
    CHECK_EQ(qemu_check(path), 0);
    for (t = 0; t < 3; t++) {
        for (i = 0; i < 256; i++) {
            unsigned char buf[1024];
            CHECK(w[t].acked[i] >= 0);
            if (w[t].acked[i] == 1) {
                CHECK_EQ(oxcow_pread(img, buf, sizeof buf, ((uint64_t)t * 256 + i) * 1024), 0);
                CHECK(all_bytes(buf, sizeof buf, (unsigned char)(t * 16 + (i & 15) + 1)));
            }
        }
    }
    CHECK_EQ(oxcow_close(img), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"rw_ro_rw", test_rw_ro_rw},
        {"refusals_change_nothing", test_refusals_change_nothing},
        {"races_writers", test_reopen_races_writers},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
