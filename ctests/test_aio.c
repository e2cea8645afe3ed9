/*
 * The asynchronous completion API driven the way an event loop drives it: requests submitted
 * with callbacks, a poll() loop on the queue's eventfd, completions collected with
 * oxcow_aio_poll() on this thread. Results are checked against a byte model and qemu-img.
 */
#include "common.h"

#include <poll.h>
#include <sys/uio.h>

#define MiB (1ull << 20)
#define KiB (1ull << 10)
#define SIZE (8 * MiB)
#define NREQ 600

struct req {
    unsigned char *buf;
    size_t len;
    uint64_t off;
    uint64_t cookie;
    int done;
    int result;
};

static int g_callbacks;

static void on_done(void *opaque, uint64_t cookie, int result, const oxcow_error *err) {
    struct req *r = opaque;
    g_callbacks++;
    CHECK(r->done == 0);
    CHECK_EQ(cookie, r->cookie);
    r->done = 1;
    r->result = result;
    if (result < 0) {
        CHECK(err != NULL);
        CHECK_EQ(oxcow_error_errno(err), -result);
        CHECK(oxcow_error_message(err)[0] != '\0');
    } else {
        CHECK(err == NULL);
    }
}

/* Waits on the eventfd with poll(2), then collects what is ready. Returns completions. */
static int wait_and_collect(oxcow_aio_queue *q) {
    struct pollfd p = {.fd = oxcow_aio_queue_fd(q), .events = POLLIN, .revents = 0};
    int n = poll(&p, 1, 10000);
    CHECK_EQ(n, 1);
    n = oxcow_aio_poll(q, 0, 0);
    CHECK(n > 0);
    return n < 0 ? 0 : n;
}

static oxcow_aio_queue *new_queue(oxcow_image *img, uint32_t depth, uint32_t flags) {
    oxcow_aio_options o;
    oxcow_aio_queue *q = NULL;
    oxcow_error *err = NULL;
    oxcow_aio_options_init(&o);
    o.depth = depth;
    o.flags = flags;
    if (oxcow_aio_queue_new(img, &o, &q, &err) != 0) {
        fprintf(stderr, "oxcow_aio_queue_new: %s\n", oxcow_error_message(err));
        oxcow_error_free(err);
        return NULL;
    }
    return q;
}

/* Random writes, 32 in flight, then vectored reads of everything, then a flush: the image
 * equals the model, qemu-img agrees, and the eventfd is quiet when nothing is left. */
