/*
 * Persistent dirty bitmaps through the C ABI: add/list/remove, clear/enable/disable/merge,
 * dirty extents after writes, the errors (-EEXIST, -ENOENT, -EINVAL, -EROFS, -EBUSY), and the
 * incremental-backup example, with qemu-img / qemu-io / qemu-nbd as the oracle.
 */
#include "common.h"

#include <pthread.h>

/* The example's backup(), to run it while other threads write. */
#define INCREMENTAL_BACKUP_NO_MAIN
#include "../examples/incremental_backup.c"

#define KiB (1ull << 10)
#define MiB (1ull << 20)

/* The layout of oxcow_bitmap_info is ABI (src/capi/bitmap.rs pins the same values). */
typedef char bitmap_info_size[sizeof(oxcow_bitmap_info) == 1040 ? 1 : -1];
typedef char bitmap_info_gran[offsetof(oxcow_bitmap_info, granularity) == 1024 ? 1 : -1];

/* "start length\n" lines of the dirty ranges of `name` in [0, size), contiguous ones merged,
 * as oxcow_bitmap_status reports them. 0 or the failing return code. */
static int oxcow_dirty(oxcow_image *img, const char *name, uint64_t size, char *out, size_t cap) {
    uint64_t off = 0, run_start = 0, run_len = 0;
    size_t used = 0;
    out[0] = '\0';
    while (off < size) {
        oxcow_extent e;
        int rc = oxcow_bitmap_status(img, name, off, size - off, &e);
        if (rc < 0)
            return rc;
        if (e.offset != off || e.length == 0 || e.length > size - off || e.host_offset != 0)
            return -EPROTO;
        if (e.flags & OXCOW_EXTENT_DIRTY) {
            if (run_len > 0 && run_start + run_len == off) {
                run_len += e.length;
            } else {
                if (run_len > 0)
                    used += (size_t)snprintf(out + used, cap - used, "%" PRIu64 " %" PRIu64 "\n",
                                             run_start, run_len);
                run_start = off;
                run_len = e.length;
            }
        }
        off += e.length;
    }
    if (run_len > 0)
        snprintf(out + used, cap - used, "%" PRIu64 " %" PRIu64 "\n", run_start, run_len);
    return 0;
}

/* The dirty ranges of bitmap `name` as QEMU reports them: qemu-nbd exports the bitmap and
 * `qemu-img map` reads it through x-dirty-bitmap, where dirty ranges show as "data": false.
 * Same format as oxcow_dirty(). Exit status of the pipeline. */
static int qemu_dirty(const char *path, const char *name, char *out, size_t cap) {
    /* Own buffers: scratch_path() rotates through a few, which may hold the caller's path. */
    char sock[8192], pid[8192];
    snprintf(sock, sizeof sock, "%s/nbd.sock", g_dir);
    snprintf(pid, sizeof pid, "%s/nbd.pid", g_dir);
    unlink(sock);
    /* qemu-nbd exits after its one client; wait for it so that it releases the image lock. */
    return capture(out, cap,
                   "qemu-nbd -r -f qcow2 -B '%s' -k '%s' --pid-file='%s' --fork '%s' && "
                   "qemu-img map --output=json --image-opts "
                   "driver=nbd,server.type=unix,server.path='%s',"
                   "x-dirty-bitmap=qemu:dirty-bitmap:'%s' | "
                   "sed -n 's/.*\"start\": \\([0-9]*\\), \"length\": \\([0-9]*\\),"
                   ".*\"data\": false.*/\\1 \\2/p' | "
                   "awk 'BEGIN{s=-1} { if (s >= 0 && s + l == $1) l += $2; "
                   "else { if (s >= 0) print s, l; s = $1; l = $2 } } "
                   "END { if (s >= 0) print s, l }'; st=$?; "
                   "while kill -0 $(cat '%s') 2>/dev/null; do sleep 0.02; done; exit $st",
                   name, sock, pid, path, sock, name, pid);
}

