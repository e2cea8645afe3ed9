package oxcow_test

import (
	"bytes"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// rebaseChain makes old.qcow2 (pattern 1 over 3 MiB), new.qcow2 (pattern 2 at 1 MiB) and
// top.qcow2 over old; returns the directory.
func rebaseChain(t *testing.T) string {
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	dir := t.TempDir()
	old, nw, top := filepath.Join(dir, "old.qcow2"), filepath.Join(dir, "new.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", old, "4M")
	run(t, "qemu-io", "-c", "write -P 1 0 3M", old)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", nw, "4M")
	run(t, "qemu-io", "-c", "write -P 2 1M 64k", nw)
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", top)
	return dir
}

func TestRebaseKeepsGuestContentWhileWriting(t *testing.T) {
	dir := rebaseChain(t)
	top := filepath.Join(dir, "top.qcow2")
	img := mustOpen(t, top, &oxcow.OpenOptions{Writable: true})
	before := readAll(t, img)
	data := pattern(9, 0, 64<<10)
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := int64(0); i < 16; i++ {
			if _, err := img.WriteAt(data, 3*mib+i*(64<<10)); err != nil {
				t.Error(err)
			}
		}
	}()
	if err := img.Rebase("new.qcow2", "qcow2", false); err != nil {
		t.Fatalf("rebase: %v", err)
	}
	wg.Wait()
	for i := int64(0); i < 16; i++ {
		copy(before[3*mib+i*(64<<10):], data)
	}
	if d := firstDiff(readAll(t, img), before); d != "" {
		t.Fatalf("guest content changed: %s", d)
	}
	if err := img.Rebase("", "", false); err != nil {
		t.Fatalf("rebase onto nothing: %v", err)
	}
	if d := firstDiff(readAll(t, img), before); d != "" {
		t.Fatalf("guest content changed removing the backing file: %s", d)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, top)
	if !bytes.Equal(qemuToRaw(t, top), before) {
		t.Fatal("qemu-img reads other content")
	}
}

func TestRebaseUnsafeChangesOnlyTheHeader(t *testing.T) {
	dir := rebaseChain(t)
	top := filepath.Join(dir, "top.qcow2")
	img := mustOpen(t, top, &oxcow.OpenOptions{Writable: true})
	wantErrno(t, img.Rebase("new.qcow2", "", true), "rebase", syscall.EINVAL)
	wantErrno(t, img.Rebase("missing.qcow2", "qcow2", false), "rebase", syscall.ENOENT)
	if err := img.Rebase("new.qcow2", "qcow2", true); err != nil {
		t.Fatalf("unsafe rebase: %v", err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, top)
	out, _ := exec.Command("qemu-img", "info", top).CombinedOutput()
	if !strings.Contains(string(out), "backing file: new.qcow2") {
		t.Fatalf("qemu-img info:\n%s", out)
	}
	if !bytes.Equal(qemuToRaw(t, top), qemuToRaw(t, filepath.Join(dir, "new.qcow2"))) {
		t.Fatal("the top does not read as the new backing file")
	}
	ro := mustOpen(t, top, nil)
	defer ro.Close()
	wantErrno(t, ro.Rebase("", "", false), "rebase", syscall.EROFS)
}
