/*
 * Error paths of the C ABI: error objects, errno mapping, NULL pointers, out-of-range
 * requests, read-only handles, unknown flags, short structs, unimplemented calls, version.
 */
#include "common.h"

#define MiB (1ull << 20)
#define CL 65536ull

/* A pointer value the library must never write or free: used to prove `*err`/`*out` are left
 * alone. */
static char sentinel_storage;
#define ERR_SENTINEL ((oxcow_error *)(void *)&sentinel_storage)
#define IMG_SENTINEL ((oxcow_image *)(void *)&sentinel_storage)

static void test_error_object_basics(void) {
    const char *m = oxcow_error_message(NULL);
    CHECK(m != NULL && strcmp(m, "no error") == 0);
    CHECK_EQ(oxcow_error_errno(NULL), 0);
    oxcow_error_free(NULL);
    CHECK_EQ(oxcow_close(NULL), 0);
}

static void test_missing_file(void) {
    oxcow_error *err = NULL;
    oxcow_image *img = IMG_SENTINEL;
    const char *path;
    int rc;
    scratch_dir();
    path = scratch_path("does-not-exist.qcow2");
    rc = oxcow_open(path, 0, NULL, &img, &err);
    CHECK(img == IMG_SENTINEL); /* outputs untouched on failure */
    CHECK(err != NULL && strstr(oxcow_error_message(err), "does-not-exist.qcow2") != NULL);
    CHECK_ERR(rc, err, ENOENT);
    /* Same code without an error object. */
    CHECK_EQ(oxcow_open(path, OXCOW_OPEN_RDWR, NULL, &img, NULL), -ENOENT);
    CHECK(img == IMG_SENTINEL);
}

