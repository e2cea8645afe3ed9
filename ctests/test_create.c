/*
 * oxcow_create() with every option, checked against qemu-img (check must be clean, info must
 * agree) and against oxcow_get_info(); backing files; invalid option sets.
 */
#include "common.h"

/* Checks `qemu-img info --output=json` of `path` contains `needle`. */
static void check_qemu_info_has(const char *path, const char *needle) {
    static char out[65536];
    int st = capture(out, sizeof out, "qemu-img info --output=json '%s'", path);
    CHECK_EQ(st, 0);
    if (strstr(out, needle) == NULL) {
        fprintf(stderr, "qemu-img info of %s lacks '%s':\n%s\n", path, needle, out);
        g_failures++;
    }
}

/* The top-level "virtual-size" qemu-img reports for `path`, or UINT64_MAX. */
static uint64_t qemu_virtual_size(const char *path) {
    static char out[65536];
    static const char key[] = "\n    \"virtual-size\": ";
    const char *p;
    if (capture(out, sizeof out, "qemu-img info --output=json '%s'", path) != 0)
        return UINT64_MAX;
    p = strstr(out, key);
    return p ? strtoull(p + strlen(key), NULL, 10) : UINT64_MAX;
}

struct variant {
    const char *name;
    uint64_t size;
    uint32_t cluster_size, version, refcount_bits, flags, compression, prealloc;
};

static const struct variant variants[] = {
    {"defaults", 1ull << 30, 0, 0, 0, 0, 0, 0},
    {"c512", 64ull << 20, 512, 3, 16, 0, 0, 0},
    {"v2-c4k", 100ull << 20, 4096, 2, 16, 0, 0, 0},
    {"v2-default-cluster", 3ull << 30, 65536, 2, 0, 0, 0, 0},
    {"rc1", 1ull << 30, 65536, 3, 1, 0, 0, 0},
    {"rc8-c16k", 1ull << 30, 16384, 3, 8, 0, 0, 0},
    {"rc64-c2m", 10ull << 30, 2u << 20, 3, 64, 0, 0, 0},
    {"lazy", 1ull << 30, 65536, 3, 16, OXCOW_CREATE_LAZY_REFCOUNTS, 0, 0},
    {"extl2", 1ull << 30, 65536, 3, 16, OXCOW_CREATE_EXTENDED_L2, 0, 0},
    {"zstd", 1ull << 30, 65536, 3, 16, 0, OXCOW_COMPRESSION_ZSTD, 0},
    {"all-features", 2ull << 30, 32768, 3, 32,
     OXCOW_CREATE_LAZY_REFCOUNTS | OXCOW_CREATE_EXTENDED_L2, OXCOW_COMPRESSION_ZSTD, 0},
    {"prealloc-metadata", 256ull << 20, 65536, 3, 16, 0, 0, OXCOW_PREALLOC_METADATA},
    {"prealloc-metadata-c4k", 8ull << 20 | 12345, 4096, 3, 16, 0, 0, OXCOW_PREALLOC_METADATA},
    {"odd-size", 1000001, 0, 0, 0, 0, 0, 0},
    {"zero-size", 0, 0, 0, 0, 0, 0, 0},
};

static void test_options_init(void) {
    oxcow_create_options o;
    oxcow_open_options oo;
    oxcow_info info;
    oxcow_check_result cr;
    memset(&o, 0xa5, sizeof o);
    oxcow_create_options_init(&o);
    CHECK_EQ(o.struct_size, sizeof o);
    CHECK_EQ(o.cluster_size, 65536);
    CHECK_EQ(o.version, 3);
    CHECK_EQ(o.refcount_bits, 16);
    CHECK_EQ(o.flags, 0);
    CHECK_EQ(o.compression_type, OXCOW_COMPRESSION_DEFLATE);
    CHECK_EQ(o.preallocation, OXCOW_PREALLOC_OFF);
    CHECK_EQ(o.reserved, 0);
    CHECK(o.backing_file == NULL);
    CHECK(o.backing_format == NULL);

    memset(&oo, 0xa5, sizeof oo);
    oxcow_open_options_init(&oo);
    CHECK_EQ(oo.struct_size, sizeof oo);
    CHECK_EQ(oo.overlap_check, OXCOW_OVERLAP_DEFAULT);
    CHECK_EQ(oo.cache_size, 0);

    memset(&info, 0xa5, sizeof info);
    oxcow_info_init(&info);
    CHECK_EQ(info.struct_size, sizeof info);
    CHECK_EQ(info.virtual_size, 0);
    CHECK_EQ(info.flags, 0);
    CHECK_EQ(info.backing_file[0], 0);
    CHECK_EQ(info.backing_format[0], 0);

    memset(&cr, 0xa5, sizeof cr);
    oxcow_check_result_init(&cr);
    CHECK_EQ(cr.struct_size, sizeof cr);
    CHECK_EQ(cr.corruptions, 0);
    CHECK_EQ(cr.image_end_offset, 0);

    /* NULL is a no-op. */
    oxcow_create_options_init(NULL);
    oxcow_open_options_init(NULL);
    oxcow_info_init(NULL);
    oxcow_check_result_init(NULL);
}

