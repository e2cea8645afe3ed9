package oxcow_test

import (
	"bytes"
	"errors"
	"syscall"
	"testing"
	"time"

	"oxcow.dev/oxcow"
)

// The smallest caches (two 512-byte slices of L2 and of refcounts: every other request
// evicts) still give back exactly what was written, and qemu-img finds the image clean.
func TestTinyCachesRoundTrip(t *testing.T) {
	path := newImage(t, 64*miB, nil)
	opts := &oxcow.OpenOptions{Writable: true, CacheSize: 1, RefcountCacheSize: 1, L2SliceSize: 512}
	img := mustOpen(t, path, opts)
	// One write per 256 KiB: 4 KiB clusters' worth of L2 entries land in different slices.
	for off := int64(0); off < 64*miB; off += 256 * kiB {
		if _, err := img.WriteAt(pattern(7, off, 4096), off); err != nil {
			t.Fatalf("WriteAt(%d): %v", off, err)
		}
	}
	for off := int64(0); off < 64*miB; off += 256 * kiB {
		got := make([]byte, 4096)
		if _, err := img.ReadAt(got, off); err != nil {
			t.Fatalf("ReadAt(%d): %v", off, err)
		}
		if !bytes.Equal(got, pattern(7, off, 4096)) {
			t.Fatalf("offset %d: %s", off, firstDiff(got, pattern(7, off, 4096)))
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
}

// A slice size that is not a power of two is refused like qemu's l2-cache-entry-size.
func TestBadSliceSizeIsRefused(t *testing.T) {
	path := newImage(t, miB, nil)
	_, err := oxcow.Open(path, &oxcow.OpenOptions{L2SliceSize: 1000})
	if !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("Open with L2SliceSize 1000: %v, want EINVAL", err)
	}
}

// CacheCleanInterval is accepted whatever its value (default, one second, never) and idle
// cleaning never changes what is read.
func TestCacheCleanIntervalKeepsData(t *testing.T) {
	path := newImage(t, 4*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	if _, err := img.WriteAt(pattern(3, miB, 4096), miB); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	for _, d := range []time.Duration{0, time.Millisecond, -1} {
		img := mustOpen(t, path, &oxcow.OpenOptions{CacheCleanInterval: d})
		got := make([]byte, 4096)
		if _, err := img.ReadAt(got, miB); err != nil {
			t.Fatalf("interval %v: ReadAt: %v", d, err)
		}
		if !bytes.Equal(got, pattern(3, miB, 4096)) {
			t.Fatalf("interval %v: %s", d, firstDiff(got, pattern(3, miB, 4096)))
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
