/*
 * Incremental backup with a persistent dirty bitmap.
 *
 *   incremental_backup IMAGE BITMAP TARGET
 *
 * TARGET is a raw copy of IMAGE's guest data made when BITMAP was last cleared (a full backup,
 * e.g. `qemu-img convert -O raw IMAGE TARGET` right after `qemu-img bitmap --add IMAGE
 * BITMAP`). This program copies every range written since then into TARGET, so that TARGET
 * equals IMAGE again, and restarts BITMAP from that point. backup() is safe while other
 * threads keep writing through the same handle (a hypervisor's I/O threads): a second bitmap,
 * BITMAP.next, records the writes made during the copy and is merged back at the end, so no
 * write is ever missed; a run that failed half-way is simply run again.
 *
 * Build: cc incremental_backup.c -Iinclude target/release/liboxcow.a -lpthread -ldl -lm
 */
#define _POSIX_C_SOURCE 200809L
#include <oxcow.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* Copies [off, off + len) of the image's guest data to the same offset of fd. */
static int copy_range(oxcow_image *img, int fd, uint64_t off, uint64_t len) {
    static char buf[1 << 20];
    while (len > 0) {
        size_t n = len < sizeof buf ? (size_t)len : sizeof buf;
        int rc = oxcow_pread(img, buf, n, off);
        if (rc < 0)
            return rc;
        if (pwrite(fd, buf, n, (off_t)off) != (ssize_t)n)
            return -1;
        off += n;
        len -= n;
    }
    return 0;
}

/* Freezes `bm`, copies its dirty ranges to fd, and restarts it from the frozen point. */
static int backup(oxcow_image *img, const char *bm, int fd, oxcow_error **err) {
    char next[1100];
    oxcow_info info;
    oxcow_extent e;
    uint64_t off;
    int rc;
    snprintf(next, sizeof next, "%s.next", bm);
    oxcow_info_init(&info);
    if ((rc = oxcow_get_info(img, &info)) < 0)
        return rc;
    /* Freeze: `next` records writes from here on, then `bm` stops changing. -EEXIST means an
     * interrupted run left `next` behind: it holds every write since that freeze, so go on. */
    rc = oxcow_bitmap_add(img, next, 0, 0, NULL);
    if ((rc < 0 && rc != -EEXIST) || (rc = oxcow_bitmap_disable(img, bm, err)) < 0)
        return rc;
    for (off = 0; off < info.virtual_size; off += e.length) {
        if ((rc = oxcow_bitmap_status(img, bm, off, info.virtual_size - off, &e)) < 0)
            return rc;
        if ((e.flags & OXCOW_EXTENT_DIRTY) && (rc = copy_range(img, fd, off, e.length)) < 0)
            return rc;
    }
    if (fsync(fd) != 0)
        return -1;
    /* `bm` restarts at the freeze: empty, recording, plus what `next` saw during the copy. */
    if ((rc = oxcow_bitmap_clear(img, bm, err)) < 0 ||
        (rc = oxcow_bitmap_enable(img, bm, err)) < 0 ||
        (rc = oxcow_bitmap_merge(img, bm, next, err)) < 0)
        return rc;
    return oxcow_bitmap_remove(img, next, err);
}

/* ctests/test_bitmap.c includes this file for backup() with INCREMENTAL_BACKUP_NO_MAIN. */
#ifndef INCREMENTAL_BACKUP_NO_MAIN
int main(int argc, char **argv) {
    oxcow_error *err = NULL;
    oxcow_image *img = NULL;
    int fd, rc;
    if (argc != 4) {
        fprintf(stderr, "usage: %s IMAGE BITMAP TARGET\n", argv[0]);
        return 2;
    }
    fd = open(argv[3], O_WRONLY);
    if (fd < 0) {
        perror(argv[3]);
        return 1;
    }
    rc = oxcow_open(argv[1], OXCOW_OPEN_RDWR, NULL, &img, &err);
    if (rc == 0)
        rc = backup(img, argv[2], fd, &err);
    if (oxcow_close(img) < 0 && rc == 0)
        rc = -1;
    close(fd);
    if (rc != 0) {
        fprintf(stderr, "backup failed: %s (%d)\n", err ? oxcow_error_message(err) : "I/O error",
                rc);
        oxcow_error_free(err);
        return 1;
    }
    return 0;
}
#endif