/* The "bitmaps" list of `qemu-img info --output=json`, whitespace removed ("" without one). */
static int qemu_bitmaps(const char *path, char *out, size_t cap) {
    return capture(out, cap,
                   "qemu-img info -U --output=json '%s' | tr -d ' \\n' | "
                   "sed -n 's/.*\"bitmaps\":\\(\\[.*\\]\\),\"refcount-bits.*/\\1/p'",
                   path);
}

/* Checks that QEMU and oxcow report the same dirty ranges for `name`, equal to `want`. */
static void check_dirty(const char *path, const char *name, const char *want) {
    char q[8192], o[8192];
    oxcow_image *img = open_image(path, 0);
    oxcow_info info;
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    REQUIRE_OK(oxcow_get_info(img, &info));
    CHECK_EQ(oxcow_dirty(img, name, info.virtual_size, o, sizeof o), 0);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_dirty(path, name, q, sizeof q), 0);
    if (strcmp(o, want) != 0 || strcmp(q, want) != 0) {
        fprintf(stderr, "dirty ranges of %s differ:\nwant:\n%soxcow:\n%sqemu:\n%s", name, want, o,
                q);
        g_failures++;
    }
}

/* Finds bitmap `name` in a list; NULL when absent. */
static const oxcow_bitmap_info *find(const oxcow_bitmap_info *l, size_t n, const char *name) {
    size_t i;
    for (i = 0; i < n; i++)
        if (strcmp(l[i].name, name) == 0)
            return &l[i];
    return NULL;
}

