/*
 * Data path through the C ABI: pread/pwrite, preadv/pwritev, write_zeroes, discard, flush,
 * block_status, open flags. Every scenario keeps a raw reference file written with the same
 * data; qemu-img compare and qemu-img check are the oracle.
 */
#include "common.h"

#define MiB (1ull << 20)
#define KiB (1ull << 10)
#define CL (64 * KiB)

/* A qcow2 image under test plus its raw reference file. */
struct pair {
    const char *qcow2, *raw;
    uint64_t size;
    oxcow_image *img;
};

static int pair_create(struct pair *p, uint64_t size) {
    scratch_dir();
    p->qcow2 = scratch_path("img.qcow2");
    p->raw = scratch_path("ref.raw");
    p->size = size;
    p->img = NULL;
    if (create_default(p->qcow2, size) != 0)
        return -1;
    {
        int fd = open(p->raw, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || ftruncate(fd, (off_t)size) != 0)
            return -1;
        close(fd);
    }
    p->img = open_image(p->qcow2, OXCOW_OPEN_RDWR);
    return p->img ? 0 : -1;
}

/* Writes the same bytes to the image and the reference. */
static void pair_write(struct pair *p, uint64_t off, size_t len, unsigned seed) {
    unsigned char *buf = (unsigned char *)malloc(len ? len : 1);
    REQUIRE(buf != NULL);
    fill_pattern(buf, len, off, seed);
    CHECK_EQ(oxcow_pwrite(p->img, buf, len, off), 0);
    CHECK_EQ(write_file_at(p->raw, buf, len, (off_t)off), 0);
    free(buf);
}

/* Zeroes the same range in the reference. */
static void ref_zero(struct pair *p, uint64_t off, size_t len) {
    unsigned char *z = (unsigned char *)calloc(1, len ? len : 1);
    REQUIRE(z != NULL);
    CHECK_EQ(write_file_at(p->raw, z, len, (off_t)off), 0);
    free(z);
}

/* Reads the whole image through `img` and compares it with the reference, chunk by chunk. */
static void compare_with_ref(oxcow_image *img, const char *raw, uint64_t size) {
    const size_t chunk = 1 * MiB + 4096 + 17; /* unaligned on purpose */
    unsigned char *a = (unsigned char *)malloc(chunk), *b = (unsigned char *)malloc(chunk);
    uint64_t off;
    REQUIRE(a != NULL && b != NULL);
    for (off = 0; off < size; off += chunk) {
        size_t n = (size_t)(size - off < chunk ? size - off : chunk);
        memset(a, 0xee, n);
        CHECK_EQ(oxcow_pread(img, a, n, off), 0);
        CHECK_EQ(read_file_at(raw, b, n, (off_t)off), 0);
        if (memcmp(a, b, n) != 0) {
            size_t i = 0;
            while (a[i] == b[i])
                i++;
            fprintf(stderr, "data mismatch at guest offset %" PRIu64 ": %02x vs %02x\n",
                    off + i, a[i], b[i]);
            g_failures++;
            break;
        }
    }
    free(a);
    free(b);
}

/* Closes the image, then lets QEMU judge it. */
static void pair_finish(struct pair *p) {
    CHECK_EQ(oxcow_close(p->img), 0);
    p->img = NULL;
    CHECK_EQ(qemu_check(p->qcow2), 0);
    CHECK_EQ(qemu_compare_raw(p->raw, p->qcow2), 0);
}

static void test_roundtrip(void) {
    struct pair p;
    static const struct {
        uint64_t off;
        size_t len;
    } writes[] = {
        {0, 512},
        {CL - 100, 300},               /* crosses a cluster boundary */
        {MiB + 7, 200000},             /* several clusters, unaligned both ends */
        {5 * MiB, CL},                 /* exactly one cluster */
        {63 * MiB, MiB},               /* up to the end */
        {MiB + 1000, 10},              /* overwrite inside allocated data */
        {17 * MiB + 12345, 3 * MiB},   /* spans L2 slices of data */
        {CL * 2, 1},                   /* single byte */
    };
    size_t i;
    oxcow_image *ro;
    REQUIRE(pair_create(&p, 64 * MiB) == 0);
    for (i = 0; i < sizeof writes / sizeof writes[0]; i++)
        pair_write(&p, writes[i].off, writes[i].len, (unsigned)i + 1);
    compare_with_ref(p.img, p.raw, p.size);
    pair_finish(&p);

    /* Reopened read-only, the data is still there. */
    ro = open_image(p.qcow2, 0);
    REQUIRE(ro != NULL);
    compare_with_ref(ro, p.raw, p.size);
    CHECK_EQ(oxcow_close(ro), 0);

    /* And QEMU reads the same bytes oxcow wrote. */
    CHECK_EQ(run("qemu-io -r -f qcow2 -c 'read -P 0 %llu 4096' '%s' >/dev/null",
                  (unsigned long long)(40 * MiB), p.qcow2),
             0);
}