static void check_variant(const struct variant *v) {
    const char *path = scratch_path(v->name);
    oxcow_create_options o;
    oxcow_error *err = NULL;
    oxcow_image *img;
    oxcow_info info;
    char needle[256];
    uint32_t cs = v->cluster_size ? v->cluster_size : 65536;
    uint32_t ver = v->version ? v->version : 3;
    uint32_t rb = v->refcount_bits ? v->refcount_bits : 16;
    int rc;
    struct stat st;
    uint64_t qemu_size;

    oxcow_create_options_init(&o);
    o.cluster_size = v->cluster_size;
    o.version = v->version;
    o.refcount_bits = v->refcount_bits;
    o.flags = v->flags;
    o.compression_type = v->compression;
    o.preallocation = v->prealloc;
    rc = oxcow_create(path, v->size, &o, &err);
    if (rc != 0) {
        fprintf(stderr, "variant %s: create failed %d: %s\n", v->name, rc,
                oxcow_error_message(err));
        oxcow_error_free(err);
        g_failures++;
        return;
    }
    CHECK(err == NULL);
    fprintf(stderr, "variant %s\n", v->name);
    CHECK_EQ(qemu_check(path), 0);

    /* QEMU sees whole 512-byte sectors: the size must be a multiple of 512 (rounded up,
     * like qemu-img create) for both to agree. */
    qemu_size = qemu_virtual_size(path);
    CHECK(qemu_size >= v->size && qemu_size < v->size + 512);
    snprintf(needle, sizeof needle, "\"cluster-size\": %" PRIu32 ",", cs);
    check_qemu_info_has(path, needle);
    check_qemu_info_has(path, ver == 2 ? "\"compat\": \"0.10\"" : "\"compat\": \"1.1\"");
    snprintf(needle, sizeof needle, "\"refcount-bits\": %" PRIu32, rb);
    check_qemu_info_has(path, needle);
    check_qemu_info_has(path, v->compression == OXCOW_COMPRESSION_ZSTD
                                  ? "\"compression-type\": \"zstd\""
                                  : "\"compression-type\": \"zlib\"");
    if (ver == 3) {
        check_qemu_info_has(path, (v->flags & OXCOW_CREATE_LAZY_REFCOUNTS)
                                      ? "\"lazy-refcounts\": true"
                                      : "\"lazy-refcounts\": false");
        check_qemu_info_has(path, (v->flags & OXCOW_CREATE_EXTENDED_L2)
                                      ? "\"extended-l2\": true"
                                      : "\"extended-l2\": false");
    }

    img = open_image(path, 0);
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    REQUIRE_OK(oxcow_get_info(img, &info));
    CHECK_EQ(info.struct_size, sizeof info);
    CHECK_EQ(info.virtual_size, qemu_size);
    CHECK_EQ(info.cluster_size, cs);
    CHECK_EQ(info.version, ver);
    CHECK_EQ(info.refcount_bits, rb);
    CHECK_EQ(info.compression_type, v->compression);
    CHECK_EQ(info.snapshot_count, 0);
    CHECK_EQ(info.flags, OXCOW_INFO_READ_ONLY |
                             ((v->flags & OXCOW_CREATE_LAZY_REFCOUNTS) ? OXCOW_INFO_LAZY_REFCOUNTS
                                                                       : 0) |
                             ((v->flags & OXCOW_CREATE_EXTENDED_L2) ? OXCOW_INFO_EXTENDED_L2 : 0));
    CHECK_EQ(info.backing_file[0], 0);
    CHECK_EQ(info.backing_format[0], 0);
    CHECK_EQ(stat(path, &st), 0);
    CHECK_EQ(info.file_size, st.st_size);

    if (v->prealloc == OXCOW_PREALLOC_METADATA && v->size > 0) {
        /* Every cluster is allocated and reads as zeros. */
        oxcow_extent e;
        unsigned char buf[4096];
        memset(&e, 0, sizeof e);
        CHECK_EQ(oxcow_block_status(img, 0, v->size, &e), 0);
        CHECK_EQ(e.offset, 0);
        CHECK(e.flags & OXCOW_EXTENT_ALLOCATED);
        CHECK(e.length >= 1 && e.length <= v->size);
        memset(buf, 0xee, sizeof buf);
        CHECK_EQ(oxcow_pread(img, buf, sizeof buf, v->size - sizeof buf), 0);
        CHECK(all_bytes(buf, sizeof buf, 0));
        /* The file was extended (sparsely) over all data clusters. */
        CHECK(info.file_size >= v->size);
    }
    CHECK_EQ(oxcow_close(img), 0);
}