static void test_not_qcow2(void) {
    static const char text[] = "this is certainly not a qcow2 image\n";
    unsigned char zeros[4096];
    oxcow_error *err = NULL;
    oxcow_image *img = IMG_SENTINEL;
    int rc;
    scratch_dir();
    REQUIRE(write_file_at(scratch_path("text.img"), text, sizeof text, 0) == 0);
    rc = oxcow_open(scratch_path("text.img"), 0, NULL, &img, &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK(img == IMG_SENTINEL);

    memset(zeros, 0, sizeof zeros);
    REQUIRE(write_file_at(scratch_path("zeros.img"), zeros, sizeof zeros, 0) == 0);
    err = NULL;
    rc = oxcow_open(scratch_path("zeros.img"), OXCOW_OPEN_RDWR, NULL, &img, &err);
    CHECK_ERR(rc, err, EINVAL);

    REQUIRE(write_file_at(scratch_path("empty.img"), zeros, 0, 0) == 0);
    err = NULL;
    rc = oxcow_open(scratch_path("empty.img"), 0, NULL, &img, &err);
    CHECK_ERR(rc, err, EINVAL);

    /* The qcow2 magic followed by garbage. */
    memcpy(zeros, "QFI\xfb\x00\x00\x00\x07", 8);
    REQUIRE(write_file_at(scratch_path("badver.img"), zeros, sizeof zeros, 0) == 0);
    err = NULL;
    rc = oxcow_open(scratch_path("badver.img"), 0, NULL, &img, &err);
    CHECK(rc == -EINVAL || rc == -ENOTSUP);
    CHECK(err != NULL && oxcow_error_errno(err) == -rc);
    oxcow_error_free(err);
    CHECK(img == IMG_SENTINEL);

    /* A directory is not an image either. */
    err = NULL;
    rc = oxcow_open(g_dir, 0, NULL, &img, &err);
    CHECK(rc < 0);
    CHECK(err != NULL && oxcow_error_errno(err) == -rc);
    oxcow_error_free(err);
    CHECK(img == IMG_SENTINEL);
}

/* Sets header bits of a freshly created image directly in the file. */
static void set_incompatible_bits(const char *path, uint64_t bits) {
    unsigned char be[8];
    int i;
    for (i = 0; i < 8; i++)
        be[i] = (unsigned char)(bits >> (56 - 8 * i));
    CHECK_EQ(write_file_at(path, be, 8, 72), 0);
}

static void test_corrupt_and_unsupported_headers(void) {
    const char *path;
    oxcow_error *err = NULL;
    oxcow_image *img = NULL;
    oxcow_info info;
    int rc;
    scratch_dir();
    path = scratch_path("corrupt.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));
    set_incompatible_bits(path, 2); /* corrupt bit */
    rc = oxcow_open(path, OXCOW_OPEN_RDWR, NULL, &img, &err);
    CHECK_ERR(rc, err, EUCLEAN);
    /* Read-only opens are allowed and report the bit. */
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    CHECK_EQ(oxcow_get_info(img, &info), 0);
    CHECK(info.flags & OXCOW_INFO_CORRUPT);
    CHECK(info.flags & OXCOW_INFO_READ_ONLY);
    CHECK_EQ(oxcow_close(img), 0);

    path = scratch_path("unknown-feature.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));
    set_incompatible_bits(path, 1ull << 40);
    err = NULL;
    img = IMG_SENTINEL;
    rc = oxcow_open(path, 0, NULL, &img, &err);
    CHECK_ERR(rc, err, ENOTSUP);
    CHECK(img == IMG_SENTINEL);
}

/* Everything a read-only handle refuses, without changing a byte of the file. */
static void test_read_only_handle(void) {
    const char *path;
    oxcow_image *img;
    unsigned char buf[4096], *before, *after;
    size_t nb = 0, na = 0;
    struct iovec iov;
    struct stat st1, st2;
    scratch_dir();
    path = scratch_path("ro.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    memset(buf, 0x11, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 0), 0);
    CHECK_EQ(oxcow_close(img), 0);

    before = read_file(path, &nb);
    REQUIRE(before != NULL);
    CHECK_EQ(stat(path, &st1), 0);
    img = open_image(path, 0);
    REQUIRE(img != NULL);
    memset(buf, 0x22, sizeof buf);
    iov.iov_base = buf;
    iov.iov_len = sizeof buf;
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 0), -EROFS);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, MiB), -EROFS);
    CHECK_EQ(oxcow_pwritev(img, &iov, 1, 0), -EROFS);
    CHECK_EQ(oxcow_write_zeroes(img, 0, CL, 0), -EROFS);
    CHECK_EQ(oxcow_write_zeroes(img, 0, CL, OXCOW_ZERO_MAY_UNMAP), -EROFS);
    CHECK_EQ(oxcow_discard(img, 0, CL), -EROFS);
    CHECK_EQ(oxcow_flush(img), 0);
    /* Reads still work and see the old data. */
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 0), 0);
    CHECK(all_bytes(buf, sizeof buf, 0x11));
    CHECK_EQ(oxcow_close(img), 0);

    after = read_file(path, &na);
    REQUIRE(after != NULL);
    CHECK_EQ(na, nb);
    CHECK(na == nb && memcmp(before, after, nb) == 0);
    CHECK_EQ(stat(path, &st2), 0);
    CHECK(st1.st_mtim.tv_sec == st2.st_mtim.tv_sec && st1.st_mtim.tv_nsec == st2.st_mtim.tv_nsec);
    free(before);
    free(after);
}