static void test_vectored(void) {
    struct pair p;
    unsigned char a[100], c[70000], d[1], e[4000], all[74101], back[74101];
    unsigned char *r1, *r2;
    struct iovec w[5], r[3];
    const uint64_t off = 3 * CL - 50;
    REQUIRE(pair_create(&p, 16 * MiB) == 0);

    fill_pattern(a, sizeof a, 0, 11);
    fill_pattern(c, sizeof c, 100, 12);
    fill_pattern(d, sizeof d, 70100, 13);
    fill_pattern(e, sizeof e, 70101, 14);
    w[0].iov_base = a;
    w[0].iov_len = sizeof a;
    w[1].iov_base = NULL; /* zero-length entries may have a NULL base */
    w[1].iov_len = 0;
    w[2].iov_base = c;
    w[2].iov_len = sizeof c;
    w[3].iov_base = d;
    w[3].iov_len = sizeof d;
    w[4].iov_base = e;
    w[4].iov_len = sizeof e;
    memcpy(all, a, sizeof a);
    memcpy(all + 100, c, sizeof c);
    memcpy(all + 70100, d, sizeof d);
    memcpy(all + 70101, e, sizeof e);
    CHECK_EQ(oxcow_pwritev(p.img, w, 5, off), 0);
    CHECK_EQ(write_file_at(p.raw, all, sizeof all, (off_t)off), 0);

    memset(back, 0, sizeof back);
    CHECK_EQ(oxcow_pread(p.img, back, sizeof back, off), 0);
    CHECK(memcmp(back, all, sizeof all) == 0);

    /* Read it back with a different split. */
    r1 = back;
    r2 = back + 1;
    memset(back, 0, sizeof back);
    r[0].iov_base = r1;
    r[0].iov_len = 1;
    r[1].iov_base = r2;
    r[1].iov_len = 65535;
    r[2].iov_base = back + 65536;
    r[2].iov_len = sizeof back - 65536;
    CHECK_EQ(oxcow_preadv(p.img, r, 3, off), 0);
    CHECK(memcmp(back, all, sizeof all) == 0);

    /* IOV_MAX (1024) entries are accepted. */
    {
        struct iovec *many = (struct iovec *)calloc(1024, sizeof *many);
        unsigned char *big = (unsigned char *)malloc(1024 * 512);
        unsigned char *got = (unsigned char *)malloc(1024 * 512);
        int i;
        REQUIRE(many != NULL && big != NULL && got != NULL);
        fill_pattern(big, 1024 * 512, 0, 21);
        for (i = 0; i < 1024; i++) {
            many[i].iov_base = big + (size_t)i * 512;
            many[i].iov_len = 512;
        }
        CHECK_EQ(oxcow_pwritev(p.img, many, 1024, 8 * MiB), 0);
        CHECK_EQ(write_file_at(p.raw, big, 1024 * 512, (off_t)(8 * MiB)), 0);
        memset(got, 0, 1024 * 512);
        for (i = 0; i < 1024; i++)
            many[i].iov_base = got + (size_t)(1023 - i) * 512; /* scatter in reverse */
        CHECK_EQ(oxcow_preadv(p.img, many, 1024, 8 * MiB), 0);
        for (i = 0; i < 1024; i++)
            CHECK(memcmp(got + (size_t)(1023 - i) * 512, big + (size_t)i * 512, 512) == 0);
        free(many);
        free(big);
        free(got);
    }
    compare_with_ref(p.img, p.raw, p.size);
    pair_finish(&p);
}

