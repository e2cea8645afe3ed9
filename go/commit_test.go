package oxcow_test

import (
	"bytes"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

// base.qcow2 (a pattern in its first MiB) <- top.qcow2, in a fresh directory.
func commitChain(t *testing.T) (base, top string) {
	t.Helper()
	dir := t.TempDir()
	base = filepath.Join(dir, "base.qcow2")
	top = filepath.Join(dir, "top.qcow2")
	if err := oxcow.Create(base, 4*mib, nil); err != nil {
		t.Fatal(err)
	}
	b := mustOpen(t, base, &oxcow.OpenOptions{Writable: true})
	if _, err := b.WriteAt(pattern(1, 0, mib), 0); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	return base, top
}

func TestCommitWhileWritingKeepsEveryWrite(t *testing.T) {
	needTool(t, "qemu-img")
	base, top := commitChain(t)
	img := mustOpen(t, top, &oxcow.OpenOptions{Writable: true})
	want := readAll(t, img)
	const blk = 4096
	var mu sync.Mutex
	var stop atomic.Bool
	var wg sync.WaitGroup
	for w := 0; w < 3; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; !stop.Load(); i++ {
				off := int64((i*7919+w*104729)%(4*mib/blk/3)*3+w) * blk
				data := pattern(byte(i+w), off, blk)
				if _, err := img.WriteAt(data, off); err != nil {
					t.Errorf("write during commit: %v", err)
					return
				}
				mu.Lock()
				copy(want[off:], data)
				mu.Unlock()
			}
		}(w)
	}
	var calls atomic.Int64
	var last, total atomic.Uint64
	for round := 0; round < 3; round++ {
		err := img.Commit(&oxcow.CommitOptions{
			KeepTop: round == 1,
			Progress: func(d, n uint64) {
				calls.Add(1)
				last.Store(d)
				total.Store(n)
			},
		})
		if err != nil {
			t.Fatalf("commit %d: %v", round, err)
		}
	}
	stop.Store(true)
	wg.Wait()
	if calls.Load() == 0 || last.Load() != total.Load() {
		t.Fatalf("progress: %d calls, last %d of %d", calls.Load(), last.Load(), total.Load())
	}
	if got := readAll(t, img); !bytes.Equal(got, want) {
		t.Fatalf("guest after commits: %s", firstDiff(got, want))
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, base)
	qemuCheck(t, top)
}

func TestCommitRefusals(t *testing.T) {
	needTool(t, "qemu-img")
	base, top := commitChain(t)
	ro := mustOpen(t, top, nil)
	wantErrno(t, ro.Commit(nil), "commit", syscall.EROFS)
	ro.Close()
	b := mustOpen(t, base, &oxcow.OpenOptions{Writable: true})
	wantErrno(t, b.Commit(nil), "commit", syscall.EINVAL)
	b.Close()
	img := mustOpen(t, top, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	wantErrno(t, img.Commit(&oxcow.CommitOptions{Base: "nowhere.qcow2"}), "commit", syscall.EINVAL)
	if err := img.Commit(&oxcow.CommitOptions{Base: base}); err != nil {
		t.Fatalf("commit into the base by path: %v", err)
	}
	img.Close()
	wantErrno(t, img.Commit(nil), "commit", syscall.EBADF)
}
