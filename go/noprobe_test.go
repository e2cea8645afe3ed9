package oxcow_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// TestNoProbe: a raw backing file whose first bytes are a qcow2 header is read as raw when
// the overlay records "raw"; when the overlay records no format, NoProbe refuses the chain
// instead of guessing from bytes a guest may have written.
func TestNoProbe(t *testing.T) {
	needTool(t, "qemu-img")
	dir := t.TempDir()
	inner := filepath.Join(dir, "inner.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", inner, "1M")
	disk, err := os.ReadFile(inner)
	if err != nil {
		t.Fatal(err)
	}
	disk = append(disk, bytes.Repeat([]byte{0x77}, 1<<20-len(disk))...)
	raw := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(raw, disk, 0o644); err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(dir, "ov.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw", ov)

	img := mustOpen(t, ov, &oxcow.OpenOptions{NoProbe: true})
	if got := readAll(t, img); !bytes.Equal(got, disk) {
		t.Fatalf("recorded raw backing file not read as raw: %s", firstDiff(got, disk))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	// End the extension area where the backing format extension starts.
	f, err := os.OpenFile(ov, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	hdr := make([]byte, 104)
	if _, err := f.ReadAt(hdr, 0); err != nil {
		t.Fatal(err)
	}
	start := int64(binary.BigEndian.Uint32(hdr[100:104]))
	if _, err := f.WriteAt(make([]byte, 8), start); err != nil {
		t.Fatal(err)
	}
	f.Close()

	_, err = oxcow.Open(ov, &oxcow.OpenOptions{NoProbe: true})
	oe := wantErrno(t, err, "open", syscall.ENOTSUP)
	if !strings.Contains(oe.Error(), "not recorded") {
		t.Fatalf("message does not say why: %v", oe)
	}
	mustOpen(t, ov, nil).Close()
}