static void test_add_list_remove(void) {
    const char *path;
    oxcow_image *img;
    oxcow_bitmap_info l[4];
    size_t n = 99;
    char j[4096];
    int rc;
    scratch_dir();
    path = scratch_path("list.qcow2");
    REQUIRE_OK(create_default(path, 64 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    rc = oxcow_bitmap_add(img, "a", 0, 0, NULL);
    REQUIRE_OK(rc);
    REQUIRE_OK(oxcow_bitmap_add(img, "b", 4096, OXCOW_BITMAP_DISABLED, NULL));
    /* Count only, then a short array (the total still comes back), then a big one. */
    REQUIRE_OK(oxcow_bitmap_list(img, NULL, 0, &n));
    CHECK_EQ(n, 2);
    memset(l, 0x55, sizeof l);
    n = 0;
    REQUIRE_OK(oxcow_bitmap_list(img, l, 1, &n));
    CHECK_EQ(n, 2);
    CHECK(strcmp(l[0].name, "a") == 0);
    CHECK_EQ((unsigned char)l[1].name[0], 0x55); /* beyond cap: untouched */
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK_EQ(n, 2);
    CHECK(find(l, n, "a") != NULL && find(l, n, "b") != NULL);
    if (find(l, n, "a") && find(l, n, "b")) {
        CHECK_EQ(find(l, n, "a")->granularity, 65536);
        CHECK_EQ(find(l, n, "a")->flags, OXCOW_BITMAP_ENABLED | OXCOW_BITMAP_AUTO);
        CHECK_EQ(find(l, n, "b")->granularity, 4096);
        CHECK_EQ(find(l, n, "b")->flags, 0);
        CHECK_EQ(find(l, n, "a")->reserved, 0);
    }
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
    CHECK(strcmp(j, "[{\"flags\":[\"auto\"],\"name\":\"a\",\"granularity\":65536},"
                    "{\"flags\":[],\"name\":\"b\",\"granularity\":4096}]") == 0);
    CHECK_EQ(qemu_check(path), 0);

    /* Read-only handles list too; qemu-img's bitmaps are seen; removal frees the entry. */
    REQUIRE(run("qemu-img bitmap --add -g 512 '%s' q 1>&2", path) == 0);
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK_EQ(n, 3);
    CHECK(find(l, n, "q") != NULL && find(l, n, "q")->granularity == 512);
    CHECK_EQ(oxcow_close(img), 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    REQUIRE_OK(oxcow_bitmap_remove(img, "a", NULL));
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK_EQ(n, 2);
    CHECK(find(l, n, "a") == NULL);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
    CHECK(strcmp(j, "[{\"flags\":[],\"name\":\"b\",\"granularity\":4096},"
                    "{\"flags\":[\"auto\"],\"name\":\"q\",\"granularity\":512}]") == 0);
    CHECK_EQ(qemu_check(path), 0);
    /* The default granularity follows qemu-img: the cluster size clamped to 4k..64k. */
    REQUIRE(run("qemu-img create -q -f qcow2 -o cluster_size=512 '%s' 1M", path) == 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    REQUIRE_OK(oxcow_bitmap_add(img, "small", 0, 0, NULL));
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK_EQ(n, 1);
    CHECK_EQ(l[0].granularity, 4096);
    CHECK_EQ(oxcow_close(img), 0);
}

/* Writes through oxcow are tracked at granule resolution; disabled bitmaps stay empty. */
static void test_tracking_matches_qemu(void) {
    const char *path;
    oxcow_image *img;
    unsigned char buf[70 * KiB];
    int rc;
    scratch_dir();
    path = scratch_path("track.qcow2");
    REQUIRE(run("qemu-img create -q -f qcow2 '%s' 32M && qemu-io -c 'write -P 1 20M 1M' '%s' "
                ">/dev/null && qemu-img bitmap --add '%s' b && "
                "qemu-img bitmap --add --disable -g 4k '%s' d",
                path, path, path, path) == 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    fill_pattern(buf, sizeof buf, 0, 5);
    rc = oxcow_bitmap_add(img, "small", 4096, 0, NULL);
    REQUIRE_OK(rc);
    REQUIRE_OK(oxcow_pwrite(img, buf, 1, 3));                   /* sub-granule */
    REQUIRE_OK(oxcow_pwrite(img, buf, sizeof buf, 1 * MiB));    /* two granules */
    REQUIRE_OK(oxcow_write_zeroes(img, 8 * MiB, 64 * KiB, 0));  /* zeroes */
    REQUIRE_OK(oxcow_discard(img, 20 * MiB, 128 * KiB));         /* discard */
    REQUIRE_OK(oxcow_write_compressed(img, buf, 64 * KiB, 16 * MiB)); /* compressed */
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
    check_dirty(path, "b",
                "0 65536\n1048576 131072\n8388608 65536\n16777216 65536\n20971520 131072\n");
    check_dirty(path, "small",
                "0 4096\n1048576 73728\n8388608 65536\n16777216 65536\n20971520 131072\n");
    check_dirty(path, "d", "");
    {
        char j[4096];
        CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
        CHECK(strcmp(j, "[{\"flags\":[\"auto\"],\"name\":\"b\",\"granularity\":65536},"
                        "{\"flags\":[],\"name\":\"d\",\"granularity\":4096},"
                        "{\"flags\":[\"auto\"],\"name\":\"small\",\"granularity\":4096}]") == 0);
    }
    /* The reverse: QEMU writes, oxcow reports QEMU's dirty set. */
    REQUIRE(run("qemu-io -c 'write 30M 512' -c 'write -z 4M 200k' '%s' >/dev/null", path) == 0);
    check_dirty(path, "b",
                "0 65536\n1048576 131072\n4194304 262144\n8388608 65536\n16777216 65536\n"
                "20971520 131072\n31457280 65536\n");
}

/* clear, disable, enable and merge, each checked against QEMU after close. */
static void test_clear_enable_disable_merge(void) {
    const char *path;
    oxcow_image *img;
    unsigned char buf[4096];
    oxcow_bitmap_info l[4];
    size_t n;
    int rc;
    scratch_dir();
    path = scratch_path("ops.qcow2");
    REQUIRE_OK(create_default(path, 16 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    memset(buf, 7, sizeof buf);
    rc = oxcow_bitmap_add(img, "a", 65536, 0, NULL);
    REQUIRE_OK(rc);
    REQUIRE_OK(oxcow_bitmap_add(img, "m", 1 * MiB, OXCOW_BITMAP_DISABLED, NULL));
    REQUIRE_OK(oxcow_pwrite(img, buf, sizeof buf, 0));
    REQUIRE_OK(oxcow_bitmap_disable(img, "a", NULL));
    REQUIRE_OK(oxcow_pwrite(img, buf, sizeof buf, 2 * MiB)); /* not recorded */
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK(find(l, n, "a") != NULL && find(l, n, "a")->flags == 0);
    REQUIRE_OK(oxcow_bitmap_enable(img, "a", NULL));
    REQUIRE_OK(oxcow_pwrite(img, buf, sizeof buf, 4 * MiB));
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK(find(l, n, "a") != NULL &&
          find(l, n, "a")->flags == (OXCOW_BITMAP_ENABLED | OXCOW_BITMAP_AUTO));
    /* Merging into a coarser bitmap sets the covering granules. */
    REQUIRE_OK(oxcow_bitmap_merge(img, "m", "a", NULL));
    CHECK_EQ(oxcow_close(img), 0);
    check_dirty(path, "a", "0 65536\n4194304 65536\n");
    check_dirty(path, "m", "0 1048576\n4194304 1048576\n");

    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    REQUIRE_OK(oxcow_bitmap_clear(img, "a", NULL));
    REQUIRE_OK(oxcow_bitmap_disable(img, "a", NULL));
    CHECK_EQ(oxcow_close(img), 0);
    check_dirty(path, "a", "");
    check_dirty(path, "m", "0 1048576\n4194304 1048576\n");
    {
        char j[4096];
        CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
        CHECK(strcmp(j, "[{\"flags\":[],\"name\":\"a\",\"granularity\":65536},"
                        "{\"flags\":[],\"name\":\"m\",\"granularity\":1048576}]") == 0);
    }
    CHECK_EQ(qemu_check(path), 0);
    /* qemu-img merges oxcow's bitmaps and the result reads back the same. */
    REQUIRE(run("qemu-img bitmap --add '%s' q && qemu-img bitmap --merge m '%s' q", path, path) ==
            0);
    check_dirty(path, "q", "0 1048576\n4194304 1048576\n");
}

static void test_errors(void) {
    const char *path;
    oxcow_image *img;
    oxcow_error *err = NULL;
    oxcow_extent e, before;
    size_t n;
    int rc;
    scratch_dir();
    path = scratch_path("errors.qcow2");
    REQUIRE_OK(create_default(path, 1 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    rc = oxcow_bitmap_add(img, "a", 0, 0, NULL);
    REQUIRE_OK(rc);

    rc = oxcow_bitmap_add(img, "a", 0, 0, &err);
    CHECK_ERR(rc, err, EEXIST);
    err = NULL;
    rc = oxcow_bitmap_remove(img, "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    err = NULL;
    rc = oxcow_bitmap_clear(img, "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    err = NULL;
    rc = oxcow_bitmap_enable(img, "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    err = NULL;
    rc = oxcow_bitmap_disable(img, "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    err = NULL;
    rc = oxcow_bitmap_merge(img, "a", "nope", &err);
    CHECK_ERR(rc, err, ENOENT);
    err = NULL;
    rc = oxcow_bitmap_merge(img, "nope", "a", &err);
    CHECK_ERR(rc, err, ENOENT);
    CHECK_EQ(oxcow_bitmap_status(img, "nope", 0, 4096, &e), -ENOENT);

    /* -EINVAL: names, granularities, flags, pointers, ranges. Nothing is written. */
    err = NULL;
    rc = oxcow_bitmap_add(img, NULL, 0, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_add(img, "bad\xff", 0, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_add(img, "", 0, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    {
        char long_name[1100];
        memset(long_name, 'x', sizeof long_name - 1);
        long_name[sizeof long_name - 1] = '\0';
        err = NULL;
        rc = oxcow_bitmap_add(img, long_name, 0, 0, &err);
        CHECK_ERR(rc, err, EINVAL);
    }
    err = NULL;
    rc = oxcow_bitmap_add(img, "g", 1000, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_add(img, "g", 256, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_add(img, "g", 4ull << 30, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_add(img, "g", 0, OXCOW_BITMAP_ENABLED, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_add(NULL, "g", 0, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_merge(img, "a", NULL, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_bitmap_remove(img, "\xc3", &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK_EQ(oxcow_bitmap_list(img, NULL, 0, NULL), -EINVAL);
    CHECK_EQ(oxcow_bitmap_list(img, NULL, 1, &n), -EINVAL);
    CHECK_EQ(oxcow_bitmap_list(NULL, NULL, 0, &n), -EINVAL);
    memset(&before, 0x5a, sizeof before);
    e = before;
    CHECK_EQ(oxcow_bitmap_status(img, "a", 0, 0, &e), -EINVAL);
    CHECK_EQ(oxcow_bitmap_status(img, "a", 0, 2 * MiB, &e), -EINVAL);
    CHECK_EQ(oxcow_bitmap_status(img, "a", 1 * MiB, 1, &e), -EINVAL);
    CHECK_EQ(oxcow_bitmap_status(img, NULL, 0, 1, &e), -EINVAL);
    CHECK_EQ(oxcow_bitmap_status(img, "a", 0, 1, NULL), -EINVAL);
    CHECK(memcmp(&e, &before, sizeof e) == 0);
    n = 0;
    REQUIRE_OK(oxcow_bitmap_list(img, NULL, 0, &n));
    CHECK_EQ(n, 1);
    /* A clean walk: one extent over everything, not dirty. */
    REQUIRE_OK(oxcow_bitmap_status(img, "a", 0, 1 * MiB, &e));
    CHECK_EQ(e.offset, 0);
    CHECK_EQ(e.length, 1 * MiB);
    CHECK_EQ(e.flags, 0);
    CHECK_EQ(oxcow_close(img), 0);

    /* -EROFS on a read-only handle for every change; listing and status still work. */
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    err = NULL;
    rc = oxcow_bitmap_add(img, "b", 0, 0, &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_bitmap_remove(img, "a", &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_bitmap_clear(img, "a", &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_bitmap_enable(img, "a", &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_bitmap_disable(img, "a", &err);
    CHECK_ERR(rc, err, EROFS);
    err = NULL;
    rc = oxcow_bitmap_merge(img, "a", "a", &err);
    CHECK_ERR(rc, err, EROFS);
    REQUIRE_OK(oxcow_bitmap_list(img, NULL, 0, &n));
    CHECK_EQ(n, 1);
    REQUIRE_OK(oxcow_bitmap_status(img, "a", 0, 1 * MiB, &e));
    CHECK_EQ(oxcow_close(img), 0);
    {
        char j[4096];
        CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
        CHECK(strcmp(j, "[{\"flags\":[\"auto\"],\"name\":\"a\",\"granularity\":65536}]") == 0);
    }
}

/* A bitmap left in use by a killed QEMU is inconsistent: -EBUSY for everything but remove. */
static void test_inconsistent_is_busy(void) {
    const char *path;
    oxcow_image *img;
    oxcow_error *err = NULL;
    oxcow_bitmap_info l[2];
    oxcow_extent e;
    size_t n = 0;
    char j[4096];
    int rc;
    scratch_dir();
    path = scratch_path("busy.qcow2");
    REQUIRE(run("qemu-img create -q -f qcow2 '%s' 4M && qemu-img bitmap --add '%s' b && "
                "qemu-img bitmap --add '%s' ok",
                path, path, path) == 0);
    /* qemu-io marks the bitmaps in use at its read-write open; SIGKILL leaves them so (after a
     * flushed write, so that QEMU leaves no leaks). */
    REQUIRE(run("qemu-io -c 'write 0 4k' -c flush -c 'sleep 60000' '%s' >/dev/null & pid=$!; "
                "sleep 1; kill -9 $pid; wait $pid; true",
                path) == 0);
    CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
    CHECK(strstr(j, "in-use") != NULL);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    rc = oxcow_bitmap_list(img, l, 2, &n);
    REQUIRE_OK(rc);
    CHECK_EQ(n, 2);
    CHECK(find(l, n, "b") != NULL &&
          find(l, n, "b")->flags == (OXCOW_BITMAP_INCONSISTENT | OXCOW_BITMAP_AUTO));
    rc = oxcow_bitmap_clear(img, "b", &err);
    CHECK_ERR(rc, err, EBUSY);
    err = NULL;
    rc = oxcow_bitmap_enable(img, "b", &err);
    CHECK_ERR(rc, err, EBUSY);
    err = NULL;
    rc = oxcow_bitmap_disable(img, "b", &err);
    CHECK_ERR(rc, err, EBUSY);
    err = NULL;
    rc = oxcow_bitmap_merge(img, "ok", "b", &err);
    CHECK_ERR(rc, err, EBUSY);
    err = NULL;
    rc = oxcow_bitmap_merge(img, "b", "ok", &err);
    CHECK_ERR(rc, err, EBUSY);
    CHECK_EQ(oxcow_bitmap_status(img, "b", 0, 4096, &e), -EBUSY);
    REQUIRE_OK(oxcow_bitmap_remove(img, "b", NULL));
    REQUIRE_OK(oxcow_bitmap_remove(img, "ok", NULL));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
    CHECK(strcmp(j, "") == 0);
    CHECK_EQ(qemu_check(path), 0);
}

/* The incremental-backup example keeps a raw copy equal to the image, copying only the dirty
 * ranges (a byte planted in a clean range of the copy survives). */
static void test_incremental_backup(void) {
    const char *path, *copy;
    oxcow_image *img;
    unsigned char buf[200 * KiB], planted = 0xee, back = 0;
    int rc, round;
    scratch_dir();
    path = scratch_path("vm.qcow2");
    copy = scratch_path("backup.raw");
    REQUIRE(run("qemu-img create -q -f qcow2 '%s' 32M && "
                "qemu-io -c 'write -P 3 0 4M' -c 'write -P 4 10M 1M' '%s' >/dev/null",
                path, path) == 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    rc = oxcow_bitmap_add(img, "backup", 0, 0, NULL);
    CHECK_EQ(oxcow_close(img), 0);
    REQUIRE_OK(rc);
    /* The full backup, taken while the bitmap is empty. */
    REQUIRE(run("qemu-img convert -O raw '%s' '%s'", path, copy) == 0);
    REQUIRE_OK(write_file_at(copy, &planted, 1, 30 * MiB));
    for (round = 0; round < 2; round++) {
        img = open_image(path, OXCOW_OPEN_RDWR);
        REQUIRE(img != NULL);
        fill_pattern(buf, sizeof buf, 0, 11 + round);
        REQUIRE_OK(oxcow_pwrite(img, buf, sizeof buf, 1 * MiB + 1000 * (uint64_t)round));
        REQUIRE_OK(oxcow_pwrite(img, buf, 10, 20 * MiB + 777));
        REQUIRE_OK(oxcow_write_zeroes(img, 10 * MiB, 64 * KiB, OXCOW_ZERO_MAY_UNMAP));
        REQUIRE_OK(oxcow_discard(img, 2 * MiB, 128 * KiB));
        CHECK_EQ(oxcow_close(img), 0);
        REQUIRE(run("qemu-io -c 'write -P %d 5M 3k' '%s' >/dev/null", 40 + round, path) == 0);
        /* The planted byte is the only difference outside the dirty ranges. */
        CHECK_EQ(run("'%s' '%s' backup '%s'", BACKUP_EXAMPLE, path, copy), 0);
        REQUIRE_OK(read_file_at(copy, &back, 1, 30 * MiB));
        CHECK_EQ(back, planted);
        back = 0;
        REQUIRE_OK(write_file_at(copy, &back, 1, 30 * MiB));
        CHECK_EQ(qemu_compare_raw(copy, path), 0);
        REQUIRE_OK(write_file_at(copy, &planted, 1, 30 * MiB));
        /* The bitmap restarted clean, recording, and the helper bitmap is gone. */
        check_dirty(path, "backup", "");
        {
            char j[4096];
            CHECK_EQ(qemu_bitmaps(path, j, sizeof j), 0);
            CHECK(strcmp(j, "[{\"flags\":[\"auto\"],\"name\":\"backup\","
                            "\"granularity\":65536}]") == 0);
        }
        CHECK_EQ(qemu_check(path), 0);
    }
}

#define WRITERS 4
#define WRITES_PER_THREAD 64

struct writer_arg {
    oxcow_image *img;
    int index;
    int failed;
};

/* Writes 4 KiB at the start of every other 64 KiB granule of its own quarter of the disk. */
static void *bitmap_writer(void *p) {
    struct writer_arg *w = (struct writer_arg *)p;
    unsigned char buf[4096];
    int i;
    fill_pattern(buf, sizeof buf, 0, (unsigned)w->index);
    for (i = 0; i < WRITES_PER_THREAD; i++) {
        uint64_t off = (uint64_t)w->index * 16 * MiB + (uint64_t)i * 128 * KiB;
        if (oxcow_pwrite(w->img, buf, sizeof buf, off) != 0)
            w->failed = 1;
    }
    return NULL;
}

/* Control calls on a live handle while other threads write: the always-enabled bitmap ends
 * with exactly the granules written, as QEMU reads it back. */
static void test_control_while_writing(void) {
    const char *path;
    oxcow_image *img;
    pthread_t th[WRITERS];
    struct writer_arg w[WRITERS];
    static char want[WRITERS * WRITES_PER_THREAD * 32];
    size_t used = 0;
    int t, i;
    scratch_dir();
    path = scratch_path("threads.qcow2");
    REQUIRE_OK(create_default(path, 64 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    REQUIRE_OK(oxcow_bitmap_add(img, "all", 4096, 0, NULL));
    REQUIRE_OK(oxcow_bitmap_add(img, "frozen", 65536, OXCOW_BITMAP_DISABLED, NULL));
    for (t = 0; t < WRITERS; t++) {
        w[t].img = img;
        w[t].index = t;
        w[t].failed = 0;
        REQUIRE(pthread_create(&th[t], NULL, bitmap_writer, &w[t]) == 0);
    }
    for (i = 0; i < 30; i++) {
        CHECK_EQ(oxcow_bitmap_add(img, "tmp", 0, 0, NULL), 0);
        CHECK_EQ(oxcow_bitmap_merge(img, "frozen", "all", NULL), 0);
        CHECK_EQ(oxcow_bitmap_enable(img, "frozen", NULL), 0);
        CHECK_EQ(oxcow_bitmap_disable(img, "frozen", NULL), 0);
        CHECK_EQ(oxcow_bitmap_clear(img, "frozen", NULL), 0);
        CHECK_EQ(oxcow_bitmap_remove(img, "tmp", NULL), 0);
    }
    for (t = 0; t < WRITERS; t++) {
        pthread_join(th[t], NULL);
        CHECK_EQ(w[t].failed, 0);
    }
    REQUIRE_OK(oxcow_bitmap_merge(img, "frozen", "all", NULL));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
    for (t = 0; t < WRITERS; t++)
        for (i = 0; i < WRITES_PER_THREAD; i++)
            used += (size_t)snprintf(want + used, sizeof want - used, "%llu 4096\n",
                                     (unsigned long long)(t * 16 * MiB + i * 128 * KiB));
    check_dirty(path, "all", want);
    used = 0;
    for (t = 0; t < WRITERS; t++)
        for (i = 0; i < WRITES_PER_THREAD; i++)
            used += (size_t)snprintf(want + used, sizeof want - used, "%llu 65536\n",
                                     (unsigned long long)(t * 16 * MiB + i * 128 * KiB));
    check_dirty(path, "frozen", want);
}

struct busy_writer {
    oxcow_image *img;
    pthread_mutex_t *lock;
    const int *stop;
    unsigned seed;
    int failed;
};

/* Writes 4 KiB blocks all over the first 32 MiB until told to stop. */
static void *busy_writer_main(void *p) {
    struct busy_writer *w = (struct busy_writer *)p;
    unsigned char buf[4096];
    uint64_t x = w->seed * 2654435761u + 1;
    int i, stop = 0;
    for (i = 0; i < 100000 && !stop; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        fill_pattern(buf, sizeof buf, (uint64_t)i, w->seed + (unsigned)i);
        if (oxcow_pwrite(w->img, buf, sizeof buf, (x >> 33) % (32 * MiB / 4096) * 4096) != 0)
            w->failed = 1;
        pthread_mutex_lock(w->lock);
        stop = *w->stop;
        pthread_mutex_unlock(w->lock);
    }
    return NULL;
}

/* The example's backup() while three threads write through the same handle: nothing written
 * during the copy is lost, so one more backup after the writers stop makes the copy equal. */
static void test_backup_while_writing(void) {
    const char *path, *copy;
    oxcow_image *img;
    oxcow_error *err = NULL;
    pthread_t th[3];
    struct busy_writer w[3];
    pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
    oxcow_bitmap_info l[4];
    size_t n = 0;
    int stop = 0, t, fd;
    scratch_dir();
    path = scratch_path("live.qcow2");
    copy = scratch_path("live.raw");
    REQUIRE(run("qemu-img create -q -f qcow2 '%s' 32M && qemu-io -c 'write -P 9 0 8M' '%s' "
                ">/dev/null && qemu-img bitmap --add '%s' backup && qemu-img convert -O raw "
                "'%s' '%s'",
                path, path, path, path, copy) == 0);
    fd = open(copy, O_WRONLY);
    REQUIRE(fd >= 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    for (t = 0; t < 3; t++) {
        w[t].img = img;
        w[t].lock = &lock;
        w[t].stop = &stop;
        w[t].seed = 100 + (unsigned)t;
        w[t].failed = 0;
        REQUIRE(pthread_create(&th[t], NULL, busy_writer_main, &w[t]) == 0);
    }
    for (t = 0; t < 3; t++)
        CHECK_EQ(backup(img, "backup", fd, &err), 0);
    pthread_mutex_lock(&lock);
    stop = 1;
    pthread_mutex_unlock(&lock);
    for (t = 0; t < 3; t++) {
        pthread_join(th[t], NULL);
        CHECK_EQ(w[t].failed, 0);
    }
    CHECK_EQ(backup(img, "backup", fd, &err), 0);
    if (err != NULL) {
        fprintf(stderr, "backup: %s\n", oxcow_error_message(err));
        oxcow_error_free(err);
    }
    REQUIRE_OK(oxcow_bitmap_list(img, l, 4, &n));
    CHECK_EQ(n, 1);
    CHECK_EQ(oxcow_close(img), 0);
    close(fd);
    CHECK_EQ(qemu_compare_raw(copy, path), 0);
    CHECK_EQ(qemu_check(path), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"add_list_remove", test_add_list_remove},
        {"tracking_matches_qemu", test_tracking_matches_qemu},
        {"clear_enable_disable_merge", test_clear_enable_disable_merge},
        {"errors", test_errors},
        {"inconsistent_is_busy", test_inconsistent_is_busy},
        {"incremental_backup", test_incremental_backup},
        {"control_while_writing", test_control_while_writing},
        {"backup_while_writing", test_backup_while_writing},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