static void test_variants(void) {
    size_t i;
    scratch_dir();
    for (i = 0; i < sizeof variants / sizeof variants[0]; i++)
        check_variant(&variants[i]);
}

static void test_null_options_are_defaults(void) {
    const char *path;
    oxcow_image *img;
    oxcow_info info;
    scratch_dir();
    path = scratch_path("null-opts.qcow2");
    REQUIRE_OK(oxcow_create(path, 5ull << 30, NULL, NULL));
    CHECK_EQ(qemu_check(path), 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    REQUIRE_OK(oxcow_get_info(img, &info));
    CHECK_EQ(info.virtual_size, 5ull << 30);
    CHECK_EQ(info.cluster_size, 65536);
    CHECK_EQ(info.version, 3);
    CHECK_EQ(info.refcount_bits, 16);
    CHECK_EQ(info.flags, 0); /* read-write, no features */
    CHECK_EQ(oxcow_close(img), 0);
}

static void test_create_replaces_existing_file(void) {
    const char *path;
    unsigned char junk[8192];
    scratch_dir();
    path = scratch_path("replace.qcow2");
    fill_pattern(junk, sizeof junk, 0, 7);
    REQUIRE(write_file_at(path, junk, sizeof junk, 1 << 20) == 0);
    REQUIRE_OK(create_default(path, 16 << 20));
    CHECK_EQ(qemu_check(path), 0);
}

/* Base image with data written through oxcow, qcow2 overlay inheriting its size. */
static void test_backing_qcow2(void) {
    const char *base, *top;
    oxcow_create_options o;
    oxcow_image *img;
    oxcow_info info;
    oxcow_extent e;
    unsigned char data[65536], buf[65536];
    oxcow_error *err = NULL;

    scratch_dir();
    base = scratch_path("base.qcow2");
    top = scratch_path("top.qcow2");
    REQUIRE_OK(create_default(base, 32 << 20));
    img = open_image(base, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    fill_pattern(data, sizeof data, 0, 1);
    CHECK_EQ(oxcow_pwrite(img, data, sizeof data, 1 << 20), 0);
    CHECK_EQ(oxcow_close(img), 0);

    oxcow_create_options_init(&o);
    o.backing_file = "base.qcow2"; /* relative to the overlay's directory */
    o.backing_format = "qcow2";
    REQUIRE_OK(oxcow_create(top, 0, &o, &err));
    CHECK(err == NULL);
    CHECK_EQ(qemu_check(top), 0);
    check_qemu_info_has(top, "\"backing-filename\": \"base.qcow2\"");
    check_qemu_info_has(top, "\"backing-filename-format\": \"qcow2\"");

    img = open_image(top, 0);
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    REQUIRE_OK(oxcow_get_info(img, &info));
    CHECK_EQ(info.virtual_size, 32 << 20); /* size 0 took the backing file's size */
    CHECK_EQ(info.flags, OXCOW_INFO_READ_ONLY | OXCOW_INFO_HAS_BACKING);
    CHECK(strcmp(info.backing_file, "base.qcow2") == 0);
    CHECK(strcmp(info.backing_format, "qcow2") == 0);
    memset(buf, 0, sizeof buf);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 1 << 20), 0);
    CHECK(memcmp(buf, data, sizeof buf) == 0);
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(img, 1 << 20, 65536, &e), 0);
    CHECK_EQ(e.offset, 1 << 20);
    CHECK(e.flags & OXCOW_EXTENT_BACKING);
    CHECK(!(e.flags & OXCOW_EXTENT_ALLOCATED));
    CHECK_EQ(oxcow_close(img), 0);

    /* Without the backing file the same range reads zeros. */
    img = open_image(top, OXCOW_OPEN_NO_BACKING);
    REQUIRE(img != NULL);
    memset(buf, 0xcc, sizeof buf);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 1 << 20), 0);
    CHECK(all_bytes(buf, sizeof buf, 0));
    CHECK_EQ(oxcow_close(img), 0);

    /* A write to the overlay copies on write; the base is unchanged. */
    img = open_image(top, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    memset(buf, 0x77, 512);
    CHECK_EQ(oxcow_pwrite(img, buf, 512, (1 << 20) + 4096), 0);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 1 << 20), 0);
    CHECK(memcmp(buf, data, 4096) == 0);
    CHECK(all_bytes(buf + 4096, 512, 0x77));
    CHECK(memcmp(buf + 4608, data + 4608, sizeof buf - 4608) == 0);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(top), 0);
    CHECK_EQ(qemu_check(base), 0);
    CHECK_EQ(run("qemu-io -r -f qcow2 -c 'read -P 0x77 %d 512' '%s' >/dev/null", (1 << 20) + 4096,
                 top),
             0);
}

