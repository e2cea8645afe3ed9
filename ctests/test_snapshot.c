/*
 * Internal snapshots through the C ABI: create/list/apply/delete on a live handle checked
 * against qemu-img (check clean, `qemu-img snapshot -l` sees oxcow's snapshots, qemu-img's
 * snapshots are applied by oxcow), the snapshot view open option (version-2 open options,
 * and version-1-sized structs still accepted), and the errors.
 */
#include "common.h"

#include <pthread.h>

#define MiB (1ull << 20)
#define KiB (1ull << 10)

static void test_create_list_apply_delete(void) {
    const char *path;
    oxcow_image *img;
    oxcow_snapshot_info info[4];
    size_t count = 99;
    unsigned char a[64 * 1024], b[64 * 1024], got[64 * 1024];
    char out[4096];
    scratch_dir();
    path = scratch_path("snap.qcow2");
    REQUIRE_OK(create_default(path, 16 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    fill_pattern(a, sizeof a, 0, 1);
    fill_pattern(b, sizeof b, 0, 2);
    REQUIRE_OK(oxcow_pwrite(img, a, sizeof a, MiB));
    REQUIRE_OK(oxcow_snapshot_list(img, NULL, 0, &count));
    CHECK_EQ(count, 0);
    REQUIRE_OK(oxcow_snapshot_create(img, "first", NULL));
    REQUIRE_OK(oxcow_pwrite(img, b, sizeof b, MiB));
    REQUIRE_OK(oxcow_snapshot_create(img, "second", NULL));
    REQUIRE_OK(oxcow_snapshot_list(img, info, 1, &count));
    CHECK_EQ(count, 2);
    CHECK(strcmp(info[0].id, "1") == 0 && strcmp(info[0].name, "first") == 0);
    REQUIRE_OK(oxcow_snapshot_list(img, info, 4, &count));
    CHECK(strcmp(info[1].id, "2") == 0 && strcmp(info[1].name, "second") == 0);
    CHECK_EQ(info[1].disk_size, 16 * MiB);
    CHECK(info[1].flags & OXCOW_SNAPSHOT_HAS_DISK_SIZE);
    CHECK(info[1].date_sec > 1600000000u);
    REQUIRE_OK(oxcow_snapshot_apply(img, "first", NULL));
    REQUIRE_OK(oxcow_pread(img, got, sizeof got, MiB));
    CHECK(memcmp(got, a, sizeof a) == 0);
    REQUIRE_OK(oxcow_snapshot_delete(img, "1", NULL));
    REQUIRE_OK(oxcow_snapshot_list(img, info, 4, &count));
    CHECK_EQ(count, 1);
    REQUIRE_OK(oxcow_close(img));
    CHECK_EQ(qemu_check(path), 0);
    CHECK_EQ(capture(out, sizeof out, "qemu-img snapshot -l '%s'", path), 0);
    CHECK(strstr(out, "second") != NULL && strstr(out, "first") == NULL);
    /* qemu-img applies oxcow's snapshot: the data written before it comes back. */
    CHECK_EQ(run("qemu-img snapshot -a second '%s'", path), 0);
    CHECK_EQ(qemu_check(path), 0);
}

static void test_qemu_snapshots_and_view(void) {
    const char *path;
    oxcow_image *img = NULL;
    oxcow_open_options o;
    oxcow_error *err = NULL;
    unsigned char got[4096];
    int rc;
    scratch_dir();
    path = scratch_path("qemu.qcow2");
    REQUIRE(run("qemu-img create -q -f qcow2 '%s' 4M && qemu-io -c 'write -P 0x5a 0 64k' '%s' "
                ">/dev/null && qemu-img snapshot -c old '%s' && "
                "qemu-io -c 'write -P 0x6b 0 64k' '%s' >/dev/null",
                path, path, path, path) == 0);
    oxcow_open_options_init(&o);
    CHECK_EQ(o.struct_size, sizeof o);
    o.snapshot = "old";
    REQUIRE_OK(oxcow_open(path, 0, &o, &img, NULL));
    REQUIRE_OK(oxcow_pread(img, got, sizeof got, 0));
    CHECK(all_bytes(got, sizeof got, 0x5a));
    rc = oxcow_pwrite(img, got, sizeof got, 0);
    CHECK_EQ(rc, -EROFS);
    CHECK_EQ(oxcow_close(img), 0);
    /* Writable snapshot views and unknown snapshots are refused. */
    img = NULL;
    rc = oxcow_open(path, OXCOW_OPEN_RDWR, &o, &img, &err);
    CHECK_ERR(rc, err, EINVAL);
    o.snapshot = "missing";
    err = NULL;
    rc = oxcow_open(path, 0, &o, &img, &err);
    CHECK_ERR(rc, err, ENOENT);
    CHECK(img == NULL);
    /* A caller built against version 1 of the struct (no snapshot field) still opens. */
    o.snapshot = "old";
    o.struct_size = 16;
    REQUIRE_OK(oxcow_open(path, OXCOW_OPEN_RDWR, &o, &img, NULL));
    REQUIRE_OK(oxcow_pread(img, got, sizeof got, 0));
    CHECK(all_bytes(got, sizeof got, 0x6b));
    /* qemu-img's snapshot applied by oxcow. */
    REQUIRE_OK(oxcow_snapshot_apply(img, "old", NULL));
    REQUIRE_OK(oxcow_pread(img, got, sizeof got, 0));
    CHECK(all_bytes(got, sizeof got, 0x5a));
    REQUIRE_OK(oxcow_snapshot_delete(img, "old", NULL));
    REQUIRE_OK(oxcow_close(img));
    CHECK_EQ(qemu_check(path), 0);
}

static void test_errors(void) {
    const char *path;
    oxcow_image *img;
    oxcow_error *err = NULL;
    oxcow_snapshot_info info[1];
    size_t count = 0;
    int rc;
    scratch_dir();
    path = scratch_path("err.qcow2");
    REQUIRE_OK(create_default(path, 4 * MiB));
    CHECK_EQ(oxcow_snapshot_create(NULL, "x", NULL), -EINVAL);
    CHECK_EQ(oxcow_snapshot_list(NULL, info, 1, &count), -EINVAL);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    rc = oxcow_snapshot_create(img, NULL, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_snapshot_create(img, "", &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_snapshot_apply(img, "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    err = NULL;
    rc = oxcow_snapshot_delete(img, "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    CHECK_EQ(oxcow_snapshot_list(img, NULL, 1, &count), -EINVAL);
    CHECK_EQ(oxcow_snapshot_list(img, info, 1, NULL), -EINVAL);
    REQUIRE_OK(oxcow_snapshot_create(img, "dup", NULL));
    REQUIRE_OK(oxcow_snapshot_create(img, "dup", NULL)); /* QEMU allows duplicate names */
    REQUIRE_OK(oxcow_snapshot_list(img, info, 1, &count));
    CHECK_EQ(count, 2);
    REQUIRE_OK(oxcow_close(img));
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    err = NULL;
    rc = oxcow_snapshot_create(img, "ro", &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_snapshot_delete(img, "dup", &err);
    CHECK_ERR(rc, err, EROFS);
    REQUIRE_OK(oxcow_close(img));
    CHECK_EQ(qemu_check(path), 0);
}

struct writer {
    oxcow_image *img;
    int id;
    int rc;
};

/* Writes its own 1 MiB region 50 times with a pattern that ends as (id + 1). */
static void *writer_main(void *arg) {
    struct writer *w = arg;
    unsigned char buf[64 * 1024];
    int round, i;
    for (round = 0; round < 50 && w->rc == 0; round++) {
        memset(buf, round == 49 ? w->id + 1 : round + 100, sizeof buf);
        for (i = 0; i < 16 && w->rc == 0; i++)
            w->rc = oxcow_pwrite(w->img, buf, sizeof buf, (uint64_t)w->id * MiB + i * sizeof buf);
    }
    return NULL;
}

static void test_live_writers(void) {
    const char *path;
    oxcow_image *img;
    pthread_t t[4];
    struct writer w[4];
    unsigned char got[64 * 1024];
    size_t count = 0;
    int i, j;
    scratch_dir();
    path = scratch_path("live.qcow2");
    REQUIRE_OK(create_default(path, 4 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    for (i = 0; i < 4; i++) {
        w[i].img = img;
        w[i].id = i;
        w[i].rc = 0;
        REQUIRE(pthread_create(&t[i], NULL, writer_main, &w[i]) == 0);
    }
    for (i = 0; i < 3; i++)
        CHECK_EQ(oxcow_snapshot_create(img, "live", NULL), 0);
    CHECK_EQ(oxcow_snapshot_delete(img, "1", NULL), 0);
    for (i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK_EQ(w[i].rc, 0);
    }
    for (i = 0; i < 4; i++)
        for (j = 0; j < 16; j++) {
            REQUIRE_OK(oxcow_pread(img, got, sizeof got, (uint64_t)i * MiB + j * sizeof got));
            CHECK(all_bytes(got, sizeof got, (unsigned char)(i + 1)));
        }
    REQUIRE_OK(oxcow_snapshot_list(img, NULL, 0, &count));
    CHECK_EQ(count, 2);
    REQUIRE_OK(oxcow_close(img));
    CHECK_EQ(qemu_check(path), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"create_list_apply_delete", test_create_list_apply_delete},
        {"qemu_snapshots_and_view", test_qemu_snapshots_and_view},
        {"errors", test_errors},
        {"live_writers", test_live_writers},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
