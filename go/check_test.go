package oxcow_test

import (
	"encoding/binary"
	"os"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// pokeRefcount writes a 16-bit refcount entry of refcount block 0 (at cluster 2 in a fresh
// 64 KiB-cluster image) for host cluster c.
func pokeRefcount(t *testing.T, path string, c int64, v uint16) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	if _, err := f.WriteAt(b[:], 2*64*kiB+2*c); err != nil {
		t.Fatal(err)
	}
}

// TestCheckRepairsLeaks leaks a cluster behind the library's back, finds it with a plain
// check, repairs it with CheckFixLeaks, and lets qemu-img confirm the result.
func TestCheckRepairsLeaks(t *testing.T) {
	needTool(t, "qemu-img")
	path := newImage(t, 64*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	data := pattern(5, 0, 256*kiB)
	if _, err := img.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	// Clusters: header 0, reftable 1, refblock 2, L1 3, L2 4, data 5..8. Over-count one.
	pokeRefcount(t, path, 6, 2)

	r, err := img.Check(oxcow.CheckFixNone)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if r.Leaks != 1 || r.Corruptions != 1 || r.Clean() {
		t.Fatalf("damaged image: %+v", r)
	}
	r, err = img.Check(oxcow.CheckFixLeaks)
	if err != nil {
		t.Fatalf("Check(leaks): %v", err)
	}
	if !r.Clean() || r.LeaksFixed != 1 || r.AllocatedClusters != 4 {
		t.Fatalf("after repair: %+v", r)
	}
	got := make([]byte, len(data))
	if _, err := img.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(got, data); d != "" {
		t.Fatalf("data changed by the repair: %s", d)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)

	// Repairs need a writable handle.
	ro := mustOpen(t, path, nil)
	defer ro.Close()
	_, err = ro.Check(oxcow.CheckFixAll)
	wantErrno(t, err, "check", syscall.EROFS)
	if r, err := ro.Check(oxcow.CheckFixNone); err != nil || !r.Clean() {
		t.Fatalf("read-only check: %+v, %v", r, err)
	}
}
