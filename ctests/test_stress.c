/*
 * Issue 6 stress test through the C ABI: 8 threads on one oxcow_image doing random pread,
 * pwrite, pwritev, write_zeroes (with and without OXCOW_ZERO_MAY_UNMAP), discard and flush,
 * checked per byte against a model:
 *  - owned stripes: a random partition of the start of the disk, stripe i owned by thread
 *    i % 8 (many stripes are smaller than a cluster, so threads share clusters); exact.
 *  - storm clusters: each round all threads pass a barrier and write their own slice of the
 *    same brand-new cluster at once; every slice must survive, unwritten slices keep the
 *    initial (backing or zero) content; exact.
 *  - contested clusters: all threads write their own data / zeros / discard there at any
 *    time; concurrent reads must see initial, zero or some thread's data, and the final
 *    content of each byte must be the last thing some thread left there.
 * Afterwards qemu-img check must exit 0, qemu-img compare must match a raw file of the
 * verified content, and a reopened handle must read it again.
 * OXCOW_STRESS_SEED=<n> replays a seed (printed on failure).
 */
#include "common.h"

#include <pthread.h>
#include <sys/uio.h>

#define KiB (1ull << 10)
#define MiB (1ull << 20)
#define NT 8
#define ROUNDS 8
#define OPS 150

struct cfg {
    const char *name;
    uint64_t cs;
    int backing;
    uint64_t seed;
};

struct layout {
    uint64_t cs, size;
    uint64_t owned_end;
    uint64_t nstripes;
    uint64_t stripe_off[4096];
    uint64_t stripe_len[4096];
    uint64_t storm;     /* ROUNDS clusters */
    uint64_t contested; /* CONTESTED_CLUSTERS clusters */
    uint64_t contested_len;
    unsigned char *initial;
};

#define CONTESTED_CLUSTERS 4