/* Requests beyond the virtual size fail with -EINVAL and change nothing. */
static void test_out_of_range(void) {
    const char *path;
    oxcow_image *img;
    unsigned char buf[8192], *before, *after;
    size_t nb = 0, na = 0;
    struct iovec iov[2];
    const uint64_t size = 4 * MiB;
    scratch_dir();
    path = scratch_path("range.qcow2");
    REQUIRE_OK(create_default(path, size));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    memset(buf, 0x33, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, size - sizeof buf), 0);
    CHECK_EQ(oxcow_flush(img), 0);
    before = read_file(path, &nb);
    REQUIRE(before != NULL);

    memset(buf, 0x44, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, 1024, size - 512), -EINVAL);
    CHECK_EQ(oxcow_pwrite(img, buf, 1, size), -EINVAL);
    CHECK_EQ(oxcow_pwrite(img, buf, 1, UINT64_MAX), -EINVAL);
    CHECK_EQ(oxcow_pwrite(img, buf, 2, UINT64_MAX - 1), -EINVAL);
    iov[0].iov_base = buf;
    iov[0].iov_len = 4096;
    iov[1].iov_base = buf + 4096;
    iov[1].iov_len = 4096;
    CHECK_EQ(oxcow_pwritev(img, iov, 2, size - 4096), -EINVAL);
    CHECK_EQ(oxcow_write_zeroes(img, size - 512, 1024, 0), -EINVAL);
    CHECK_EQ(oxcow_write_zeroes(img, 0, UINT64_MAX, OXCOW_ZERO_MAY_UNMAP), -EINVAL);
    CHECK_EQ(oxcow_discard(img, size - CL, 2 * CL), -EINVAL);
    CHECK_EQ(oxcow_discard(img, UINT64_MAX, 1), -EINVAL);

    /* Failed reads leave the buffer alone. */
    memset(buf, 0x55, sizeof buf);
    CHECK_EQ(oxcow_pread(img, buf, 1024, size - 512), -EINVAL);
    CHECK_EQ(oxcow_pread(img, buf, 1, UINT64_MAX), -EINVAL);
    CHECK_EQ(oxcow_preadv(img, iov, 2, size - 4096), -EINVAL);
    CHECK(all_bytes(buf, sizeof buf, 0x55));

    CHECK_EQ(oxcow_flush(img), 0);
    after = read_file(path, &na);
    REQUIRE(after != NULL);
    CHECK_EQ(na, nb);
    CHECK(na == nb && memcmp(before, after, nb) == 0);
    /* The data at the end is what it was. */
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, size - sizeof buf), 0);
    CHECK(all_bytes(buf, sizeof buf, 0x33));
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
    free(before);
    free(after);
}

