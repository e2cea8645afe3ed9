/*
 * A minimal external consumer of liboxcow: creates (or opens) a qcow2 image, writes a pattern,
 * reads it back, and prints facts about the image and the library.
 *
 *   consumer IMAGE [SIZE_MIB]
 *
 * With a missing IMAGE, a new image of SIZE_MIB MiB (default 64) is created first. Prints
 * key=value lines (consumed by scripts/check-package.sh) and exits non-zero on any failure.
 */
#include <oxcow.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>

#define CHUNK (192 * 1024) /* spans several 64 KiB clusters, not cluster-aligned below */

static int report(const char *what, int rc, oxcow_error *err)
{
    if (err != NULL) {
        fprintf(stderr, "consumer: %s failed: %s (errno %d)\n", what, oxcow_error_message(err),
                oxcow_error_errno(err));
        oxcow_error_free(err);
    } else {
        fprintf(stderr, "consumer: %s failed: %s (%d)\n", what, strerror(-rc), rc);
    }
    return 1;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) {
        fprintf(stderr, "usage: %s IMAGE [SIZE_MIB]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    uint64_t size_mib = argc == 3 ? strtoull(argv[2], NULL, 10) : 64;

    printf("header_version_number=%d\n", OXCOW_VERSION_NUMBER);
    printf("version_number=%" PRIu32 "\n", oxcow_version_number());
    printf("version_string=%s\n", oxcow_version_string());
    if (oxcow_version_number() != OXCOW_VERSION_NUMBER) {
        fprintf(stderr, "consumer: header/library version mismatch\n");
        return 1;
    }

    oxcow_error *err = NULL;
    int rc;
    struct stat st;
    if (stat(path, &st) != 0) {
        oxcow_create_options copts;
        oxcow_create_options_init(&copts);
        copts.cluster_size = 65536;
        rc = oxcow_create(path, size_mib << 20, &copts, &err);
        if (rc != 0)
            return report("oxcow_create", rc, err);
        printf("created=%s\n", path);
    }

    oxcow_image *img = NULL;
    rc = oxcow_open(path, OXCOW_OPEN_RDWR, NULL, &img, &err);
    if (rc != 0)
        return report("oxcow_open", rc, err);

    oxcow_info info;
    oxcow_info_init(&info);
    rc = oxcow_get_info(img, &info);
    if (rc != 0) {
        oxcow_close(img);
        return report("oxcow_get_info", rc, NULL);
    }
    if (info.virtual_size < 2 * CHUNK) {
        fprintf(stderr, "consumer: image too small (%" PRIu64 " bytes)\n", info.virtual_size);
        oxcow_close(img);
        return 1;
    }

    static unsigned char wbuf[CHUNK], rbuf[CHUNK];
    for (size_t i = 0; i < CHUNK; i++)
        wbuf[i] = (unsigned char)((i * 7 + 3) ^ (i >> 9));
    const uint64_t off = 65536 + 4096; /* unaligned start: exercises copy-on-write edges */

    rc = oxcow_pwrite(img, wbuf, CHUNK, off);
    if (rc != 0) {
        oxcow_close(img);
        return report("oxcow_pwrite", rc, NULL);
    }
    /* Vectored write of the same pattern one chunk further on. */
    struct iovec wiov[3] = {
        {wbuf, 1000}, {wbuf + 1000, 70000}, {wbuf + 71000, CHUNK - 71000},
    };
    rc = oxcow_pwritev(img, wiov, 3, off + CHUNK);
    if (rc != 0) {
        oxcow_close(img);
        return report("oxcow_pwritev", rc, NULL);
    }
    rc = oxcow_flush(img);
    if (rc != 0) {
        oxcow_close(img);
        return report("oxcow_flush", rc, NULL);
    }
    for (int pass = 0; pass < 2; pass++) {
        memset(rbuf, 0, sizeof rbuf);
        rc = oxcow_pread(img, rbuf, CHUNK, off + (uint64_t)pass * CHUNK);
        if (rc != 0) {
            oxcow_close(img);
            return report("oxcow_pread", rc, NULL);
        }
        if (memcmp(rbuf, wbuf, CHUNK) != 0) {
            fprintf(stderr, "consumer: read-back mismatch (pass %d)\n", pass);
            oxcow_close(img);
            return 1;
        }
    }
    printf("readback=ok bytes=%d\n", 2 * CHUNK);

    /* Out-of-range requests fail with -EINVAL and change nothing. */
    rc = oxcow_pwrite(img, wbuf, 1, info.virtual_size);
    if (rc != -EINVAL) {
        fprintf(stderr, "consumer: write past the end returned %d, expected %d\n", rc, -EINVAL);
        oxcow_close(img);
        return 1;
    }

    oxcow_extent ext;
    rc = oxcow_block_status(img, off, CHUNK, &ext);
    if (rc != 0) {
        oxcow_close(img);
        return report("oxcow_block_status", rc, NULL);
    }
    printf("extent offset=%" PRIu64 " length=%" PRIu64 " allocated=%d zero=%d\n", ext.offset,
           ext.length, (ext.flags & OXCOW_EXTENT_ALLOCATED) != 0, (ext.flags & OXCOW_EXTENT_ZERO) != 0);

    oxcow_info_init(&info);
    rc = oxcow_get_info(img, &info);
    if (rc != 0) {
        oxcow_close(img);
        return report("oxcow_get_info", rc, NULL);
    }
    printf("virtual_size=%" PRIu64 "\n", info.virtual_size);
    printf("cluster_size=%" PRIu32 "\n", info.cluster_size);
    printf("qcow2_version=%" PRIu32 "\n", info.version);
    printf("refcount_bits=%" PRIu32 "\n", info.refcount_bits);
    printf("file_size=%" PRIu64 "\n", info.file_size);

    rc = oxcow_close(img);
    if (rc != 0)
        return report("oxcow_close", rc, NULL);
    printf("status=ok\n");
    return 0;
}