static void test_write_zeroes(void) {
    struct pair p;
    oxcow_extent e;
    unsigned char buf[CL];
    REQUIRE(pair_create(&p, 16 * MiB) == 0);
    pair_write(&p, CL, 4 * CL, 1); /* clusters 1..4 hold data */

    /* Partial cluster: zeros exactly there, neighbours intact. */
    CHECK_EQ(oxcow_write_zeroes(p.img, CL + 1000, 3000, 0), 0);
    ref_zero(&p, CL + 1000, 3000);

    /* Whole allocated cluster without MAY_UNMAP: reads zeros, stays allocated. */
    CHECK_EQ(oxcow_write_zeroes(p.img, 2 * CL, CL, 0), 0);
    ref_zero(&p, 2 * CL, CL);
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(p.img, 2 * CL, CL, &e), 0);
    CHECK_EQ(e.offset, 2 * CL);
    CHECK_EQ(e.length, CL);
    CHECK(e.flags & OXCOW_EXTENT_ZERO);
    CHECK(e.flags & OXCOW_EXTENT_ALLOCATED);

    /* Whole cluster with MAY_UNMAP. */
    CHECK_EQ(oxcow_write_zeroes(p.img, 3 * CL, CL, OXCOW_ZERO_MAY_UNMAP), 0);
    ref_zero(&p, 3 * CL, CL);
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(p.img, 3 * CL, CL, &e), 0);
    CHECK(e.flags & OXCOW_EXTENT_ZERO);
    CHECK_EQ(e.host_offset, 0);

    /* Unaligned range over data and unallocated space, both flavours. */
    CHECK_EQ(oxcow_write_zeroes(p.img, 4 * CL + 5, 2 * CL, OXCOW_ZERO_MAY_UNMAP), 0);
    ref_zero(&p, 4 * CL + 5, 2 * CL);
    CHECK_EQ(oxcow_write_zeroes(p.img, 10 * MiB + 3, 5 * CL, 0), 0);
    ref_zero(&p, 10 * MiB + 3, 5 * CL);

    /* Zero-length is a no-op. */
    CHECK_EQ(oxcow_write_zeroes(p.img, CL, 0, 0), 0);

    memset(buf, 0xee, sizeof buf);
    CHECK_EQ(oxcow_pread(p.img, buf, CL, 2 * CL), 0);
    CHECK(all_bytes(buf, CL, 0));
    compare_with_ref(p.img, p.raw, p.size);
    pair_finish(&p);
}

static void test_discard(void) {
    struct pair p;
    oxcow_extent e;
    unsigned char buf[CL];
    REQUIRE(pair_create(&p, 16 * MiB) == 0);
    pair_write(&p, MiB, 3 * CL, 2);

    /* Only the fully covered middle cluster is released; partial edges stay. */
    CHECK_EQ(oxcow_discard(p.img, MiB + 1000, 3 * CL - 2000), 0);
    ref_zero(&p, MiB + CL, CL);
    memset(buf, 0xee, sizeof buf);
    CHECK_EQ(oxcow_pread(p.img, buf, CL, MiB + CL), 0);
    CHECK(all_bytes(buf, CL, 0));
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(p.img, MiB + CL, CL, &e), 0);
    CHECK(!((e.flags & OXCOW_EXTENT_ALLOCATED) && !(e.flags & OXCOW_EXTENT_ZERO)));
    CHECK_EQ(e.host_offset, 0);

    /* Discarding unallocated space and zero bytes is fine. */
    CHECK_EQ(oxcow_discard(p.img, 12 * MiB, 2 * MiB), 0);
    CHECK_EQ(oxcow_discard(p.img, 0, 0), 0);
    compare_with_ref(p.img, p.raw, p.size);
    pair_finish(&p);
}

/* Allocated 512-byte blocks of a host file. */
static long long host_blocks(const char *path) {
    struct stat st;
    return stat(path, &st) == 0 ? (long long)st.st_blocks : -1;
}

/* Writes 8 MiB, flushes, discards 90 % of it (cluster-aligned) and flushes again; returns the
 * host file's allocated blocks before and after the discard. `flags` are the open flags. */
static void discard_ninety_percent(struct pair *p, uint32_t flags, long long *before,
                                   long long *after) {
    const uint64_t data = 8 * MiB, cut = (data / CL) * 9 / 10 * CL;
    CHECK_EQ(oxcow_close(p->img), 0);
    p->img = open_image(p->qcow2, flags);
    REQUIRE(p->img != NULL);
    pair_write(p, 0, (size_t)data, 7);
    CHECK_EQ(oxcow_flush(p->img), 0);
    *before = host_blocks(p->qcow2);
    CHECK_EQ(oxcow_discard(p->img, 0, cut), 0);
    ref_zero(p, 0, (size_t)cut);
    CHECK_EQ(oxcow_flush(p->img), 0);
    *after = host_blocks(p->qcow2);
    compare_with_ref(p->img, p->raw, p->size);
}

