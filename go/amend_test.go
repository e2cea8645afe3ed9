package oxcow_test

import (
	"bytes"
	"os/exec"
	"strings"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

func TestAmendRefcountWidthAndVersionKeepContent(t *testing.T) {
	needTool(t, "qemu-img")
	path := newImage(t, 4*mib, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	data := pattern(5, 0, 1<<20)
	if _, err := img.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, oxcow.Amend(path, oxcow.AmendOptions{RefcountBits: 8}), "amend", syscall.EAGAIN)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	before := qemuToRaw(t, path)
	on := true
	if err := oxcow.Amend(path, oxcow.AmendOptions{RefcountBits: 2, LazyRefcounts: &on}); err != nil {
		t.Fatalf("amend: %v", err)
	}
	qemuCheck(t, path)
	out, _ := exec.Command("qemu-img", "info", path).CombinedOutput()
	if !strings.Contains(string(out), "refcount bits: 2") || !strings.Contains(string(out), "lazy refcounts: true") {
		t.Fatalf("qemu-img info:\n%s", out)
	}
	wantErrno(t, oxcow.Amend(path, oxcow.AmendOptions{Version: 2}), "amend", syscall.EINVAL)
	if err := oxcow.Amend(path, oxcow.AmendOptions{Version: 2, RefcountBits: 16}); err != nil {
		t.Fatalf("downgrade: %v", err)
	}
	qemuCheck(t, path)
	if !bytes.Equal(qemuToRaw(t, path), before) {
		t.Fatal("the guest content changed")
	}
	wantErrno(t, oxcow.Amend(path, oxcow.AmendOptions{RefcountBits: 3}), "amend", syscall.EINVAL)
}
