package oxcow_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

const (
	kiB = 1 << 10
	miB = 1 << 20
)

// needTool skips the test when an external oracle is not installed.
func needTool(t testing.TB, name string) {
	t.Helper()
	if _, err := exec.LookPath(name); err != nil {
		t.Skipf("%s not installed", name)
	}
}

// run runs a command and fails the test if it exits non-zero; it returns the combined output.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// qemuCheck asserts that qemu-img check finds the image clean (exit 0).
func qemuCheck(t testing.TB, path string) {
	t.Helper()
	needTool(t, "qemu-img")
	out := run(t, "qemu-img", "check", "-f", "qcow2", path)
	if !strings.Contains(out, "No errors were found") {
		t.Fatalf("qemu-img check %s:\n%s", path, out)
	}
}

// qemuCompareRaw asserts that the qcow2 image and the raw reference have identical contents.
func qemuCompareRaw(t testing.TB, img, raw string) {
	t.Helper()
	needTool(t, "qemu-img")
	out := run(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, raw)
	if !strings.Contains(out, "Images are identical") {
		t.Fatalf("qemu-img compare %s %s:\n%s", img, raw, out)
	}
}

// qemuToRaw converts an image to raw with qemu-img and returns the contents.
func qemuToRaw(t testing.TB, img string) []byte {
	t.Helper()
	needTool(t, "qemu-img")
	raw := filepath.Join(t.TempDir(), "converted.raw")
	run(t, "qemu-img", "convert", "-U", "-O", "raw", img, raw)
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	return data
}

// pattern returns n bytes that depend on seed and on each byte's position.
func pattern(seed byte, off int64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		p := off + int64(i)
		b[i] = byte(p*131+p>>9+p>>17) ^ seed
	}
	return b
}

// newImage creates an image in a fresh temporary directory and returns its path.
func newImage(t testing.TB, size uint64, opts *oxcow.CreateOptions) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "test.qcow2")
	if err := oxcow.Create(path, size, opts); err != nil {
		t.Fatalf("Create(%d): %v", size, err)
	}
	return path
}

func mustOpen(t testing.TB, path string, opts *oxcow.OpenOptions) *oxcow.Image {
	t.Helper()
	img, err := oxcow.Open(path, opts)
	if err != nil {
		t.Fatalf("Open(%s, %+v): %v", path, opts, err)
	}
	return img
}

// readAll reads the whole guest contents of img.
func readAll(t testing.TB, img *oxcow.Image) []byte {
	t.Helper()
	buf := make([]byte, img.Size())
	n, err := img.ReadAt(buf, 0)
	if err != nil || n != len(buf) {
		t.Fatalf("ReadAt(whole image): n=%d err=%v", n, err)
	}
	return buf
}

// firstDiff describes the first difference between two byte slices ("" when equal).
func firstDiff(got, want []byte) string {
	if bytes.Equal(got, want) {
		return ""
	}
	if len(got) != len(want) {
		return fmt.Sprintf("length %d != %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d: got %#02x, want %#02x", i, got[i], want[i])
		}
	}
	return ""
}

// wantErrno asserts that err is an *oxcow.Error with the given errno and operation.
func wantErrno(t testing.TB, err error, op string, errno syscall.Errno) *oxcow.Error {
	t.Helper()
	if err == nil {
		t.Fatalf("%s: got no error, want %v", op, errno)
	}
	if !errors.Is(err, errno) {
		t.Fatalf("%s: got %v, want an error matching %v (%d)", op, err, errno, int(errno))
	}
	var oe *oxcow.Error
	if !errors.As(err, &oe) {
		t.Fatalf("%s: error %T is not an *oxcow.Error", op, err)
	}
	if oe.Op != op {
		t.Fatalf("error Op = %q, want %q (%v)", oe.Op, op, err)
	}
	if oe.Errno != errno {
		t.Fatalf("error Errno = %v, want %v", oe.Errno, errno)
	}
	return oe
}