/* OXCOW_OPEN_DISCARD_UNMAP punches the freed clusters: the host file's allocated blocks drop
 * with the discarded data, and the image stays clean with the remaining data intact. Without
 * the flag the blocks stay. */
static void test_discard_unmap(void) {
    struct pair p;
    long long before, after;
    REQUIRE(pair_create(&p, 16 * MiB) == 0);
    discard_ninety_percent(&p, OXCOW_OPEN_RDWR | OXCOW_OPEN_DISCARD_UNMAP, &before, &after);
    /* 8 MiB of data is 16384 blocks; 90 % of it goes. Metadata stays. */
    CHECK(before >= 16384);
    CHECK(after <= before - 16384 * 85 / 100);
    pair_finish(&p);

    REQUIRE(pair_create(&p, 16 * MiB) == 0);
    discard_ninety_percent(&p, OXCOW_OPEN_RDWR, &before, &after);
    CHECK(after >= before - 64);
    /* The flag can be switched on by a reopen; the freed clusters of later discards are
     * punched. */
    CHECK_EQ(oxcow_reopen(p.img, OXCOW_OPEN_RDWR | OXCOW_OPEN_DISCARD_UNMAP, NULL), 0);
    pair_write(&p, 12 * MiB, 2 * MiB, 9);
    CHECK_EQ(oxcow_flush(p.img), 0);
    before = host_blocks(p.qcow2);
    CHECK_EQ(oxcow_discard(p.img, 12 * MiB, 2 * MiB), 0);
    ref_zero(&p, 12 * MiB, 2 * MiB);
    CHECK_EQ(oxcow_flush(p.img), 0);
    CHECK(host_blocks(p.qcow2) <= before - 4096 * 9 / 10);
    pair_finish(&p);
}

/* After a flush, the file on disk is a complete, clean image even while still open. */
static void test_flush(void) {
    struct pair p;
    oxcow_image *ro;
    REQUIRE(pair_create(&p, 32 * MiB) == 0);
    pair_write(&p, 0, 3 * CL + 5, 1);
    pair_write(&p, 20 * MiB + 100, 2 * MiB, 2);
    CHECK_EQ(oxcow_flush(p.img), 0);
    CHECK_EQ(run("qemu-img check -q -U '%s' 1>&2", p.qcow2), 0);
    CHECK_EQ(run("qemu-img compare -q -U -f raw -F qcow2 '%s' '%s' 1>&2", p.raw, p.qcow2), 0);
    /* A second flush with nothing dirty is fine too. */
    CHECK_EQ(oxcow_flush(p.img), 0);
    pair_finish(&p);

    /* Flushing a read-only handle is a successful no-op. */
    ro = open_image(p.qcow2, 0);
    REQUIRE(ro != NULL);
    CHECK_EQ(oxcow_flush(ro), 0);
    CHECK_EQ(oxcow_close(ro), 0);
}

static void test_writethrough(void) {
    const char *path;
    oxcow_image *img;
    unsigned char buf[3000];
    scratch_dir();
    path = scratch_path("wt.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));
    img = open_image(path, OXCOW_OPEN_RDWR | OXCOW_OPEN_WRITETHROUGH);
    REQUIRE(img != NULL);
    memset(buf, 0x3c, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 2 * MiB + 1), 0);
    /* No flush: every write is already durable, metadata included. */
    CHECK_EQ(run("qemu-img check -q -U '%s' 1>&2", path), 0);
    CHECK_EQ(run("qemu-io -r -U -f qcow2 -c 'read -P 0x3c %llu 3000' '%s' >/dev/null",
                 (unsigned long long)(2 * MiB + 1), path),
             0);
    CHECK_EQ(oxcow_close(img), 0);
}

/* Walks block_status over the whole image: extents must tile it exactly. Returns the number
 * of bytes reported as holding data of this image, and checks that they lie in
 * [data_lo, data_hi). */