static void run_poll_loop(uint32_t flags) {
    const char *path = scratch_path("aio.qcow2"), *raw = scratch_path("aio.raw");
    unsigned char *model = calloc(SIZE, 1);
    struct req *reqs = calloc(NREQ, sizeof *reqs);
    oxcow_image *img;
    oxcow_aio_queue *q;
    int next = 0, completed = 0, i;
    unsigned seed = 7;
    REQUIRE(model && reqs);
    REQUIRE(create_default(path, SIZE) == 0);
    REQUIRE((img = open_image(path, OXCOW_OPEN_RDWR)) != NULL);
    REQUIRE((q = new_queue(img, 64, flags)) != NULL);
    CHECK(oxcow_aio_queue_backend(q) == OXCOW_AIO_BACKEND_THREADS ||
          oxcow_aio_queue_backend(q) == OXCOW_AIO_BACKEND_IO_URING);
    if (flags & OXCOW_AIO_FORCE_THREADS)
        CHECK_EQ(oxcow_aio_queue_backend(q), OXCOW_AIO_BACKEND_THREADS);
    /* Writes: disjoint 4 KiB slots so the model does not depend on completion order. */
    while (completed < NREQ) {
        while (next < NREQ && oxcow_aio_in_flight(q) < 32) {
            struct req *r = &reqs[next];
            r->off = ((uint64_t)next * 4 * KiB * 3) % SIZE;
            r->len = 4 * KiB - (next % 3) * 512;
            r->buf = malloc(r->len);
            fill_pattern(r->buf, r->len, r->off, seed + next);
            memcpy(model + r->off, r->buf, r->len);
            CHECK_EQ(oxcow_aio_pwrite(q, r->buf, r->len, r->off, on_done, r, &r->cookie), 0);
            next++;
        }
        completed += wait_and_collect(q);
    }
    for (i = 0; i < NREQ; i++) {
        CHECK(reqs[i].done);
        CHECK_EQ(reqs[i].result, 0);
        free(reqs[i].buf);
    }
    CHECK_EQ(oxcow_aio_in_flight(q), 0);
    {
        struct pollfd p = {.fd = oxcow_aio_queue_fd(q), .events = POLLIN, .revents = 0};
        CHECK_EQ(poll(&p, 1, 0), 0);
    }
    /* Vectored reads of the whole disk, 1 MiB each in two iovecs. */
    {
        unsigned char *back = malloc(SIZE);
        struct iovec iov[SIZE / MiB][2];
        struct req rr[SIZE / MiB];
        memset(rr, 0, sizeof rr);
        for (i = 0; i < (int)(SIZE / MiB); i++) {
            iov[i][0].iov_base = back + i * MiB;
            iov[i][0].iov_len = 3000;
            iov[i][1].iov_base = back + i * MiB + 3000;
            iov[i][1].iov_len = MiB - 3000;
            CHECK_EQ(oxcow_aio_preadv(q, iov[i], 2, i * MiB, on_done, &rr[i], &rr[i].cookie), 0);
        }
        for (completed = 0; completed < (int)(SIZE / MiB);)
            completed += wait_and_collect(q);
        for (i = 0; i < (int)(SIZE / MiB); i++)
            CHECK_EQ(rr[i].result, 0);
        CHECK(memcmp(back, model, SIZE) == 0);
        free(back);
    }
    {
        struct req f = {0};
        CHECK_EQ(oxcow_aio_flush(q, on_done, &f, &f.cookie), 0);
        CHECK_EQ(oxcow_aio_poll(q, 1, -1), 1);
        CHECK_EQ(f.result, 0);
    }
    oxcow_aio_queue_free(q);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(write_file_at(raw, model, SIZE, 0), 0);
    CHECK_EQ(qemu_compare_raw(raw, path), 0);
    CHECK_EQ(qemu_check(path), 0);
    free(model);
    free(reqs);
}

static void test_poll_loop(void) {
    run_poll_loop(0);
}

static void test_poll_loop_threads(void) {
    run_poll_loop(OXCOW_AIO_FORCE_THREADS);
}

/* Overwrites of written clusters (the io_uring path where available), each callback
 * submitting the next one: a chain of CHAINS requests in flight, driven by the poll() loop
 * (requests submitted by callbacks are handed to the kernel after the last callback). */
#define CHAINS 16
#define CHAIN_LEN 40

struct chain {
    oxcow_aio_queue *q;
    unsigned char *buf;
    int index, step, done;
};

static uint64_t chain_offset(int index, int step) {
    return ((uint64_t)step * CHAINS + (uint64_t)index) * 4 * KiB % (4 * MiB);
}

static void on_chain(void *opaque, uint64_t cookie, int result, const oxcow_error *err) {
    struct chain *c = opaque;
    (void)cookie;
    (void)err;
    CHECK_EQ(result, 0);
    if (++c->step == CHAIN_LEN) {
        c->done = 1;
        return;
    }
    memset(c->buf, 0x40 + c->index, 4 * KiB);
    CHECK_EQ(oxcow_aio_pwrite(c->q, c->buf, 4 * KiB, chain_offset(c->index, c->step), on_chain,
                              c, NULL),
             0);
}

