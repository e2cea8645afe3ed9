/*
 * oxcow_check() through the C ABI: counters equal to qemu-img check's on the same image,
 * leak and corruption repair (qemu-img check clean afterwards), read-only handles, argument
 * checks.
 */
#include "common.h"

#define MiB (1ull << 20)
#define KiB (1ull << 10)
#define CL (64 * KiB)

/* Reads `"key": N` from qemu-img check's JSON output; 0 when the key is absent. */
static unsigned long long json_u64(const char *json, const char *key) {
    char needle[128];
    const char *p;
    snprintf(needle, sizeof needle, "\"%s\": ", key);
    p = strstr(json, needle);
    return p ? strtoull(p + strlen(needle), NULL, 10) : 0;
}

/* Asserts that oxcow's counters for `path` (through `img`, fix 0) equal qemu-img's. */
static void check_matches_qemu(oxcow_image *img, const char *path, int want_exit) {
    char json[4096];
    oxcow_check_result r;
    oxcow_error *err = NULL;
    int qrc;
    oxcow_check_result_init(&r);
    REQUIRE_OK(oxcow_check(img, 0, &r, &err));
    CHECK_EQ(r.struct_size, sizeof r);
    qrc = capture(json, sizeof json, "qemu-img check -U --output=json '%s'", path);
    CHECK_EQ(qrc, want_exit);
    CHECK_EQ(r.corruptions, json_u64(json, "corruptions"));
    CHECK_EQ(r.leaks, json_u64(json, "leaks"));
    CHECK_EQ(r.check_errors, json_u64(json, "check-errors"));
    CHECK_EQ(r.total_clusters, json_u64(json, "total-clusters"));
    CHECK_EQ(r.allocated_clusters, json_u64(json, "allocated-clusters"));
    CHECK_EQ(r.fragmented_clusters, json_u64(json, "fragmented-clusters"));
    CHECK_EQ(r.compressed_clusters, json_u64(json, "compressed-clusters"));
    CHECK_EQ(r.image_end_offset, json_u64(json, "image-end-offset"));
}

/* Writes a big-endian u16 into the file (a 16-bit refcount entry). */
static int poke_u16(const char *path, off_t off, unsigned v) {
    unsigned char b[2];
    b[0] = (unsigned char)(v >> 8);
    b[1] = (unsigned char)v;
    return write_file_at(path, b, 2, off);
}

static void test_clean_image(void) {
    const char *path;
    oxcow_image *img;
    unsigned char buf[3 * 65536];
    scratch_dir();
    path = scratch_path("clean.qcow2");
    REQUIRE_OK(create_default(path, 64 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    fill_pattern(buf, sizeof buf, 0, 3);
    REQUIRE_OK(oxcow_pwrite(img, buf, sizeof buf, 0));
    REQUIRE_OK(oxcow_pwrite(img, buf, 4096, 20 * MiB));
    /* Unflushed: the check writes the metadata back first. */
    REQUIRE_OK(oxcow_flush(img));
    check_matches_qemu(img, path, 0);
    {
        oxcow_check_result r;
        oxcow_check_result_init(&r);
        REQUIRE_OK(oxcow_check(img, OXCOW_CHECK_FIX_LEAKS | OXCOW_CHECK_FIX_ERRORS, &r, NULL));
        CHECK_EQ(r.corruptions + r.leaks + r.check_errors, 0);
        CHECK_EQ(r.corruptions_fixed + r.leaks_fixed, 0);
        CHECK_EQ(r.allocated_clusters, 4);
    }
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

static void test_repair_leak_and_corruption(void) {
    const char *path;
    oxcow_image *img;
    oxcow_check_result r;
    scratch_dir();
    path = scratch_path("damaged.qcow2");
    REQUIRE(run("qemu-img create -q -f qcow2 '%s' 64M && qemu-io -c 'write -P 7 0 256k' '%s' "
                ">/dev/null && truncate -s 2M '%s'",
                path, path, path) == 0);
    /* Layout: header 0, reftable 1, refblock 2, L1 3, L2 4, data 5..8. */
    REQUIRE_OK(poke_u16(path, 2 * CL + 2 * 20, 1)); /* leak cluster 20 */
    REQUIRE_OK(poke_u16(path, 2 * CL + 2 * 6, 2));  /* over-count data: leak + COPIED */

    img = open_image(path, 0);
    REQUIRE(img != NULL);
    check_matches_qemu(img, path, 2);
    {
        /* Repairs need a writable handle. */
        oxcow_error *err = NULL;
        oxcow_check_result before;
        int rc;
        oxcow_check_result_init(&r);
        before = r;
        rc = oxcow_check(img, OXCOW_CHECK_FIX_LEAKS, &r, &err);
    CHECK_ERR(rc, err, EROFS);
        CHECK(memcmp(&r, &before, sizeof r) == 0);
    }
    CHECK_EQ(oxcow_close(img), 0);

    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    oxcow_check_result_init(&r);
    REQUIRE_OK(oxcow_check(img, OXCOW_CHECK_FIX_LEAKS, &r, NULL));
    CHECK_EQ(r.leaks_fixed, 2);
    CHECK_EQ(r.leaks, 0);
    CHECK_EQ(r.corruptions, 0);
    /* The handle keeps working after the repair reloaded its metadata. */
    {
        unsigned char b[4096], back[4096];
        fill_pattern(b, sizeof b, 0, 9);
        REQUIRE_OK(oxcow_pwrite(img, b, sizeof b, 8 * MiB));
        REQUIRE_OK(oxcow_pread(img, back, sizeof back, 8 * MiB));
        CHECK(memcmp(b, back, sizeof b) == 0);
    }
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);

    /* An under-counted cluster needs FIX_ERRORS (LEAKS alone reports a check error). */
    REQUIRE_OK(poke_u16(path, 2 * CL + 2 * 5, 0));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    oxcow_check_result_init(&r);
    REQUIRE_OK(oxcow_check(img, OXCOW_CHECK_FIX_LEAKS, &r, NULL));
    CHECK_EQ(r.check_errors, 1);
    oxcow_check_result_init(&r);
    REQUIRE_OK(oxcow_check(img, OXCOW_CHECK_FIX_ERRORS, &r, NULL));
    CHECK_EQ(r.check_errors + r.corruptions + r.leaks, 0);
    CHECK(r.corruptions_fixed >= 1);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

static void test_arguments(void) {
    const char *path;
    oxcow_image *img;
    oxcow_error *err = NULL;
    oxcow_check_result r;
    int rc;
    scratch_dir();
    path = scratch_path("args.qcow2");
    REQUIRE_OK(create_default(path, MiB));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    oxcow_check_result_init(&r);
    rc = oxcow_check(NULL, 0, &r, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_check(img, 0, NULL, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_check(img, 4, &r, &err);
    CHECK_ERR(rc, err, EINVAL);
    r.struct_size = 8;
    err = NULL;
    rc = oxcow_check(img, 0, &r, &err);
    CHECK_ERR(rc, err, EINVAL);
    oxcow_check_result_init(&r);
    CHECK_EQ(oxcow_check(img, 0, &r, NULL), 0);
    CHECK_EQ(r.total_clusters, 16);
    CHECK_EQ(oxcow_close(img), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"clean_image", test_clean_image},
        {"repair_leak_and_corruption", test_repair_leak_and_corruption},
        {"arguments", test_arguments},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
