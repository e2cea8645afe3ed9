/* Corruption events from C: a write that would overwrite a refcount block is stopped with
 * -EIO, the callback receives a fatal event with the location and a message naming the
 * structure, the handle is fenced, and QEMU sees the image marked corrupt. Overlap-check modes
 * are selectable at open and at runtime. */
#include "common.h"

#define MiB (1024u * 1024u)
#define CL 65536u

struct seen {
    int count;
    uint32_t flags;
    uint64_t host_offset, size;
    char message[512];
};

static void on_event(void *opaque, const oxcow_event *ev) {
    struct seen *s = opaque;
    s->count++;
    s->flags = ev->flags;
    s->host_offset = ev->host_offset;
    s->size = ev->size;
    snprintf(s->message, sizeof s->message, "%s", ev->message);
}

static uint64_t be64_at(const char *path, uint64_t off) {
    unsigned char b[8];
    uint64_t v = 0;
    int i;
    if (read_file_at(path, b, 8, (off_t)off) != 0)
        return 0;
    for (i = 0; i < 8; i++)
        v = (v << 8) | b[i];
    return v;
}

static void put_be64_at(const char *path, uint64_t off, uint64_t v) {
    unsigned char b[8];
    int i;
    for (i = 7; i >= 0; i--) {
        b[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
    REQUIRE(write_file_at(path, b, 8, (off_t)off) == 0);
}

/* An image whose guest cluster 1 is mapped (COPIED) onto its first refcount block. Returns the
 * refcount block's offset. */
static uint64_t damaged_image(const char *path) {
    uint64_t l1, l2, rt, rb;
    if (run("qemu-img create -q -f qcow2 '%s' 64M", path) != 0)
        return 0;
    if (run("qemu-io -f qcow2 -c 'write -P 0x11 0 256k' '%s' >/dev/null", path) != 0)
        return 0;
    l1 = be64_at(path, 40);
    l2 = be64_at(path, l1) & 0x00fffffffffffe00ull;
    rt = be64_at(path, 48);
    rb = be64_at(path, rt) & 0x00fffffffffffe00ull;
    if (l2 == 0 || rb == 0)
        return 0;
    put_be64_at(path, l2 + 8, (1ull << 63) | rb);
    return rb;
}

static void test_fatal_event(void) {
    const char *path;
    oxcow_image *img;
    struct seen s;
    unsigned char buf[4096];
    uint64_t rb;
    char out[4096];
    scratch_dir();
    path = scratch_path("event.qcow2");
    rb = damaged_image(path);
    REQUIRE(rb != 0);
    img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(img != NULL);
    memset(&s, 0, sizeof s);
    CHECK_EQ(oxcow_set_event_callback(img, on_event, &s), 0);
    memset(buf, 0xee, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, CL + 512), -EIO);
    CHECK_EQ(s.count, 1);
    CHECK(s.flags & OXCOW_EVENT_FATAL);
    CHECK(s.flags & OXCOW_EVENT_HAS_LOCATION);
    CHECK(s.host_offset <= rb && rb < s.host_offset + s.size);
    CHECK(strstr(s.message, "refcount block") != NULL);
    /* Fenced: nothing more, and no second event. */
    CHECK_EQ(oxcow_pread(img, buf, 512, 0), -ENOMEDIUM);
    CHECK_EQ(oxcow_pwrite(img, buf, 512, 0), -ENOMEDIUM);
    CHECK_EQ(s.count, 1);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(capture(out, sizeof out, "qemu-img info --output=json '%s'", path), 0);
    CHECK(strstr(out, "\"corrupt\": true") != NULL);
}

static void test_modes(void) {
    const char *path;
    oxcow_image *img = NULL;
    oxcow_open_options oo;
    oxcow_error *err = NULL;
    struct seen s;
    unsigned char buf[512];
    int rc;
    scratch_dir();
    path = scratch_path("modes.qcow2");
    REQUIRE(damaged_image(path) != 0);
    oxcow_open_options_init(&oo);
    CHECK_EQ(oo.overlap_check, OXCOW_OVERLAP_DEFAULT);
    oo.overlap_check = 99;
    rc = oxcow_open(path, OXCOW_OPEN_RDWR, &oo, &img, &err);
    CHECK_ERR(rc, err, EINVAL);
    /* Mode none lets the bad write through (proving the guard stops it otherwise)... */
    oo.overlap_check = OXCOW_OVERLAP_NONE;
    REQUIRE_OK(oxcow_open(path, OXCOW_OPEN_RDWR, &oo, &img, NULL));
    memset(&s, 0, sizeof s);
    CHECK_EQ(oxcow_set_event_callback(img, on_event, &s), 0);
    memset(buf, 0xee, sizeof buf);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, CL), 0);
    CHECK_EQ(s.count, 0);
    /* ...and switching back to "all" at runtime stops the next one. */
    CHECK_EQ(oxcow_set_overlap_check(img, 7), -EINVAL);
    CHECK_EQ(oxcow_set_overlap_check(img, OXCOW_OVERLAP_ALL), 0);
    CHECK_EQ(oxcow_pwrite(img, buf, sizeof buf, CL + 1024), -EIO);
    CHECK_EQ(s.count, 1);
    /* Removing the callback is allowed at any time. */
    CHECK_EQ(oxcow_set_event_callback(img, NULL, NULL), 0);
    CHECK_EQ(oxcow_close(img), 0);
    CHECK_EQ(oxcow_set_event_callback(NULL, on_event, &s), -EINVAL);
    CHECK_EQ(oxcow_set_overlap_check(NULL, OXCOW_OVERLAP_ALL), -EINVAL);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"fatal_event", test_fatal_event},
        {"modes", test_modes},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
