package oxcow_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// An image whose guest data lives in a raw external data file: qemu-img sees the data file,
// writes through oxcow land at their guest offset in it, and it equals the guest disk.
func TestCreateWithRawDataFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "df.qcow2")
	data := filepath.Join(dir, "df.raw")
	err := oxcow.Create(path, miB, &oxcow.CreateOptions{DataFile: data, DataFileRaw: true})
	if err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	want := pattern(3, 65536, 8192)
	if _, err := img.WriteAt(want, 65536); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	info := run(t, "qemu-img", "info", "--output=json", path)
	if !strings.Contains(info, `"data-file-raw": true`) {
		t.Fatalf("qemu-img info lacks data-file-raw:\n%s", info)
	}
	raw, err := os.ReadFile(data)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(raw, qemuToRaw(t, path)) || !bytes.Equal(raw[65536:65536+8192], want) {
		t.Fatal("the raw data file differs from the guest disk")
	}
	err = oxcow.Create(filepath.Join(dir, "x.qcow2"), miB, &oxcow.CreateOptions{DataFileRaw: true})
	wantErrno(t, err, "create", syscall.EINVAL) // data_file_raw needs a data file
}