static uint64_t walk_extents(oxcow_image *img, uint64_t size, uint64_t data_lo, uint64_t data_hi) {
    uint64_t off = 0, data = 0;
    int n = 0;
    while (off < size) {
        oxcow_extent e;
        memset(&e, 0xff, sizeof e);
        if (oxcow_block_status(img, off, size - off, &e) != 0) {
            fprintf(stderr, "block_status(%" PRIu64 ") failed\n", off);
            g_failures++;
            return data;
        }
        CHECK_EQ(e.offset, off);
        CHECK(e.length >= 1 && e.length <= size - off);
        CHECK_EQ(e.reserved, 0);
        if (e.length == 0 || e.length > size - off)
            return data;
        if ((e.flags & OXCOW_EXTENT_ALLOCATED) && !(e.flags & OXCOW_EXTENT_ZERO)) {
            CHECK(off >= data_lo && off + e.length <= data_hi);
            CHECK(e.host_offset != 0);
            data += e.length;
        } else {
            CHECK_EQ(e.host_offset, 0);
        }
        off += e.length;
        if (++n > 100000) {
            fprintf(stderr, "block_status walk does not terminate\n");
            g_failures++;
            break;
        }
    }
    return data;
}

static void test_block_status(void) {
    const char *path;
    oxcow_image *img;
    oxcow_extent e, sentinel;
    unsigned char data[1000], host[1000];
    const uint64_t size = 16 * MiB;
    scratch_dir();
    path = scratch_path("bs.qcow2");
    REQUIRE_OK(create_default(path, size));
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);

    /* A fresh image holds no data. */
    CHECK_EQ(walk_extents(img, size, 0, 0), 0);
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(img, 0, size, &e), 0);
    CHECK(!(e.flags & OXCOW_EXTENT_ALLOCATED));
    CHECK(!(e.flags & OXCOW_EXTENT_BACKING));

    /* Writing into cluster 3 allocates exactly that cluster. */
    fill_pattern(data, sizeof data, 0, 5);
    CHECK_EQ(oxcow_pwrite(img, data, sizeof data, 3 * CL + 100), 0);
    CHECK_EQ(walk_extents(img, size, 3 * CL, 4 * CL), CL);
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(img, 3 * CL, CL, &e), 0);
    CHECK_EQ(e.offset, 3 * CL);
    CHECK_EQ(e.length, CL);
    CHECK_EQ(e.flags, OXCOW_EXTENT_ALLOCATED);
    CHECK(e.host_offset != 0 && e.host_offset % CL == 0);
    /* host_offset really points at the data in the image file. */
    CHECK_EQ(oxcow_flush(img), 0);
    CHECK_EQ(read_file_at(path, host, sizeof host, (off_t)(e.host_offset + 100)), 0);
    CHECK(memcmp(host, data, sizeof data) == 0);
    /* An extent starting inside the cluster carries the matching host offset. */
    {
        oxcow_extent inner;
        memset(&inner, 0, sizeof inner);
        CHECK_EQ(oxcow_block_status(img, 3 * CL + 100, 10, &inner), 0);
        CHECK_EQ(inner.offset, 3 * CL + 100);
        CHECK_EQ(inner.length, 10);
        CHECK_EQ(inner.host_offset, e.host_offset + 100);
    }

    /* The range before the cluster: not allocated, ends where the data starts. */
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(img, 0, size, &e), 0);
    CHECK(!(e.flags & OXCOW_EXTENT_ALLOCATED));
    CHECK(e.length <= 3 * CL);

    /* count 0, ranges past the end, NULL out: -EINVAL and *out untouched. */
    memset(&sentinel, 0x5a, sizeof sentinel);
    e = sentinel;
    CHECK_EQ(oxcow_block_status(img, 0, 0, &e), -EINVAL);
    CHECK_EQ(oxcow_block_status(img, size, 1, &e), -EINVAL);
    CHECK_EQ(oxcow_block_status(img, size - 1, 2, &e), -EINVAL);
    CHECK_EQ(oxcow_block_status(img, UINT64_MAX, 2, &e), -EINVAL);
    CHECK(memcmp(&e, &sentinel, sizeof e) == 0);
    CHECK_EQ(oxcow_block_status(img, 0, 1, NULL), -EINVAL);
    CHECK_EQ(oxcow_close(img), 0);
}

static void make_compressed(const char *raw, const char *out, const char *ctype, size_t len) {
    unsigned char *buf = (unsigned char *)malloc(len);
    size_t i;
    REQUIRE(buf != NULL);
    for (i = 0; i < len; i++) /* compressible but not trivial */
        buf[i] = (unsigned char)("oxcow compresses well "[i % 22] + (i / 4096) % 7);
    memset(buf + len / 2, 0, 3 * CL); /* some zero clusters too */
    REQUIRE(write_file_at(raw, buf, len, 0) == 0);
    free(buf);
    REQUIRE(run("qemu-img convert -q -c -f raw -O qcow2 -o compression_type=%s '%s' '%s' 1>&2",
                ctype, raw, out) == 0);
}