static void test_overwrite_chains(void) {
    const char *path = scratch_path("chain.qcow2");
    struct chain chains[CHAINS];
    unsigned char *fill = malloc(4 * MiB), *back = malloc(4 * KiB);
    oxcow_image *img;
    oxcow_aio_queue *q;
    int i, done = 0, step;
    REQUIRE(fill && back);
    memset(fill, 0x11, 4 * MiB);
    REQUIRE(create_default(path, SIZE) == 0);
    REQUIRE((img = open_image(path, OXCOW_OPEN_RDWR)) != NULL);
    CHECK_EQ(oxcow_pwrite(img, fill, 4 * MiB, 0), 0);
    CHECK_EQ(oxcow_pread(img, fill, 4 * MiB, 0), 0);
    REQUIRE((q = new_queue(img, 64, 0)) != NULL);
    for (i = 0; i < CHAINS; i++) {
        chains[i] = (struct chain){.q = q, .index = i};
        REQUIRE(posix_memalign((void **)&chains[i].buf, 4096, 4 * KiB) == 0);
        memset(chains[i].buf, 0x40 + i, 4 * KiB);
        CHECK_EQ(oxcow_aio_pwrite(q, chains[i].buf, 4 * KiB, chain_offset(i, 0), on_chain,
                                  &chains[i], NULL),
                 0);
    }
    while (done < CHAINS * CHAIN_LEN)
        done += wait_and_collect(q);
    CHECK_EQ(oxcow_aio_in_flight(q), 0);
    oxcow_aio_queue_free(q);
    for (i = 0; i < CHAINS; i++) {
        CHECK(chains[i].done);
        for (step = 0; step < CHAIN_LEN; step++) {
            CHECK_EQ(oxcow_pread(img, back, 4 * KiB, chain_offset(i, step)), 0);
            CHECK(back[0] == 0x40 + i && back[4095] == 0x40 + i);
        }
        free(chains[i].buf);
    }
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
    free(fill);
    free(back);
}

/* Errors at submission (nothing queued, no callback) and in completions (with message). */
static void test_errors(void) {
    const char *path = scratch_path("err.qcow2");
    unsigned char buf[4096] = {0}, l1[8];
    oxcow_image *img;
    oxcow_aio_queue *q;
    oxcow_aio_options o;
    oxcow_error *err = NULL;
    struct req r = {0};
    uint64_t cookie = 99;
    int callbacks_before = g_callbacks;
    REQUIRE(create_default(path, 1 * MiB) == 0);
    REQUIRE((img = open_image(path, OXCOW_OPEN_RDWR)) != NULL);
    CHECK_ERR(oxcow_aio_queue_new(NULL, NULL, &q, &err), err, EINVAL);
    err = NULL;
    CHECK_ERR(oxcow_aio_queue_new(img, NULL, NULL, &err), err, EINVAL);
    err = NULL;
    oxcow_aio_options_init(&o);
    o.flags = 0x100;
    CHECK_ERR(oxcow_aio_queue_new(img, &o, &q, &err), err, EINVAL);
    err = NULL;
    o.flags = 0;
    o.depth = 70000;
    CHECK_ERR(oxcow_aio_queue_new(img, &o, &q, &err), err, EINVAL);
    err = NULL;
    o.struct_size = 4;
    CHECK_ERR(oxcow_aio_queue_new(img, &o, &q, &err), err, EINVAL);
    CHECK_EQ(oxcow_aio_queue_fd(NULL), -EINVAL);
    CHECK_EQ(oxcow_aio_in_flight(NULL), -EINVAL);
    CHECK_EQ(oxcow_aio_queue_backend(NULL), -EINVAL);
    CHECK_EQ(oxcow_aio_poll(NULL, 0, 0), -EINVAL);
    CHECK_EQ(oxcow_aio_pread(NULL, buf, 1, 0, on_done, &r, NULL), -EINVAL);
    oxcow_aio_queue_free(NULL);
    REQUIRE((q = new_queue(img, 2, 0)) != NULL);
    CHECK_EQ(oxcow_aio_poll(q, 0, -1), 0); /* nothing in flight: at once */
    CHECK_EQ(oxcow_aio_poll(q, 0, -2), -EINVAL);
    CHECK_EQ(oxcow_aio_pread(q, buf, sizeof buf, 1 * MiB - 512, on_done, &r, &cookie), -EINVAL);
    CHECK_EQ(oxcow_aio_pread(q, NULL, 1, 0, on_done, &r, &cookie), -EINVAL);
    CHECK_EQ(oxcow_aio_write_zeroes(q, 0, 512, 0x80, on_done, &r, &cookie), -EINVAL);
    CHECK_EQ(oxcow_aio_discard(q, UINT64_MAX, 2, on_done, &r, &cookie), -EINVAL);
    CHECK_EQ(oxcow_aio_preadv(q, NULL, 1, 0, on_done, &r, &cookie), -EINVAL);
    CHECK_EQ(cookie, 99);
    /* Depth 2: the third submission is refused until a poll. */
    CHECK_EQ(oxcow_aio_pwrite(q, buf, sizeof buf, 0, NULL, NULL, NULL), 0);
    CHECK_EQ(oxcow_aio_write_zeroes(q, 8192, 512, OXCOW_ZERO_MAY_UNMAP, NULL, NULL, NULL), 0);
    CHECK_EQ(oxcow_aio_flush(q, on_done, &r, &cookie), -EBUSY);
    CHECK_EQ(oxcow_aio_poll(q, 0, -1) + oxcow_aio_poll(q, 0, -1), 2);
    CHECK_EQ(g_callbacks, callbacks_before); /* NULL callbacks are not called */
    oxcow_aio_queue_free(q);
    CHECK_EQ(oxcow_close(img), 0);
    /* Read-only: writes refused at once, reads fine; a damaged L1 entry fails the read in
     * its completion with the synchronous call's errno and a message. */
    CHECK_EQ(read_file_at(path, l1, 8, 0x28), 0); /* l1_table_offset */
    {
        uint64_t l1off = 0, bad = 0x8000000000000200ull;
        unsigned char be[8];
        for (int k = 0; k < 8; k++)
            l1off = (l1off << 8) | l1[k];
        for (int k = 0; k < 8; k++)
            be[k] = (unsigned char)(bad >> (56 - 8 * k));
        CHECK_EQ(write_file_at(path, be, 8, (off_t)l1off), 0);
    }
    REQUIRE((img = open_image(path, 0)) != NULL);
    REQUIRE((q = new_queue(img, 0, 0)) != NULL);
    CHECK_EQ(oxcow_aio_pwrite(q, buf, 512, 0, on_done, &r, NULL), -EROFS);
    CHECK_EQ(oxcow_aio_discard(q, 0, 512, on_done, &r, NULL), -EROFS);
    CHECK_EQ(oxcow_aio_pread(q, buf, 512, 0, on_done, &r, &r.cookie), 0);
    CHECK_EQ(oxcow_aio_poll(q, 0, -1), 1);
    CHECK(r.result < 0); /* the damage is reported as the synchronous call reports it */
    CHECK_EQ(r.result, oxcow_pread(img, buf, 512, 0));
    oxcow_aio_queue_free(q);
    CHECK_EQ(oxcow_close(img), 0);
}