static uint64_t mix(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

struct rng {
    uint64_t s;
};
static uint64_t rnext(struct rng *r) {
    r->s += 0x9e3779b97f4a7c15ull;
    return mix(r->s);
}
/* Uniform in [0, n), n > 0. */
static uint64_t rbelow(struct rng *r, uint64_t n) { return rnext(r) % n; }
/* Uniform in [lo, hi]. */
static uint64_t rrange(struct rng *r, uint64_t lo, uint64_t hi) { return lo + rbelow(r, hi - lo + 1); }

static unsigned char pat_byte(uint64_t tag, uint64_t pos) {
    return (unsigned char)(mix(tag ^ ((pos >> 3) * 0xff51afd7ed558ccdull)) >> ((pos & 7) * 8));
}
static void fill_pat(unsigned char *buf, uint64_t tag, uint64_t off, uint64_t len) {
    uint64_t i;
    for (i = 0; i < len; i++)
        buf[i] = pat_byte(tag, off + i);
}
static uint64_t ctag(int t) { return 0xc0c000000000ull + (uint64_t)t; }
static uint64_t stag(int t, int round) { return 0x570700000000ull + ((uint64_t)t << 20) + (uint64_t)round; }
static uint64_t otag(int t, uint64_t seq) { return (((uint64_t)t + 1) << 40) + seq; }

/* Storm plan of one round, the same for every thread: slice cut points and who writes. */
static void storm_plan(uint64_t seed, int round, uint64_t cs, uint64_t cuts[NT + 1], int writes[NT]) {
    struct rng r;
    int i, j;
    r.s = mix(seed ^ (0x57070000ull + (uint64_t)round));
    cuts[0] = 0;
    cuts[NT] = cs;
    for (i = 1; i < NT; i++) {
        uint64_t v = rbelow(&r, cs + 1);
        if (rbelow(&r, 2))
            v = v / 512 * 512;
        cuts[i] = v;
    }
    for (i = 1; i < NT; i++) /* insertion sort */
        for (j = i; j > 1 && cuts[j - 1] > cuts[j]; j--) {
            uint64_t x = cuts[j];
            cuts[j] = cuts[j - 1];
            cuts[j - 1] = x;
        }
    for (i = 0; i < NT; i++)
        writes[i] = rbelow(&r, 100) < 80;
}

struct shared {
    oxcow_image *img;
    struct layout *l;
    uint64_t seed;
    pthread_barrier_t barrier;
    unsigned char *expected; /* exact model of owned stripes and storm clusters */
};

struct worker {
    struct shared *sh;
    int t;
    struct rng r;
    uint64_t seq;
    unsigned char *cstate; /* per contested byte: 0 untouched, 1 our data, 2 zeros */
    int failures;
    char last_op[160];
};

#define WFAIL(w, ...)                                                                       \
    do {                                                                                    \
        fprintf(stderr, "thread %d (seed %#" PRIx64 ", last op: %s): ", (w)->t,             \
                (w)->sh->seed, (w)->last_op);                                              \
        fprintf(stderr, __VA_ARGS__);                                                       \
        fputc('\n', stderr);                                                                \
        (w)->failures++;                                                                    \
    } while (0)

/* A random sub-range of [off, off+len): whole, 4 KiB aligned, or unaligned. */
static void sub_range(struct rng *r, uint64_t off, uint64_t len, uint64_t *o, uint64_t *n) {
    uint64_t k = rbelow(r, 5), s;
    if (k == 0) {
        *o = off;
        *n = len;
        return;
    }
    if (k <= 2) {
        uint64_t a = (off + 4095) / 4096 * 4096, e = (off + len) / 4096 * 4096;
        if (e > a) {
            uint64_t blocks = (e - a) / 4096, b = rbelow(r, blocks);
            *o = a + b * 4096;
            *n = rrange(r, 1, blocks - b) * 4096;
            return;
        }
    }
    s = rbelow(r, len);
    *o = off + s;
    *n = rrange(r, 1, len - s);
}

static int do_write(struct worker *w, const unsigned char *buf, uint64_t len, uint64_t off) {
    int rc;
    if (len > 2 && rbelow(&w->r, 100) < 25) {
        struct iovec iov[3];
        uint64_t x = rrange(&w->r, 1, len - 1), y = rrange(&w->r, x, len - 1);
        iov[0].iov_base = (void *)buf;
        iov[0].iov_len = (size_t)x;
        iov[1].iov_base = (void *)(buf + x);
        iov[1].iov_len = (size_t)(y - x);
        iov[2].iov_base = (void *)(buf + y);
        iov[2].iov_len = (size_t)(len - y);
        snprintf(w->last_op, sizeof w->last_op, "pwritev [%#" PRIx64 ", +%#" PRIx64 ") split %" PRIu64 "/%" PRIu64, off, len, x, y);
        if (y == x) { /* two pieces: [0,x) [x,len) */
            iov[1].iov_len = (size_t)(len - x);
            rc = oxcow_pwritev(w->sh->img, iov, 2, off);
        } else {
            rc = oxcow_pwritev(w->sh->img, iov, 3, off);
        }
    } else {
        snprintf(w->last_op, sizeof w->last_op, "pwrite [%#" PRIx64 ", +%#" PRIx64 ")", off, len);
        rc = oxcow_pwrite(w->sh->img, buf, (size_t)len, off);
    }
    if (rc != 0)
        WFAIL(w, "write failed: %d", rc);
    return rc;
}

static int do_read(struct worker *w, unsigned char *buf, uint64_t len, uint64_t off) {
    int rc;
    if (len > 2 && rbelow(&w->r, 100) < 25) {
        struct iovec iov[2];
        uint64_t x = rrange(&w->r, 1, len - 1);
        iov[0].iov_base = buf;
        iov[0].iov_len = (size_t)x;
        iov[1].iov_base = buf + x;
        iov[1].iov_len = (size_t)(len - x);
        snprintf(w->last_op, sizeof w->last_op, "preadv [%#" PRIx64 ", +%#" PRIx64 ")", off, len);
        rc = oxcow_preadv(w->sh->img, iov, 2, off);
    } else {
        snprintf(w->last_op, sizeof w->last_op, "pread [%#" PRIx64 ", +%#" PRIx64 ")", off, len);
        rc = oxcow_pread(w->sh->img, buf, (size_t)len, off);
    }
    if (rc != 0)
        WFAIL(w, "read failed: %d", rc);
    return rc;
}

static void compare_exact(struct worker *w, const unsigned char *got, const unsigned char *want,
                          uint64_t len, uint64_t off, const char *what) {
    uint64_t i;
    for (i = 0; i < len; i++)
        if (got[i] != want[i]) {
            WFAIL(w, "%s: byte at %#" PRIx64 " is %#x, want %#x", what, off + i, got[i], want[i]);
            return;
        }
}

static int contested_ok_any(const struct layout *l, uint64_t pos, unsigned char v) {
    int t;
    if (v == 0 || v == l->initial[pos])
        return 1;
    for (t = 0; t < NT; t++)
        if (pat_byte(ctag(t), pos) == v)
            return 1;
    return 0;
}

static void contested_range(struct worker *w, uint64_t *o, uint64_t *n) {
    const struct layout *l = w->sh->l;
    uint64_t s;
    if (rbelow(&w->r, 100) < 30) {
        uint64_t c = rbelow(&w->r, CONTESTED_CLUSTERS);
        *o = l->contested + c * l->cs;
        *n = l->cs * rrange(&w->r, 1, CONTESTED_CLUSTERS - c < 2 ? 1 : 2);
        return;
    }
    s = rbelow(&w->r, l->contested_len);
    *o = l->contested + s;
    *n = rrange(&w->r, 1, l->contested_len - s < 2 * l->cs ? l->contested_len - s : 2 * l->cs);
}

static void one_op(struct worker *w, unsigned char *buf, unsigned char *got) {
    struct shared *sh = w->sh;
    const struct layout *l = sh->l;
    uint64_t cs = l->cs, mine = (l->nstripes - 1 - (uint64_t)w->t) / NT + 1;
    uint64_t si = (uint64_t)w->t + NT * rbelow(&w->r, mine);
    uint64_t soff = l->stripe_off[si], slen = l->stripe_len[si], o, n, i;
    uint64_t op = rbelow(&w->r, 100);
    int rc;
    if (op < 35) { /* write own */
        sub_range(&w->r, soff, slen, &o, &n);
        fill_pat(buf, otag(w->t, ++w->seq), o, n);
        if (do_write(w, buf, n, o) == 0)
            memcpy(sh->expected + o, buf, (size_t)n);
    } else if (op < 50) { /* read own */
        sub_range(&w->r, soff, slen, &o, &n);
        if (do_read(w, got, n, o) == 0)
            compare_exact(w, got, sh->expected + o, n, o, "read of an owned stripe");
    } else if (op < 60) { /* write contested */
        contested_range(w, &o, &n);
        fill_pat(buf, ctag(w->t), o, n);
        if (do_write(w, buf, n, o) == 0)
            memset(w->cstate + (o - l->contested), 1, (size_t)n);
    } else if (op < 65) { /* read contested */
        contested_range(w, &o, &n);
        if (do_read(w, got, n, o) == 0)
            for (i = 0; i < n; i++)
                if (!contested_ok_any(l, o + i, got[i])) {
                    WFAIL(w, "contested read: byte at %#" PRIx64 " is %#x: not initial, zero or any thread's data", o + i, got[i]);
                    break;
                }
    } else if (op < 73) { /* write_zeroes own */
        uint32_t flags = rbelow(&w->r, 2) ? OXCOW_ZERO_MAY_UNMAP : 0;
        sub_range(&w->r, soff, slen, &o, &n);
        snprintf(w->last_op, sizeof w->last_op, "write_zeroes [%#" PRIx64 ", +%#" PRIx64 ") flags %u", o, n, flags);
        rc = oxcow_write_zeroes(sh->img, o, n, flags);
        if (rc != 0)
            WFAIL(w, "write_zeroes failed: %d", rc);
        else
            memset(sh->expected + o, 0, (size_t)n);
    } else if (op < 76) { /* write_zeroes contested */
        uint32_t flags = rbelow(&w->r, 2) ? OXCOW_ZERO_MAY_UNMAP : 0;
        contested_range(w, &o, &n);
        snprintf(w->last_op, sizeof w->last_op, "write_zeroes contested [%#" PRIx64 ", +%#" PRIx64 ") flags %u", o, n, flags);
        rc = oxcow_write_zeroes(sh->img, o, n, flags);
        if (rc != 0)
            WFAIL(w, "write_zeroes failed: %d", rc);
        else
            memset(w->cstate + (o - l->contested), 2, (size_t)n);
    } else if (op < 82) { /* discard whole clusters of an own stripe */
        uint64_t a = (soff + cs - 1) / cs * cs, e = (soff + slen) / cs * cs;
        if (e > a) {
            uint64_t k = (e - a) / cs, s = rbelow(&w->r, k);
            o = a + s * cs;
            n = rrange(&w->r, 1, k - s) * cs;
            snprintf(w->last_op, sizeof w->last_op, "discard [%#" PRIx64 ", +%#" PRIx64 ")", o, n);
            rc = oxcow_discard(sh->img, o, n);
            if (rc != 0)
                WFAIL(w, "discard failed: %d", rc);
            else
                memset(sh->expected + o, 0, (size_t)n);
        }
    } else if (op < 85) { /* discard contested clusters */
        uint64_t c = rbelow(&w->r, CONTESTED_CLUSTERS);
        o = l->contested + c * cs;
        n = cs;
        snprintf(w->last_op, sizeof w->last_op, "discard contested [%#" PRIx64 ", +%#" PRIx64 ")", o, n);
        rc = oxcow_discard(sh->img, o, n);
        if (rc != 0)
            WFAIL(w, "discard failed: %d", rc);
        else
            memset(w->cstate + (o - l->contested), 2, (size_t)n);
    } else if (op < 89) {
        snprintf(w->last_op, sizeof w->last_op, "flush");
        rc = oxcow_flush(sh->img);
        if (rc != 0)
            WFAIL(w, "flush failed: %d", rc);
    } else { /* more writes to own stripes */
        sub_range(&w->r, soff, slen, &o, &n);
        fill_pat(buf, otag(w->t, ++w->seq), o, n);
        if (do_write(w, buf, n, o) == 0)
            memcpy(sh->expected + o, buf, (size_t)n);
    }
}

static void *worker_main(void *arg) {
    struct worker *w = (struct worker *)arg;
    struct shared *sh = w->sh;
    const struct layout *l = sh->l;
    uint64_t cs = l->cs;
    unsigned char *buf = (unsigned char *)malloc((size_t)(8 * cs)), *got = (unsigned char *)malloc((size_t)(8 * cs));
    int round, k;
    if (buf == NULL || got == NULL) {
        w->failures++;
        for (round = 0; round < ROUNDS; round++)
            pthread_barrier_wait(&sh->barrier);
        free(buf);
        free(got);
        return NULL;
    }
    for (round = 0; round < ROUNDS; round++) {
        uint64_t cuts[NT + 1], base = l->storm + (uint64_t)round * cs;
        int writes[NT];
        storm_plan(sh->seed, round, cs, cuts, writes);
        pthread_barrier_wait(&sh->barrier);
        if (writes[w->t] && cuts[w->t + 1] > cuts[w->t]) {
            uint64_t o = base + cuts[w->t], n = cuts[w->t + 1] - cuts[w->t];
            fill_pat(buf, stag(w->t, round), o, n);
            if (do_write(w, buf, n, o) == 0) {
                memcpy(sh->expected + o, buf, (size_t)n);
                if (do_read(w, got, n, o) == 0)
                    compare_exact(w, got, buf, n, o, "own slice of the storm cluster");
            }
        }
        for (k = 0; k < OPS; k++)
            one_op(w, buf, got);
    }
    free(buf);
    free(got);
    return NULL;
}

static void make_layout(struct layout *l, const struct cfg *c) {
    struct rng r;
    uint64_t cs = c->cs, pos = 0, target = 48 * cs;
    r.s = mix(c->seed ^ 0x6c61796f7574ull);
    l->cs = cs;
    l->nstripes = 0;
    while (pos < target && l->nstripes < 4096) {
        uint64_t k = rbelow(&r, 100), len;
        if (k < 40)
            len = rrange(&r, cs / 16, cs / 3);
        else if (k < 65)
            len = rrange(&r, cs / 2, 2 * cs);
        else
            len = rrange(&r, 3 * cs, 6 * cs);
        if (rbelow(&r, 100) < 30)
            len = len / 512 * 512 > 0 ? len / 512 * 512 : 512;
        l->stripe_off[l->nstripes] = pos;
        l->stripe_len[l->nstripes] = len;
        l->nstripes++;
        pos += len;
    }
    l->owned_end = pos;
    l->storm = (pos + cs - 1) / cs * cs + cs;
    l->contested = l->storm + (ROUNDS + 1) * cs;
    l->contested_len = CONTESTED_CLUSTERS * cs;
    l->size = l->contested + l->contested_len + cs;
}

static void run_cfg(const struct cfg *c0) {
    struct cfg cfg = *c0;
    struct layout *l = (struct layout *)calloc(1, sizeof *l);
    struct shared sh;
    struct worker w[NT];
    pthread_t th[NT];
    const char *path, *raw;
    unsigned char *got = NULL;
    uint64_t i;
    int t;
    const char *env = getenv("OXCOW_STRESS_SEED");
    if (env != NULL && env[0] != '\0')
        cfg.seed = strtoull(env, NULL, 0);
    fprintf(stderr, "%s: seed %#" PRIx64 " (replay with OXCOW_STRESS_SEED=%#" PRIx64 ")\n", cfg.name, cfg.seed, cfg.seed);
    REQUIRE(l != NULL);
    make_layout(l, &cfg);
    l->initial = (unsigned char *)calloc(1, (size_t)l->size);
    memset(&sh, 0, sizeof sh);
    sh.expected = (unsigned char *)calloc(1, (size_t)l->size);
    got = (unsigned char *)malloc((size_t)l->size);
    REQUIRE(l->initial != NULL && sh.expected != NULL && got != NULL);
    scratch_dir();
    path = scratch_path("stress.qcow2");
    if (cfg.backing) {
        /* Backing written by qemu-io: a few pattern ranges over owned, storm and contested
         * regions; it ends in the middle of the contested region. */
        const char *bpath = scratch_path("backing.qcow2");
        uint64_t blen = l->contested + 2 * cfg.cs + 1536;
        uint64_t r1 = l->owned_end / 3 / 512 * 512, r2 = l->storm + cfg.cs / 2;
        oxcow_create_options o;
        oxcow_error *err = NULL;
        int rc;
        REQUIRE(run("qemu-img create -q -f qcow2 -o cluster_size=65536 '%s' %" PRIu64 " 1>&2", bpath, blen) == 0);
        REQUIRE(run("qemu-io -f qcow2 -c 'write -q -P 0x5a 0 %" PRIu64 "' -c 'write -q -P 0xa5 %" PRIu64 " %" PRIu64 "' -c 'write -q -P 0x3c %" PRIu64 " %" PRIu64 "' '%s' 1>&2",
                    r1, r2, 3 * cfg.cs, l->contested + cfg.cs, blen - l->contested - cfg.cs, bpath) == 0);
        memset(l->initial, 0x5a, (size_t)r1);
        memset(l->initial + r2, 0xa5, (size_t)(3 * cfg.cs));
        memset(l->initial + l->contested + cfg.cs, 0x3c, (size_t)(blen - l->contested - cfg.cs));
        oxcow_create_options_init(&o);
        o.cluster_size = (uint32_t)cfg.cs;
        o.backing_file = "backing.qcow2";
        o.backing_format = "qcow2";
        rc = oxcow_create(path, l->size, &o, &err);
        if (rc != 0) {
            fprintf(stderr, "create: %d %s\n", rc, oxcow_error_message(err));
            oxcow_error_free(err);
        }
        REQUIRE_OK(rc);
    } else {
        oxcow_create_options o;
        oxcow_create_options_init(&o);
        o.cluster_size = (uint32_t)cfg.cs;
        REQUIRE_OK(oxcow_create(path, l->size, &o, NULL));
    }
    memcpy(sh.expected, l->initial, (size_t)l->size);
    sh.img = open_image(path, OXCOW_OPEN_RDWR);
    REQUIRE(sh.img != NULL);
    sh.l = l;
    sh.seed = cfg.seed;
    REQUIRE(pthread_barrier_init(&sh.barrier, NULL, NT) == 0);
    for (t = 0; t < NT; t++) {
        memset(&w[t], 0, sizeof w[t]);
        w[t].sh = &sh;
        w[t].t = t;
        w[t].r.s = mix(cfg.seed ^ mix(0x746872656164ull + (uint64_t)t));
        w[t].cstate = (unsigned char *)calloc(1, (size_t)l->contested_len);
        REQUIRE(w[t].cstate != NULL);
        snprintf(w[t].last_op, sizeof w[t].last_op, "none");
    }
    for (t = 0; t < NT; t++)
        REQUIRE(pthread_create(&th[t], NULL, worker_main, &w[t]) == 0);
    for (t = 0; t < NT; t++)
        pthread_join(th[t], NULL);
    pthread_barrier_destroy(&sh.barrier);
    for (t = 0; t < NT; t++)
        CHECK_EQ(w[t].failures, 0);

    /* Final content through the live handle. */
    memset(got, 0xee, (size_t)l->size);
    CHECK_EQ(oxcow_pread(sh.img, got, (size_t)l->size, 0), 0);
    for (i = 0; i < l->contested; i++)
        if (got[i] != sh.expected[i]) {
            fprintf(stderr, "%s (seed %#" PRIx64 "): final byte at %#" PRIx64 " is %#x, want %#x\n", cfg.name, cfg.seed, i, got[i], sh.expected[i]);
            g_failures++;
            break;
        }
    for (i = l->contested; i < l->contested + l->contested_len; i++) {
        int any = 0, ok = 0;
        for (t = 0; t < NT; t++) {
            unsigned char s = w[t].cstate[i - l->contested];
            if (s == 1) {
                any = 1;
                ok |= pat_byte(ctag(t), i) == got[i];
            } else if (s == 2) {
                any = 1;
                ok |= got[i] == 0;
            }
        }
        if (!any)
            ok = got[i] == l->initial[i];
        if (!ok) {
            fprintf(stderr, "%s (seed %#" PRIx64 "): final contested byte at %#" PRIx64 " is %#x: not what any thread left there\n", cfg.name, cfg.seed, i, got[i]);
            g_failures++;
            break;
        }
    }
    for (i = l->contested + l->contested_len; i < l->size; i++)
        if (got[i] != l->initial[i]) {
            fprintf(stderr, "%s: untouched byte at %#" PRIx64 " changed\n", cfg.name, i);
            g_failures++;
            break;
        }
    CHECK_EQ(oxcow_close(sh.img), 0);
    CHECK_EQ(qemu_check(path), 0);
    raw = scratch_path("model.raw");
    CHECK_EQ(write_file_at(raw, got, (size_t)l->size, 0), 0);
    CHECK_EQ(qemu_compare_raw(raw, path), 0);

    /* Reopened read-only: the same bytes. */
    sh.img = open_image(path, 0);
    if (sh.img != NULL) {
        memset(sh.expected, 0xee, (size_t)l->size);
        CHECK_EQ(oxcow_pread(sh.img, sh.expected, (size_t)l->size, 0), 0);
        CHECK(memcmp(sh.expected, got, (size_t)l->size) == 0);
        CHECK_EQ(oxcow_close(sh.img), 0);
    } else {
        g_failures++;
    }
    for (t = 0; t < NT; t++)
        free(w[t].cstate);
    free(got);
    free(sh.expected);
    free(l->initial);
    free(l);
}

static void test_clusters_64k(void) {
    static const struct cfg c = {"clusters_64k", 64 * KiB, 0, 0x5715064};
    run_cfg(&c);
}
static void test_clusters_4k_backing(void) {
    static const struct cfg c = {"clusters_4k_backing", 4 * KiB, 1, 0x5715004b};
    run_cfg(&c);
}
static void test_clusters_64k_backing(void) {
    static const struct cfg c = {"clusters_64k_backing", 64 * KiB, 1, 0x5715064b};
    run_cfg(&c);
}

int main(int argc, char **argv) {
    static const struct test_case tests[] = {
        {"clusters_64k", test_clusters_64k},
        {"clusters_4k_backing", test_clusters_4k_backing},
        {"clusters_64k_backing", test_clusters_64k_backing},
    };
    return run_tests(tests, sizeof tests / sizeof tests[0], argc, argv);
}