static void test_backing_raw(void) {
    const char *base, *top;
    oxcow_create_options o;
    oxcow_image *img;
    oxcow_info info;
    unsigned char data[8192], buf[8192];

    scratch_dir();
    base = scratch_path("base.raw");
    top = scratch_path("top.qcow2");
    fill_pattern(data, sizeof data, 0, 9);
    REQUIRE(write_file_at(base, data, sizeof data, (4 << 20) - sizeof data) == 0);

    oxcow_create_options_init(&o);
    o.backing_file = base; /* absolute */
    o.backing_format = "raw";
    REQUIRE_OK(oxcow_create(top, 0, &o, NULL));
    CHECK_EQ(qemu_check(top), 0);
    img = open_image(top, 0);
    REQUIRE(img != NULL);
    oxcow_info_init(&info);
    REQUIRE_OK(oxcow_get_info(img, &info));
    CHECK_EQ(info.virtual_size, 4 << 20);
    CHECK(strcmp(info.backing_file, base) == 0);
    CHECK(strcmp(info.backing_format, "raw") == 0);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, (4 << 20) - sizeof buf), 0);
    CHECK(memcmp(buf, data, sizeof buf) == 0);
    CHECK_EQ(oxcow_close(img), 0);
}

/* A guest wrote a qcow2 header into its raw disk, which backs an overlay. The recorded "raw"
 * is obeyed (the overlay reads the raw bytes); once the overlay records no format, a caller
 * that set OXCOW_OPEN_NO_PROBE gets -ENOTSUP instead of a guess. */