static void test_compressed(void) {
    static const char *const types[] = {"zlib", "zstd"};
    size_t t;
    for (t = 0; t < 2; t++) {
        const char *raw, *q;
        oxcow_image *img;
        oxcow_extent e;
        oxcow_info info;
        scratch_dir();
        raw = scratch_path("c.raw");
        q = scratch_path("c.qcow2");
        make_compressed(raw, q, types[t], 2 * MiB);
        img = open_image(q, 0);
        REQUIRE(img != NULL);
        oxcow_info_init(&info);
        CHECK_EQ(oxcow_get_info(img, &info), 0);
        CHECK_EQ(info.compression_type, t == 0 ? OXCOW_COMPRESSION_DEFLATE
                                               : OXCOW_COMPRESSION_ZSTD);
        compare_with_ref(img, raw, 2 * MiB);
        memset(&e, 0, sizeof e);
        CHECK_EQ(oxcow_block_status(img, 0, CL, &e), 0);
        CHECK_EQ(e.flags, OXCOW_EXTENT_ALLOCATED | OXCOW_EXTENT_COMPRESSED);
        CHECK_EQ(e.host_offset, 0);
        CHECK_EQ(e.length, CL);
        CHECK_EQ(oxcow_close(img), 0);
    }
}

/* Compressed writes from C: packed clusters that QEMU reads back identically, bad shapes
 * refused with -EINVAL. */
static void test_write_compressed(void) {
    const char *q, *raw;
    oxcow_image *img;
    oxcow_extent e;
    unsigned char *buf = malloc(CL);
    unsigned i, c;
    REQUIRE(buf != NULL);
    scratch_dir();
    q = scratch_path("wc.qcow2");
    raw = scratch_path("wc.raw");
    REQUIRE_OK(create_default(q, 16 * CL));
    img = open_image(q, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    for (c = 0; c < 16; c++) {
        for (i = 0; i < CL; i++)
            buf[i] = (unsigned char)((i / 700) ^ c);
        CHECK_EQ(oxcow_write_compressed(img, buf, CL, (uint64_t)c * CL), 0);
        CHECK_EQ(write_file_at(raw, buf, CL, (off_t)c * CL), 0);
    }
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(img, 3 * CL, CL, &e), 0);
    CHECK_EQ(e.flags, OXCOW_EXTENT_ALLOCATED | OXCOW_EXTENT_COMPRESSED);
    CHECK_EQ(oxcow_write_compressed(img, buf, CL, 512), -EINVAL);
    CHECK_EQ(oxcow_write_compressed(img, buf, CL - 1, 0), -EINVAL);
    CHECK_EQ(oxcow_write_compressed(img, NULL, CL, 0), -EINVAL);
    CHECK_EQ(oxcow_write_compressed(NULL, buf, CL, 0), -EINVAL);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(q), 0);
    CHECK_EQ(qemu_compare_raw(raw, q), 0);
    free(buf);
}

/* Data QEMU wrote (including zero clusters) reads back identically through oxcow. */
static void test_reads_qemu_writes(void) {
    const char *q;
    oxcow_image *img;
    unsigned char buf[2 * CL];
    oxcow_extent e;
    scratch_dir();
    q = scratch_path("q.qcow2");
    REQUIRE_OK(create_default(q, 8 * MiB));
    REQUIRE(run("qemu-io -f qcow2 -c 'write -P 0x5a 65536 131072' -c 'write -z 65536 65536' "
                "-c 'write -P 0xa5 1000 10' '%s' >/dev/null",
                q) == 0);
    img = open_image(q, 0);
    REQUIRE(img != NULL);
    memset(buf, 0xee, sizeof buf);
    CHECK_EQ(oxcow_pread(img, buf, sizeof buf, CL), 0);
    CHECK(all_bytes(buf, CL, 0));
    CHECK(all_bytes(buf + CL, CL, 0x5a));
    CHECK_EQ(oxcow_pread(img, buf, 1020, 0), 0);
    CHECK(all_bytes(buf, 1000, 0));
    CHECK(all_bytes(buf + 1000, 10, 0xa5));
    CHECK(all_bytes(buf + 1010, 10, 0));
    memset(&e, 0, sizeof e);
    CHECK_EQ(oxcow_block_status(img, CL, CL, &e), 0);
    CHECK(e.flags & OXCOW_EXTENT_ZERO);
    CHECK_EQ(oxcow_close(img), 0);
}