static void test_null_pointers(void) {
    const char *path;
    oxcow_image *img, *out = IMG_SENTINEL;
    oxcow_error *err = ERR_SENTINEL;
    unsigned char buf[512];
    struct iovec iov[2];
    oxcow_info info;
    oxcow_extent ext;
    oxcow_check_result cr;
    int rc;
    scratch_dir();
    path = scratch_path("null.qcow2");
    REQUIRE_OK(create_default(path, MiB));
    oxcow_info_init(&info);
    oxcow_check_result_init(&cr);

    /* NULL handle: every call says -EINVAL. */
    CHECK_EQ(oxcow_pread(NULL, buf, sizeof buf, 0), -EINVAL);
    CHECK_EQ(oxcow_pwrite(NULL, buf, sizeof buf, 0), -EINVAL);
    CHECK_EQ(oxcow_pread(NULL, NULL, 0, 0), -EINVAL);
    iov[0].iov_base = buf;
    iov[0].iov_len = sizeof buf;
    CHECK_EQ(oxcow_preadv(NULL, iov, 1, 0), -EINVAL);
    CHECK_EQ(oxcow_pwritev(NULL, iov, 1, 0), -EINVAL);
    CHECK_EQ(oxcow_write_zeroes(NULL, 0, 512, 0), -EINVAL);
    CHECK_EQ(oxcow_discard(NULL, 0, 512), -EINVAL);
    CHECK_EQ(oxcow_flush(NULL), -EINVAL);
    CHECK_EQ(oxcow_get_info(NULL, &info), -EINVAL);
    CHECK_EQ(oxcow_block_status(NULL, 0, 512, &ext), -EINVAL);
    err = NULL;
    rc = oxcow_reopen(NULL, 0, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_check(NULL, 0, &cr, &err);
    CHECK_ERR(rc, err, EINVAL);

    /* NULL path / out for open. */
    err = NULL;
    rc = oxcow_open(NULL, 0, NULL, &out, &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK(out == IMG_SENTINEL);
    err = NULL;
    rc = oxcow_open(path, 0, NULL, NULL, &err);
    CHECK_ERR(rc, err, EINVAL);

    /* NULL buffers and outputs on a valid handle. */
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    CHECK_EQ(oxcow_pread(img, NULL, 1, 0), -EINVAL);
    CHECK_EQ(oxcow_pwrite(img, NULL, 512, 0), -EINVAL);
    CHECK_EQ(oxcow_preadv(img, NULL, 1, 0), -EINVAL);
    CHECK_EQ(oxcow_pwritev(img, NULL, 2, 0), -EINVAL);
    iov[0].iov_base = buf;
    iov[0].iov_len = 16;
    iov[1].iov_base = NULL;
    iov[1].iov_len = 16;
    CHECK_EQ(oxcow_pwritev(img, iov, 2, 0), -EINVAL);
    CHECK_EQ(oxcow_preadv(img, iov, 2, 0), -EINVAL);
    CHECK_EQ(oxcow_get_info(img, NULL), -EINVAL);
    CHECK_EQ(oxcow_block_status(img, 0, 512, NULL), -EINVAL);
    err = NULL;
    rc = oxcow_check(img, 0, NULL, &err);
    CHECK_ERR(rc, err, EINVAL);

    /* A successful call leaves *err alone. */
    err = ERR_SENTINEL;
    CHECK_EQ(oxcow_open(path, OXCOW_OPEN_FORCE_SHARE, NULL, &out, &err), 0);
    CHECK(err == ERR_SENTINEL);
    CHECK(out != IMG_SENTINEL && out != NULL);
    if (out != IMG_SENTINEL)
        CHECK_EQ(oxcow_close(out), 0);
    CHECK_EQ(oxcow_create(scratch_path("ok.qcow2"), MiB, NULL, &err), 0);
    CHECK(err == ERR_SENTINEL);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0); /* nothing above wrote anything */
}

static void test_unknown_flags_and_iovcnt(void) {
    const char *path;
    oxcow_image *img, *out = IMG_SENTINEL;
    oxcow_error *err = NULL;
    unsigned char buf[512];
    struct iovec iov[1];
    int rc;
    scratch_dir();
    path = scratch_path("flags.qcow2");
    REQUIRE_OK(create_default(path, MiB));

    rc = oxcow_open(path, 1u << 12, NULL, &out, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_open(path, OXCOW_OPEN_RDWR | 0x80000000u, NULL, &out, &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK(out == IMG_SENTINEL);

    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    CHECK_EQ(oxcow_write_zeroes(img, 0, 512, 2), -EINVAL);
    CHECK_EQ(oxcow_write_zeroes(img, 0, 512, 0x80000000u | OXCOW_ZERO_MAY_UNMAP), -EINVAL);
    err = NULL;
    rc = oxcow_reopen(img, 1u << 9, &err);
    CHECK_ERR(rc, err, EINVAL);
    {
        oxcow_check_result cr;
        oxcow_check_result_init(&cr);
        err = NULL;
        rc = oxcow_check(img, 4, &cr, &err);
        CHECK_ERR(rc, err, EINVAL);
    }

    iov[0].iov_base = buf;
    iov[0].iov_len = sizeof buf;
    CHECK_EQ(oxcow_preadv(img, iov, -1, 0), -EINVAL);
    CHECK_EQ(oxcow_pwritev(img, iov, -1, 0), -EINVAL);
    CHECK_EQ(oxcow_preadv(img, iov, 1025, 0), -EINVAL);
    CHECK_EQ(oxcow_pwritev(img, iov, 1025, 0), -EINVAL);
    CHECK_EQ(oxcow_pwritev(img, iov, (int)0x7fffffff, 0), -EINVAL);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

static void test_struct_sizes(void) {
    const char *path;
    oxcow_image *img, *out = IMG_SENTINEL;
    oxcow_error *err = NULL;
    oxcow_open_options oo;
    oxcow_info info, info_before;
    oxcow_check_result cr;
    int rc;
    scratch_dir();
    path = scratch_path("sizes.qcow2");
    REQUIRE_OK(create_default(path, MiB));

    oxcow_open_options_init(&oo);
    oo.struct_size = 0;
    rc = oxcow_open(path, 0, &oo, &out, &err);
    CHECK_ERR(rc, err, EINVAL);
    oo.struct_size = 16 - 1; /* shorter than version 1 */
    CHECK_EQ(oxcow_open(path, 0, &oo, &out, NULL), -EINVAL);
    CHECK(out == IMG_SENTINEL);
    oxcow_open_options_init(&oo);
    oo.overlap_check = 5; /* not an OXCOW_OVERLAP_* value */
    CHECK_EQ(oxcow_open(path, 0, &oo, &out, NULL), -EINVAL);
    CHECK(out == IMG_SENTINEL);

    img = open_image(path, 0);
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    info.struct_size = 8;
    info_before = info;
    CHECK_EQ(oxcow_get_info(img, &info), -EINVAL);
    CHECK(memcmp(&info, &info_before, sizeof info) == 0);

    /* A larger struct_size (newer header) is fine; the v1 part is filled. */
    {
        struct {
            oxcow_info info;
            unsigned char future[64];
        } big;
        memset(&big, 0x7e, sizeof big);
        oxcow_info_init(&big.info);
        big.info.struct_size = sizeof big;
        CHECK_EQ(oxcow_get_info(img, &big.info), 0);
        CHECK_EQ(big.info.virtual_size, MiB);
        CHECK_EQ(big.info.struct_size, sizeof(oxcow_info));
        CHECK(all_bytes(big.future, sizeof big.future, 0x7e));
    }

    oxcow_check_result_init(&cr);
    cr.struct_size = 4;
    err = NULL;
    rc = oxcow_check(img, 0, &cr, &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK_EQ(oxcow_close(img), 0);
}

static void test_version(void) {
    char expect[64];
    const char *s = oxcow_version_string();
    CHECK_EQ(oxcow_version_number(), OXCOW_VERSION_NUMBER);
    CHECK_EQ(oxcow_version_number(),
             OXCOW_VERSION_MAJOR * 10000 + OXCOW_VERSION_MINOR * 100 + OXCOW_VERSION_PATCH);
    snprintf(expect, sizeof expect, "%d.%d.%d", OXCOW_VERSION_MAJOR, OXCOW_VERSION_MINOR,
             OXCOW_VERSION_PATCH);
    CHECK(s != NULL);
    /* The string may carry a pre-release suffix after the numbers. */
    CHECK(s != NULL && strncmp(s, expect, strlen(expect)) == 0 &&
          (s[strlen(expect)] == '\0' || s[strlen(expect)] == '-'));
    CHECK(oxcow_version_string() == s); /* static */
}

/* Error objects are independent of each other and of later calls; each is freed (ASan
 * reports leaks). */
static void test_error_objects_independent(void) {
    oxcow_error *a = NULL, *b = NULL;
    oxcow_image *img = IMG_SENTINEL;
    scratch_dir();
    CHECK_EQ(oxcow_open(scratch_path("nope-a"), 0, NULL, NULL, &a), -EINVAL);
    CHECK_EQ(oxcow_open(scratch_path("nope-b"), 0, NULL, &img, &b), -ENOENT);
    REQUIRE(a != NULL && b != NULL && a != b);
    CHECK_EQ(oxcow_error_errno(a), EINVAL);
    CHECK_EQ(oxcow_error_errno(b), ENOENT);
    CHECK(strstr(oxcow_error_message(a), "out") != NULL); /* names the NULL argument */
    CHECK(strstr(oxcow_error_message(b), "nope-b") != NULL);
    oxcow_error_free(a);
    /* b is still intact after a is gone. */
    CHECK(strstr(oxcow_error_message(b), "nope-b") != NULL);
    oxcow_error_free(b);
    CHECK(img == IMG_SENTINEL);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"error_object_basics", test_error_object_basics},
        {"missing_file", test_missing_file},
        {"not_qcow2", test_not_qcow2},
        {"corrupt_and_unsupported", test_corrupt_and_unsupported_headers},
        {"read_only_handle", test_read_only_handle},
        {"out_of_range", test_out_of_range},
        {"null_pointers", test_null_pointers},
        {"unknown_flags_and_iovcnt", test_unknown_flags_and_iovcnt},
        {"struct_sizes", test_struct_sizes},
        {"version", test_version},
        {"error_objects_independent", test_error_objects_independent},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