static void test_backing_no_probe(void) {
    const char *inner, *base, *top;
    oxcow_create_options o;
    oxcow_image *img = NULL;
    oxcow_error *err = NULL;
    unsigned char *disk, buf[4096], hdr[104], zero[8] = {0};
    size_t len;
    uint32_t ext_start;

    scratch_dir();
    inner = scratch_path("inner.qcow2");
    base = scratch_path("disk.raw");
    top = scratch_path("top.qcow2");
    REQUIRE(create_default(inner, 1 << 20) == 0);
    disk = read_file(inner, &len);
    REQUIRE(disk != NULL && len >= sizeof buf);
    REQUIRE(write_file_at(base, disk, len, 0) == 0);
    REQUIRE(write_file_at(base, zero, 1, (1 << 20) - 1) == 0);

    oxcow_create_options_init(&o);
    o.backing_file = base;
    o.backing_format = "raw";
    REQUIRE_OK(oxcow_create(top, 0, &o, NULL));
    img = open_image(top, OXCOW_OPEN_NO_PROBE);
    REQUIRE(img != NULL);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, 0), 0);
    CHECK(memcmp(buf, disk, sizeof buf) == 0); /* the header bytes, as data */
    CHECK_EQ(oxcow_close(img), 0);
    free(disk);

    /* End the extension area where the backing format extension starts. */
    REQUIRE(read_file_at(top, hdr, sizeof hdr, 0) == 0);
    ext_start = (uint32_t)hdr[100] << 24 | (uint32_t)hdr[101] << 16 | (uint32_t)hdr[102] << 8 |
                hdr[103];
    REQUIRE(write_file_at(top, zero, sizeof zero, ext_start) == 0);
    img = NULL;
    CHECK_EQ(oxcow_open(top, OXCOW_OPEN_NO_PROBE, NULL, &img, &err), -ENOTSUP);
    CHECK(img == NULL);
    REQUIRE(err != NULL);
    CHECK(strstr(oxcow_error_message(err), "not recorded") != NULL);
    CHECK(strstr(oxcow_error_message(err), top) != NULL);
    oxcow_error_free(err);
    img = open_image(top, 0); /* probing is the default, like QEMU */
    REQUIRE(img != NULL);
    CHECK_EQ(oxcow_close(img), 0);
}

static void expect_create_einval(const char *what, const oxcow_create_options *o) {
    oxcow_error *err = NULL;
    const char *path = scratch_path("bad.qcow2");
    int rc = oxcow_create(path, 1 << 30, o, &err);
    if (rc != -EINVAL)
        fprintf(stderr, "create with %s: expected -EINVAL, got %d\n", what, rc);
    CHECK_ERR(rc, err, EINVAL);
}

static void test_invalid_options(void) {
    oxcow_create_options o;
    oxcow_error *err = NULL;
    int rc;
    scratch_dir();

#define BAD(field_assignments, what)  \
    do {                              \
        oxcow_create_options_init(&o); \
        field_assignments;            \
        expect_create_einval(what, &o); \
    } while (0)

    BAD(o.cluster_size = 1000, "cluster size 1000");
    BAD(o.cluster_size = 256, "cluster size 256");
    BAD(o.cluster_size = 4u << 20, "cluster size 4M");
    BAD(o.version = 4, "version 4");
    BAD(o.version = 1, "version 1");
    BAD(o.refcount_bits = 3, "refcount bits 3");
    BAD(o.refcount_bits = 128, "refcount bits 128");
    BAD((o.version = 2, o.refcount_bits = 8), "v2 with 8-bit refcounts");
    BAD((o.version = 2, o.flags = OXCOW_CREATE_LAZY_REFCOUNTS), "v2 lazy refcounts");
    BAD((o.version = 2, o.flags = OXCOW_CREATE_EXTENDED_L2), "v2 extended L2");
    BAD((o.version = 2, o.compression_type = OXCOW_COMPRESSION_ZSTD), "v2 zstd");
    BAD((o.cluster_size = 4096, o.flags = OXCOW_CREATE_EXTENDED_L2), "extended L2, 4k");
    BAD(o.flags = 4, "unknown create flag 4");
    BAD(o.flags = 0x80000000u, "unknown create flag bit 31");
    BAD(o.compression_type = 2, "compression type 2");
    BAD(o.preallocation = 2, "preallocation 2");
    BAD(o.reserved = 1, "reserved field set");
    BAD(o.struct_size = 4, "struct_size 4");
    BAD(o.struct_size = 0, "struct_size 0");
    BAD(o.struct_size = 47, "struct_size one short of version 1");
    BAD(o.backing_file = "base.qcow2", "backing file without format");
    BAD(o.backing_format = "qcow2", "backing format without file");
    BAD((o.backing_file = "base.img", o.backing_format = "vmdk"), "backing format vmdk");
    BAD((o.backing_file = "", o.backing_format = "raw"), "empty backing file");
    BAD((o.backing_file = "b.raw", o.backing_format = "raw",
         o.preallocation = OXCOW_PREALLOC_METADATA),
        "backing file with preallocation");
#undef BAD

    /* Far too large for the L1 table. */
    oxcow_create_options_init(&o);
    o.cluster_size = 512;
    err = NULL;
    rc = oxcow_create(scratch_path("huge.qcow2"), UINT64_MAX / 2, &o, &err);
    CHECK_ERR(rc, err, EINVAL);

    /* NULL and empty paths. */
    err = NULL;
    rc = oxcow_create(NULL, 1 << 20, NULL, &err);
    CHECK_ERR(rc, err, EINVAL);
    err = NULL;
    rc = oxcow_create("", 1 << 20, NULL, &err);
    CHECK_ERR(rc, err, EINVAL);
    /* err may be NULL: only the code is returned. */
    CHECK_EQ(oxcow_create(NULL, 1 << 20, NULL, NULL), -EINVAL);

    /* A directory that does not exist: the OS error comes through. */
    err = NULL;
    rc = oxcow_create(scratch_path("no/such/dir.qcow2"), 1 << 20, NULL, &err);
    CHECK_ERR(rc, err, ENOENT);

    /* A larger struct_size (a caller built against a newer header) is accepted. */
    {
        struct {
            oxcow_create_options o;
            uint64_t future[4];
        } big;
        memset(&big, 0, sizeof big);
        oxcow_create_options_init(&big.o);
        big.o.struct_size = sizeof big;
        big.o.cluster_size = 4096;
        CHECK_EQ(oxcow_create(scratch_path("big.qcow2"), 1 << 20, &big.o, NULL), 0);
        CHECK_EQ(qemu_check(scratch_path("big.qcow2")), 0);
    }
}