static void test_zero_length(void) {
    struct pair p;
    REQUIRE(pair_create(&p, 4 * MiB) == 0);
    CHECK_EQ(oxcow_pread(p.img, NULL, 0, 0), 0);
    CHECK_EQ(oxcow_pwrite(p.img, NULL, 0, 0), 0);
    CHECK_EQ(oxcow_pread(p.img, NULL, 0, 4 * MiB), 0);
    CHECK_EQ(oxcow_pwrite(p.img, NULL, 0, 4 * MiB), 0);
    CHECK_EQ(oxcow_preadv(p.img, NULL, 0, 100), 0);
    CHECK_EQ(oxcow_pwritev(p.img, NULL, 0, 100), 0);
    CHECK_EQ(oxcow_write_zeroes(p.img, 4 * MiB, 0, OXCOW_ZERO_MAY_UNMAP), 0);
    CHECK_EQ(oxcow_discard(p.img, 4 * MiB, 0), 0);
    {
        unsigned char b = 1;
        CHECK_EQ(oxcow_pwrite(p.img, &b, 0, 12), 0);
    }
    pair_finish(&p);
    /* Nothing was allocated. */
    {
        oxcow_image *img = open_image(p.qcow2, 0);
        REQUIRE(img != NULL);
        CHECK_EQ(walk_extents(img, 4 * MiB, 0, 0), 0);
        CHECK_EQ(oxcow_close(img), 0);
    }
}

/* Open flags: FORCE_SHARE, lock conflicts with other handles and with QEMU, DIRECT. */
static void test_open_flags_and_locking(void) {
    const char *path;
    oxcow_image *w, *other = NULL;
    oxcow_error *err = NULL;
    int rc;
    scratch_dir();
    path = scratch_path("lock.qcow2");
    REQUIRE_OK(create_default(path, 8 * MiB));

    /* RDWR together with FORCE_SHARE is a contradiction. */
    rc = oxcow_open(path, OXCOW_OPEN_RDWR | OXCOW_OPEN_FORCE_SHARE, NULL, &other, &err);
    CHECK_ERR(rc, err, EINVAL);
    CHECK(other == NULL);

    w = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(w != NULL);
    /* A read-only share-ignoring open works while a writer exists. */
    other = open_image(path, OXCOW_OPEN_FORCE_SHARE);
    CHECK(other != NULL);
    CHECK_EQ(oxcow_close(other), 0);
    other = NULL;
    /* A second writer is refused with -EAGAIN (QEMU-compatible OFD locks). */
    err = NULL;
    rc = oxcow_open(path, OXCOW_OPEN_RDWR, NULL, &other, &err);
    CHECK_ERR(rc, err, EAGAIN);
    if (rc == 0)
        oxcow_close(other);
    other = NULL;
    /* So is a plain reader, like qemu-img without -U. */
    err = NULL;
    rc = oxcow_open(path, 0, NULL, &other, &err);
    CHECK_ERR(rc, err, EAGAIN);
    if (rc == 0)
        oxcow_close(other);
    /* QEMU sees the lock too. */
    CHECK(run("qemu-img info '%s' >/dev/null 2>&1", path) != 0);
    CHECK_EQ(oxcow_close(w), 0);
    /* ... and after close the image is free again. */
    CHECK_EQ(run("qemu-img info '%s' >/dev/null 2>&1", path), 0);

    /* O_DIRECT: aligned and unaligned buffers, offsets and lengths all work. */
    other = NULL;
    err = NULL;
    rc = oxcow_open(path, OXCOW_OPEN_RDWR | OXCOW_OPEN_DIRECT, NULL, &other, &err);
    CHECK_EQ(rc, 0);
    CHECK(err == NULL);
    if (rc == 0) {
        void *buf = NULL;
        unsigned char odd[1001];
        REQUIRE(posix_memalign(&buf, 4096, 8192) == 0);
        memset(buf, 0x42, 8192);
        CHECK_EQ(oxcow_pwrite(other, buf, 8192, 65536), 0);
        memset(odd, 0x43, sizeof odd);
        CHECK_EQ(oxcow_pwrite(other, odd + 1, 999, 65536 + 8192 + 3), 0);
        memset(buf, 0, 8192);
        CHECK_EQ(oxcow_pread(other, buf, 8192, 65536), 0);
        CHECK(all_bytes((unsigned char *)buf, 8192, 0x42));
        memset(odd, 0, sizeof odd);
        CHECK_EQ(oxcow_pread(other, odd + 1, 999, 65536 + 8192 + 3), 0);
        CHECK(all_bytes(odd + 1, 999, 0x43));
        free(buf);
        CHECK_EQ(oxcow_close(other), 0);
        CHECK_EQ(qemu_check(path), 0);
    } else {
        oxcow_error_free(err);
    }
}

