package oxcow_test

import (
	"os"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// hostBlocks is the number of 512-byte blocks the file at path has allocated.
func hostBlocks(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Blocks
}

// TestDiscardUnmap: with OpenOptions.DiscardUnmap, discarding 90 % of the written data gives
// the host blocks back after the flush; qemu-img finds the image clean and the remaining
// data intact. Without the option the blocks stay.
func TestDiscardUnmap(t *testing.T) {
	needTool(t, "qemu-img")
	const size, data, cs = 16 << 20, 8 << 20, 64 << 10
	cut := int64(data / cs * 9 / 10 * cs)
	for _, unmap := range []bool{true, false} {
		path := newImage(t, size, nil)
		img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true, DiscardUnmap: unmap})
		want := make([]byte, size)
		copy(want, pattern(3, 0, data))
		if _, err := img.WriteAt(want[:data], 0); err != nil {
			t.Fatal(err)
		}
		if err := img.Flush(); err != nil {
			t.Fatal(err)
		}
		before := hostBlocks(t, path)
		if err := img.Discard(0, cut); err != nil {
			t.Fatal(err)
		}
		for i := range want[:cut] {
			want[i] = 0
		}
		if err := img.Flush(); err != nil {
			t.Fatal(err)
		}
		after := hostBlocks(t, path)
		freed := before - after
		if unmap && freed < cut/512*85/100 {
			t.Errorf("DiscardUnmap: %d blocks before, %d after the discard of %d bytes", before, after, cut)
		}
		if !unmap && freed > 64 {
			t.Errorf("without DiscardUnmap %d blocks were given back", freed)
		}
		if d := firstDiff(readAll(t, img), want); d != "" {
			t.Errorf("unmap=%v: %s", unmap, d)
		}
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		qemuCheck(t, path)
	}
}