/* Freeing a queue with requests in flight waits for them and runs no callback; the writes
 * that ran are in the image. */
static void test_free_outstanding(void) {
    const char *path = scratch_path("free.qcow2");
    static unsigned char bufs[64][4096];
    oxcow_image *img;
    oxcow_aio_queue *q;
    int i, before = g_callbacks;
    REQUIRE(create_default(path, 4 * MiB) == 0);
    REQUIRE((img = open_image(path, OXCOW_OPEN_RDWR)) != NULL);
    REQUIRE((q = new_queue(img, 64, 0)) != NULL);
    for (i = 0; i < 64; i++) {
        memset(bufs[i], i + 1, sizeof bufs[i]);
        CHECK_EQ(oxcow_aio_pwrite(q, bufs[i], 4096, (uint64_t)i * 65536, on_done, NULL, NULL), 0);
    }
    oxcow_aio_queue_free(q);
    CHECK_EQ(g_callbacks, before);
    for (i = 0; i < 64; i++) {
        unsigned char b[4096];
        CHECK_EQ(oxcow_pread(img, b, sizeof b, (uint64_t)i * 65536), 0);
        CHECK(all_bytes(b, sizeof b, (unsigned char)(i + 1)));
    }
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"poll_loop", test_poll_loop},
        {"poll_loop_threads", test_poll_loop_threads},
        {"errors", test_errors},
        {"free_outstanding", test_free_outstanding},
        {"overwrite_chains", test_overwrite_chains},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