/* An external data file kept raw (qemu-img's -o data_file=...,data_file_raw=on): qemu-img
 * sees it, guest writes land at their guest offset in it; a version-1 struct (no data_file
 * field) still creates a plain image; the raw flag without a data file is refused. */
static void test_data_file(void) {
    const char *path, *data;
    char data_path[4096];
    oxcow_create_options o;
    oxcow_image *img;
    oxcow_error *err = NULL;
    unsigned char buf[4096], back[4096];
    int rc;
    scratch_dir();
    path = scratch_path("df.qcow2");
    data = scratch_path("df.raw");
    snprintf(data_path, sizeof data_path, "%s", data);
    oxcow_create_options_init(&o);
    o.data_file = data_path;
    o.flags = OXCOW_CREATE_DATA_FILE_RAW;
    REQUIRE_OK(oxcow_create(path, 1 << 20, &o, NULL));
    CHECK_EQ(qemu_check(path), 0);
    check_qemu_info_has(path, "\"data-file-raw\": true");
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    fill_pattern(buf, sizeof buf, 0, 9);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 65536), 0);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
    REQUIRE(read_file_at(data_path, back, sizeof back, 65536) == 0);
    CHECK(memcmp(buf, back, sizeof buf) == 0);

    /* A caller built against version 1 of the struct: data_file is not read. */
    oxcow_create_options_init(&o);
    o.struct_size = 48;
    o.data_file = (const char *)0x1; /* beyond the caller's struct: must not be touched */
    REQUIRE_OK(oxcow_create(scratch_path("v1.qcow2"), 1 << 20, &o, NULL));
    check_qemu_info_has(scratch_path("v1.qcow2"), "\"compat\": \"1.1\"");

    oxcow_create_options_init(&o);
    o.flags = OXCOW_CREATE_DATA_FILE_RAW;
    rc = oxcow_create(scratch_path("noname.qcow2"), 1 << 20, &o, &err);
    CHECK_ERR(rc, err, EINVAL);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"options_init", test_options_init},
        {"all_variants", test_variants},
        {"null_options", test_null_options_are_defaults},
        {"replace_existing", test_create_replaces_existing_file},
        {"backing_qcow2", test_backing_qcow2},
        {"backing_raw", test_backing_raw},
        {"backing_no_probe", test_backing_no_probe},
        {"invalid_options", test_invalid_options},
        {"data_file", test_data_file},
    };
    /* "variant.<name>" runs a single create variant (one ctest each). */
    if (argc > 1 && strncmp(argv[1], "variant.", 8) == 0) {
        size_t i;
        for (i = 0; i < sizeof variants / sizeof variants[0]; i++) {
            if (strcmp(argv[1] + 8, variants[i].name) == 0) {
                scratch_dir();
                check_variant(&variants[i]);
                fprintf(stderr, "%s: %s\n", argv[1], g_failures ? "FAILED" : "ok");
                return g_failures ? 1 : 0;
            }
        }
        fprintf(stderr, "no variant named '%s'\n", argv[1] + 8);
        return 2;
    }
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