/* Open options struct: accepted with defaults and with cache sizes; a version-2 caller
 * (struct_size 24) keeps working and never has the version-3 fields read. */
static void test_open_options(void) {
    const char *path;
    oxcow_open_options oo;
    oxcow_image *img = NULL;
    char buf[4096], back[4096];
    scratch_dir();
    path = scratch_path("oo.qcow2");
    REQUIRE_OK(create_default(path, MiB));
    oxcow_open_options_init(&oo);
    CHECK_EQ(oo.struct_size, sizeof oo);
    CHECK_EQ(oo.refcount_cache_size, 0);
    CHECK_EQ(oo.l2_slice_size, 0);
    CHECK_EQ(oo.cache_clean_interval, 0);
    oo.cache_size = 4 * MiB;
    CHECK_EQ(oxcow_open(path, OXCOW_OPEN_RDWR, &oo, &img, NULL), 0);
    CHECK(img != NULL);
    CHECK_EQ(oxcow_close(img), 0);

    /* Smallest caches: two 512-byte slices each, constant eviction; data still round-trips. */
    oo.cache_size = 1;
    oo.refcount_cache_size = 1;
    oo.l2_slice_size = 512;
    img = NULL;
    CHECK_EQ(oxcow_open(path, OXCOW_OPEN_RDWR, &oo, &img, NULL), 0);
    REQUIRE(img != NULL);
    memset(buf, 0x5a, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, 512 * 1024), 0);
    CHECK_EQ(oxcow_pread(img, back, sizeof back, 512 * 1024), 0);
    CHECK(memcmp(buf, back, sizeof buf) == 0);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);

    /* Not a power of two: refused like qemu's l2-cache-entry-size. */
    oo.l2_slice_size = 1000;
    img = NULL;
    CHECK_EQ(oxcow_open(path, 0, &oo, &img, NULL), -EINVAL);
    CHECK(img == NULL);
    /* A version-2 caller: the bad slice size past its struct_size is never read. */
    oo.struct_size = 24;
    CHECK_EQ(oxcow_open(path, 0, &oo, &img, NULL), 0);
    CHECK(img != NULL);
    CHECK_EQ(oxcow_close(img), 0);

    /* Version 4: idle cache entries dropped after 1 s, or never; data unchanged either way. */
    oxcow_open_options_init(&oo);
    oo.cache_clean_interval = 1;
    img = NULL;
    CHECK_EQ(oxcow_open(path, 0, &oo, &img, NULL), 0);
    REQUIRE(img != NULL);
    CHECK_EQ(oxcow_pread(img, back, sizeof back, 512 * 1024), 0);
    CHECK(memcmp(buf, back, sizeof buf) == 0);
    CHECK_EQ(oxcow_close(img), 0);
    oo.cache_clean_interval = OXCOW_CACHE_CLEAN_NEVER;
    img = NULL;
    CHECK_EQ(oxcow_open(path, 0, &oo, &img, NULL), 0);
    CHECK(img != NULL);
    CHECK_EQ(oxcow_close(img), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"roundtrip", test_roundtrip},
        {"vectored", test_vectored},
        {"write_zeroes", test_write_zeroes},
        {"discard", test_discard},
        {"discard_unmap", test_discard_unmap},
        {"flush", test_flush},
        {"writethrough", test_writethrough},
        {"block_status", test_block_status},
        {"compressed", test_compressed},
        {"write_compressed", test_write_compressed},
        {"reads_qemu_writes", test_reads_qemu_writes},
        {"zero_length", test_zero_length},
        {"open_flags_and_locking", test_open_flags_and_locking},
        {"open_options", test_open_options},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
