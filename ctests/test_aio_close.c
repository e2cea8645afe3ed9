/*
 * oxcow_close() on a handle whose asynchronous queues are not all freed: -EBUSY, and the
 * handle stays open and usable (its queues too); once the last queue is freed it closes.
 */
#include "common.h"

#include <poll.h>

#define MiB (1ull << 20)

static int g_done;

static void on_done(void *opaque, uint64_t cookie, int result, const oxcow_error *err) {
    (void)opaque;
    (void)cookie;
    (void)err;
    CHECK_EQ(result, 0);
    g_done++;
}

static oxcow_aio_queue *new_queue(oxcow_image *img, uint32_t depth) {
    oxcow_aio_options o;
    oxcow_aio_queue *q = NULL;
    oxcow_error *err = NULL;
    oxcow_aio_options_init(&o);
    o.depth = depth;
    if (oxcow_aio_queue_new(img, &o, &q, &err) != 0) {
        fprintf(stderr, "oxcow_aio_queue_new: %s\n", oxcow_error_message(err));
        oxcow_error_free(err);
        return NULL;
    }
    return q;
}

/* Two live queues, one with a write in flight: close refuses until both are freed; the
 * handle and the queues keep working meanwhile. */
static void test_busy_until_every_queue_is_freed(void) {
    const char *path = scratch_path("busy.qcow2");
    static unsigned char buf[4096], back[4096];
    oxcow_image *img;
    oxcow_aio_queue *q1, *q2;
    REQUIRE(create_default(path, 4 * MiB) == 0);
    REQUIRE((img = open_image(path, OXCOW_OPEN_RDWR)) != NULL);
    REQUIRE((q1 = new_queue(img, 8)) != NULL);
    REQUIRE((q2 = new_queue(img, 8)) != NULL);
    memset(buf, 0x5a, sizeof buf);
    CHECK_EQ(oxcow_aio_pwrite(q1, buf, sizeof buf, 65536, on_done, NULL, NULL), 0);
    CHECK_EQ(oxcow_close(img), -EBUSY);
    /* Nothing changed: the write completes, the handle reads it back. */
    while (g_done < 1) {
        CHECK(oxcow_aio_poll(q1, 0, -1) >= 0);
    }
    CHECK_EQ(oxcow_pread(img, back, sizeof back, 65536), 0);
    CHECK(all_bytes(back, sizeof back, 0x5a));
    oxcow_aio_queue_free(q1);
    CHECK_EQ(oxcow_close(img), -EBUSY);
    CHECK_EQ(oxcow_aio_flush(q2, on_done, NULL, NULL), 0);
    while (g_done < 2) {
        CHECK(oxcow_aio_poll(q2, 0, -1) >= 0);
    }
    oxcow_aio_queue_free(q2);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(qemu_check(path), 0);
}

/* A queue that failed to be created holds nothing: close succeeds. */
static void test_failed_queue_holds_nothing(void) {
    const char *path = scratch_path("failed.qcow2");
    oxcow_aio_options o;
    oxcow_aio_queue *q = NULL;
    oxcow_error *err = NULL;
    oxcow_image *img;
    REQUIRE(create_default(path, 4 * MiB) == 0);
    REQUIRE((img = open_image(path, OXCOW_OPEN_RDWR)) != NULL);
    oxcow_aio_options_init(&o);
    o.depth = 1u << 20;
    CHECK_ERR(oxcow_aio_queue_new(img, &o, &q, &err), err, EINVAL);
    CHECK(q == NULL);
    CHECK_EQ(oxcow_close(img), 0);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"busy_until_every_queue_is_freed", test_busy_until_every_queue_is_freed},
        {"failed_queue_holds_nothing", test_failed_queue_holds_nothing},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
