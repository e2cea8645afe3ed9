package oxcow_test

import (
	"bytes"
	"strings"
	"sync"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// TestSnapshotsCreateApplyDelete takes snapshots through the binding, reverts to one, reads
// a snapshot through the Snapshot open option, deletes, and lets qemu-img confirm.
func TestSnapshotsCreateApplyDelete(t *testing.T) {
	needTool(t, "qemu-img")
	path := newImage(t, 8*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	first := pattern(1, 0, 256*kiB)
	if _, err := img.WriteAt(first, 0); err != nil {
		t.Fatal(err)
	}
	if err := img.CreateSnapshot("first"); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(pattern(2, 0, 256*kiB), 0); err != nil {
		t.Fatal(err)
	}
	if err := img.CreateSnapshot("second"); err != nil {
		t.Fatal(err)
	}
	list, err := img.Snapshots()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 || list[0].ID != "1" || list[0].Name != "first" || list[1].Name != "second" ||
		list[1].DiskSize != 8*miB || list[1].Date.Year() < 2020 {
		t.Fatalf("Snapshots() = %+v", list)
	}
	if err := img.ApplySnapshot("first"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(first))
	if _, err := img.ReadAt(got, 0); err != nil || !bytes.Equal(got, first) {
		t.Fatalf("after ApplySnapshot: %v %s", err, firstDiff(got, first))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	if out := run(t, "qemu-img", "snapshot", "-l", path); !strings.Contains(out, "second") {
		t.Fatalf("qemu-img snapshot -l:\n%s", out)
	}
	view := mustOpen(t, path, &oxcow.OpenOptions{Snapshot: "second"})
	if data := readAll(t, view); !bytes.Equal(data[:256*kiB], pattern(2, 0, 256*kiB)) {
		t.Fatal("snapshot view does not read the snapshot")
	}
	view.Close()
	img = mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	if err := img.DeleteSnapshot("1"); err != nil {
		t.Fatal(err)
	}
	if err := img.DeleteSnapshot("second"); err != nil {
		t.Fatal(err)
	}
	if list, _ := img.Snapshots(); len(list) != 0 {
		t.Fatalf("Snapshots() after deleting = %+v", list)
	}
	img.Close()
	qemuCheck(t, path)
}

// TestSnapshotErrors checks the errnos: missing snapshots, read-only handles, writable
// snapshot views.
func TestSnapshotErrors(t *testing.T) {
	path := newImage(t, miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	wantErrno(t, img.ApplySnapshot("nope"), "snapshot apply", syscall.ENOENT)
	wantErrno(t, img.DeleteSnapshot("nope"), "snapshot delete", syscall.ENOENT)
	wantErrno(t, img.CreateSnapshot(""), "snapshot create", syscall.EINVAL)
	if err := img.CreateSnapshot("s"); err != nil {
		t.Fatal(err)
	}
	img.Close()
	ro := mustOpen(t, path, nil)
	wantErrno(t, ro.CreateSnapshot("x"), "snapshot create", syscall.EROFS)
	ro.Close()
	_, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true, Snapshot: "s"})
	wantErrno(t, err, "open", syscall.EINVAL)
	_, err = oxcow.Open(path, &oxcow.OpenOptions{Snapshot: "missing"})
	wantErrno(t, err, "open", syscall.ENOENT)
}

// TestSnapshotWhileWriting creates snapshots while goroutines write (run with -race).
func TestSnapshotWhileWriting(t *testing.T) {
	needTool(t, "qemu-img")
	path := newImage(t, 8*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			buf := pattern(byte(g), 0, 64*kiB)
			for i := 0; i < 40; i++ {
				if _, err := img.WriteAt(buf, int64(g)*2*miB+int64(i%16)*64*kiB); err != nil {
					t.Error(err)
					return
				}
			}
		}(g)
	}
	for i := 0; i < 5; i++ {
		if err := img.CreateSnapshot("live"); err != nil {
			t.Fatal(err)
		}
	}
	wg.Wait()
	if list, err := img.Snapshots(); err != nil || len(list) != 5 {
		t.Fatalf("Snapshots() = %v, %v", list, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
}

// TestApplySnapshotOfAnotherSizeResizes reverts to a snapshot taken before the image grew:
// like qemu-img, the apply shrinks the disk back, and Size follows.
func TestApplySnapshotOfAnotherSizeResizes(t *testing.T) {
	needTool(t, "qemu-img")
	path := newImage(t, 8*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	if err := img.CreateSnapshot("small"); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(16*miB, false); err != nil {
		t.Fatal(err)
	}
	if _, err := img.WriteAt(pattern(3, 0, 4*kiB), 12*miB); err != nil {
		t.Fatal(err)
	}
	if err := img.ApplySnapshot("small"); err != nil {
		t.Fatal(err)
	}
	if img.Size() != 8*miB {
		t.Fatalf("Size() after applying an 8 MiB snapshot = %d", img.Size())
	}
	if _, err := img.WriteAt(pattern(4, 0, 4*kiB), 12*miB); err == nil {
		t.Fatal("a write past the snapshot's size succeeded")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
}
