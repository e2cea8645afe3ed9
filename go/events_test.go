package oxcow_test

import (
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// damagedImage returns an image whose guest cluster 1 is mapped (as owned data) onto its
// first refcount block, and that block's offset.
func damagedImage(t *testing.T) (string, uint64) {
	t.Helper()
	path := t.TempDir() + "/damaged.qcow2"
	for _, args := range [][]string{
		{"qemu-img", "create", "-q", "-f", "qcow2", path, "64M"},
		{"qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 256k", path},
	} {
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	be64 := func(off uint64) uint64 {
		b := make([]byte, 8)
		if _, err := f.ReadAt(b, int64(off)); err != nil {
			t.Fatal(err)
		}
		return binary.BigEndian.Uint64(b)
	}
	const mask = 0x00fffffffffffe00
	l1 := be64(40)
	l2 := be64(l1) & mask
	rb := be64(be64(48)) & mask
	b := make([]byte, 8)
	binary.BigEndian.PutUint64(b, 1<<63|rb)
	if _, err := f.WriteAt(b, int64(l2+8)); err != nil {
		t.Fatal(err)
	}
	return path, rb
}

// TestEventHandlerReceivesTheFatalEvent: the guard stops a write over a refcount block with
// EIO, the handler sees one fatal event with the location, and the handle is fenced.
func TestEventHandlerReceivesTheFatalEvent(t *testing.T) {
	path, rb := damagedImage(t)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	var events []oxcow.Event
	if err := img.SetEventHandler(func(e oxcow.Event) {
		// A handler may call back into the image.
		_, _ = img.Info()
		events = append(events, e)
	}); err != nil {
		t.Fatal(err)
	}
	_, err := img.WriteAt(make([]byte, 4096), 65536)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("write over metadata: %v, want EIO", err)
	}
	if len(events) != 1 {
		t.Fatalf("events: %+v, want exactly one", events)
	}
	e := events[0]
	if !e.Fatal || !e.HasLocation || e.HostOffset > rb || rb >= e.HostOffset+e.Size ||
		!strings.Contains(e.Message, "refcount block") {
		t.Fatalf("event %+v does not describe the prevented write at %#x", e, rb)
	}
	_, err = img.ReadAt(make([]byte, 512), 0)
	if !errors.Is(err, syscall.ENOMEDIUM) {
		t.Fatalf("read after the fatal event: %v, want ENOMEDIUM", err)
	}
}

// TestOverlapCheckModes: with the guard off the same write goes through; switching back to
// OverlapAll stops the next one.
func TestOverlapCheckModes(t *testing.T) {
	path, _ := damagedImage(t)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	if err := img.SetOverlapCheck(oxcow.OverlapNone); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 512), 65536); err != nil {
		t.Fatalf("unguarded write: %v", err)
	}
	if err := img.SetOverlapCheck(oxcow.OverlapAll); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(make([]byte, 512), 65536+1024); !errors.Is(err, syscall.EIO) {
		t.Fatalf("guarded write: %v, want EIO", err)
	}
	if err := img.SetOverlapCheck(oxcow.OverlapCheck(99)); !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("bad mode: %v, want EINVAL", err)
	}
}
