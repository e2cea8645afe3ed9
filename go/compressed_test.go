package oxcow_test

import (
	"errors"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// TestWriteCompressed: whole clusters written compressed read back identically through oxcow
// and QEMU, the image passes qemu-img check, and misshapen requests fail with EINVAL.
func TestWriteCompressed(t *testing.T) {
	const cl = 64 * 1024
	path := newImage(t, 8*cl, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	want := make([]byte, 8*cl)
	for c := 0; c < 8; c++ {
		buf := make([]byte, cl)
		for i := range buf {
			buf[i] = byte(i/500 + c)
		}
		if err := img.WriteCompressed(buf, int64(c*cl)); err != nil {
			t.Fatalf("WriteCompressed cluster %d: %v", c, err)
		}
		copy(want[c*cl:], buf)
	}
	err := img.WriteCompressed(make([]byte, cl-1), 0)
	if !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("short compressed write: %v, want EINVAL", err)
	}
	got := make([]byte, len(want))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(got, want); d != "" {
		t.Fatal(d)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	if d := firstDiff(qemuToRaw(t, path), want); d != "" {
		t.Fatalf("qemu reads: %s", d)
	}
}
