package oxcow_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"oxcow.dev/oxcow"
)

func TestVersion(t *testing.T) {
	if got, want := oxcow.VersionNumber(), oxcow.HeaderVersionNumber; got != want {
		t.Fatalf("library version number %d != header version number %d", got, want)
	}
	n := oxcow.VersionNumber()
	want := fmtVersion(n)
	if got := oxcow.Version(); got != want {
		t.Fatalf("Version() = %q, want %q (from VersionNumber %d)", got, want, n)
	}
}

func fmtVersion(n int) string {
	return strings.Join([]string{fmtInt(n / 10000), fmtInt(n / 100 % 100), fmtInt(n % 100)}, ".")
}

func fmtInt(i int) string {
	const digits = "0123456789"
	if i < 10 {
		return digits[i : i+1]
	}
	return fmtInt(i/10) + digits[i%10:i%10+1]
}

func TestCreateAndInfo(t *testing.T) {
	cases := []struct {
		name string
		size uint64
		opts *oxcow.CreateOptions
		want oxcow.Info
	}{
		{"defaults", 64 * miB, nil, oxcow.Info{
			VirtualSize: 64 * miB, ClusterSize: 65536, Version: 3, RefcountBits: 16,
			Compression: oxcow.CompressionDeflate}},
		{"v2-4k", 10 * miB, &oxcow.CreateOptions{ClusterSize: 4096, Version: 2}, oxcow.Info{
			VirtualSize: 10 * miB, ClusterSize: 4096, Version: 2, RefcountBits: 16}},
		{"v3-extl2-zstd-lazy", 100 * miB, &oxcow.CreateOptions{
			ClusterSize: 128 * kiB, RefcountBits: 32, ExtendedL2: true,
			Compression: oxcow.CompressionZstd, LazyRefcounts: true}, oxcow.Info{
			VirtualSize: 100 * miB, ClusterSize: 128 * kiB, Version: 3, RefcountBits: 32,
			Compression: oxcow.CompressionZstd, ExtendedL2: true, LazyRefcounts: true}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			path := newImage(t, c.size, c.opts)
			img := mustOpen(t, path, nil)
			defer img.Close()
			if img.Size() != int64(c.size) {
				t.Fatalf("Size() = %d, want %d", img.Size(), c.size)
			}
			info, err := img.Info()
			if err != nil {
				t.Fatal(err)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			want := c.want
			want.FileSize = uint64(st.Size())
			want.ReadOnly = true
			if *info != want {
				t.Fatalf("Info() =\n  %+v\nwant\n  %+v", *info, want)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, path)
		})
	}
}

func TestCreateInvalid(t *testing.T) {
	dir := t.TempDir()
	err := oxcow.Create(filepath.Join(dir, "bad.qcow2"), miB, &oxcow.CreateOptions{ClusterSize: 1000})
	oe := wantErrno(t, err, "create", syscall.EINVAL)
	if oe.Message == "" || !strings.Contains(oe.Error(), "bad.qcow2") {
		t.Fatalf("error lacks a message or the path: %q", oe.Error())
	}
	err = oxcow.Create(filepath.Join(dir, "nodir", "x.qcow2"), miB, nil)
	wantErrno(t, err, "create", syscall.ENOENT)
	err = oxcow.Create(filepath.Join(dir, "b.qcow2"), miB, &oxcow.CreateOptions{BackingFile: "base.raw"})
	wantErrno(t, err, "create", syscall.EINVAL) // a backing file needs a format
}

func TestRoundTrip(t *testing.T) {
	// Not a multiple of the cluster size; Create rounds the size up to a 512-byte sector.
	const size = 8*miB + 12288 + 512
	path := newImage(t, size, &oxcow.CreateOptions{ClusterSize: 4096})
	ref := make([]byte, size)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	if img.Size() != size {
		t.Fatalf("Size() = %d, want %d", img.Size(), size)
	}
	writes := []struct {
		off int64
		n   int
	}{
		{0, 512}, {511, 1}, {4095, 2}, {10000, 70000}, {miB - 7, 3 * 4096}, {3 * miB, 2 * miB},
		{size - 100, 100}, {size - 5000, 1}, {5*miB + 1, 0},
	}
	for i, w := range writes {
		data := pattern(byte(i+1), w.off, w.n)
		n, err := img.WriteAt(data, w.off)
		if err != nil || n != w.n {
			t.Fatalf("WriteAt(%d bytes at %d) = %d, %v", w.n, w.off, n, err)
		}
		copy(ref[w.off:], data)
		// Immediate read-back of the written range and its surroundings.
		lo, hi := w.off-100, w.off+int64(w.n)+100
		if lo < 0 {
			lo = 0
		}
		if hi > size {
			hi = size
		}
		got := make([]byte, hi-lo)
		if n, err := img.ReadAt(got, lo); err != nil || n != len(got) {
			t.Fatalf("ReadAt(%d at %d) = %d, %v", len(got), lo, n, err)
		}
		if d := firstDiff(got, ref[lo:hi]); d != "" {
			t.Fatalf("after write %d: %s (relative to offset %d)", i, d, lo)
		}
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(readAll(t, img), ref); d != "" {
		t.Fatalf("whole image before close: %s", d)
	}
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	// Reopen read-only: the data persisted.
	img = mustOpen(t, path, nil)
	if d := firstDiff(readAll(t, img), ref); d != "" {
		t.Fatalf("whole image after reopen: %s", d)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}

	rawPath := filepath.Join(t.TempDir(), "ref.raw")
	if err := os.WriteFile(rawPath, ref, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	qemuCompareRaw(t, path, rawPath)
}

func TestCreateRoundsToSector(t *testing.T) {
	path := newImage(t, miB+1, nil)
	img := mustOpen(t, path, nil)
	defer img.Close()
	if img.Size() != miB+512 {
		t.Fatalf("Size() = %d, want %d", img.Size(), miB+512)
	}
}

func TestReadAtEOF(t *testing.T) {
	const size = miB
	path := newImage(t, size, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	tail := pattern(7, size-10, 10)
	if _, err := img.WriteAt(tail, size-10); err != nil {
		t.Fatal(err)
	}

	// A read crossing the end returns the bytes before it and io.EOF.
	buf := bytes.Repeat([]byte{0xee}, 64)
	n, err := img.ReadAt(buf, size-10)
	if n != 10 || err != io.EOF {
		t.Fatalf("ReadAt across EOF = %d, %v; want 10, io.EOF", n, err)
	}
	if !bytes.Equal(buf[:10], tail) {
		t.Fatalf("ReadAt across EOF returned %x, want %x", buf[:10], tail)
	}
	if !bytes.Equal(buf[10:], bytes.Repeat([]byte{0xee}, 54)) {
		t.Fatal("ReadAt across EOF wrote past the bytes it returned")
	}
	// Exactly up to the end: no error.
	if n, err := img.ReadAt(buf[:10], size-10); n != 10 || err != nil {
		t.Fatalf("ReadAt up to EOF = %d, %v; want 10, nil", n, err)
	}
	// At and past the end: 0, io.EOF.
	for _, off := range []int64{size, size + 1, 1 << 62} {
		if n, err := img.ReadAt(buf, off); n != 0 || err != io.EOF {
			t.Fatalf("ReadAt(%d) = %d, %v; want 0, io.EOF", off, n, err)
		}
	}
	// Empty reads succeed anywhere.
	if n, err := img.ReadAt(nil, size+100); n != 0 || err != nil {
		t.Fatalf("empty ReadAt = %d, %v", n, err)
	}
	// io.SectionReader / io.ReadFull work on top of ReaderAt.
	sr := io.NewSectionReader(img, size-10, 100)
	all, err := io.ReadAll(sr)
	if err != nil || !bytes.Equal(all, tail) {
		t.Fatalf("SectionReader = %x, %v", all, err)
	}
	// Negative offsets are invalid.
	_, err = img.ReadAt(buf, -1)
	wantErrno(t, err, "read", syscall.EINVAL)
}

func TestErrors(t *testing.T) {
	const size = 4 * miB
	path := newImage(t, size, nil)

	t.Run("ENOENT", func(t *testing.T) {
		missing := filepath.Join(t.TempDir(), "missing.qcow2")
		img, err := oxcow.Open(missing, nil)
		if img != nil {
			t.Fatal("Open of a missing file returned an image")
		}
		oe := wantErrno(t, err, "open", syscall.ENOENT)
		if !errors.Is(err, fs.ErrNotExist) {
			t.Fatal("errors.Is(err, fs.ErrNotExist) is false")
		}
		if oe.Path != missing || !strings.Contains(err.Error(), missing) {
			t.Fatalf("error does not name the path: %v", err)
		}
		if oe.Message == "" {
			t.Fatal("open error has no message from the library")
		}
	})

	t.Run("not-qcow2", func(t *testing.T) {
		p := filepath.Join(t.TempDir(), "junk")
		if err := os.WriteFile(p, bytes.Repeat([]byte("junk"), 1024), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := oxcow.Open(p, nil)
		wantErrno(t, err, "open", syscall.EINVAL)
	})

	t.Run("EINVAL", func(t *testing.T) {
		img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
		defer img.Close()
		buf := make([]byte, 4096)
		for _, off := range []int64{size - 4095, size, size + 4096, -1, 1 << 62} {
			n, err := img.WriteAt(buf, off)
			if n != 0 {
				t.Fatalf("WriteAt(%d) wrote %d bytes", off, n)
			}
			wantErrno(t, err, "write", syscall.EINVAL)
		}
		wantErrno(t, img.WriteZeroes(size-1, 2, false), "write zeroes", syscall.EINVAL)
		wantErrno(t, img.Discard(0, size+65536), "discard", syscall.EINVAL)
		_, err := img.BlockStatus(size, 1)
		wantErrno(t, err, "block status", syscall.EINVAL)
		_, err = img.BlockStatus(0, 0)
		wantErrno(t, err, "block status", syscall.EINVAL)
		// Nothing was written by the failed calls.
		if info, err := img.Info(); err != nil {
			t.Fatal(err)
		} else if info.ReadOnly {
			t.Fatal("writable image reports ReadOnly")
		}
		ext, err := img.BlockStatus(0, size)
		if err != nil {
			t.Fatal(err)
		}
		if ext.Allocated() || ext.Length != size {
			t.Fatalf("failed writes allocated clusters: %+v", ext)
		}
	})

	t.Run("EROFS", func(t *testing.T) {
		img := mustOpen(t, path, nil)
		defer img.Close()
		info, err := img.Info()
		if err != nil {
			t.Fatal(err)
		}
		if !info.ReadOnly {
			t.Fatal("read-only open: Info().ReadOnly is false")
		}
		n, err := img.WriteAt([]byte("hello"), 0)
		if n != 0 {
			t.Fatalf("WriteAt on a read-only image wrote %d bytes", n)
		}
		wantErrno(t, err, "write", syscall.EROFS)
		wantErrno(t, img.WriteZeroes(0, 65536, true), "write zeroes", syscall.EROFS)
		wantErrno(t, img.Discard(0, 65536), "discard", syscall.EROFS)
		if err := img.Flush(); err != nil {
			t.Fatalf("Flush on a read-only image: %v", err)
		}
	})

	t.Run("EAGAIN", func(t *testing.T) {
		w := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
		defer w.Close()
		_, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
		wantErrno(t, err, "open", syscall.EAGAIN)
		// ForceShare reads despite the writer.
		r := mustOpen(t, path, &oxcow.OpenOptions{ForceShare: true})
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		// ForceShare is read-only only.
		_, err = oxcow.Open(path, &oxcow.OpenOptions{Writable: true, ForceShare: true})
		wantErrno(t, err, "open", syscall.EINVAL)
	})

	t.Run("EBADF-after-close", func(t *testing.T) {
		img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
		if err := img.Close(); err != nil {
			t.Fatal(err)
		}
		if err := img.Close(); err != nil {
			t.Fatalf("second Close = %v, want nil", err)
		}
		buf := make([]byte, 10)
		_, err := img.ReadAt(buf, 0)
		wantErrno(t, err, "read", syscall.EBADF)
		_, err = img.WriteAt(buf, 0)
		wantErrno(t, err, "write", syscall.EBADF)
		wantErrno(t, img.Flush(), "flush", syscall.EBADF)
		wantErrno(t, img.WriteZeroes(0, 1, false), "write zeroes", syscall.EBADF)
		wantErrno(t, img.Discard(0, 1), "discard", syscall.EBADF)
		wantErrno(t, img.Reopen(false), "reopen", syscall.EBADF)
		_, err = img.Check(oxcow.CheckFixNone)
		wantErrno(t, err, "check", syscall.EBADF)
		_, err = img.Info()
		wantErrno(t, err, "info", syscall.EBADF)
		_, err = img.BlockStatus(0, 1)
		wantErrno(t, err, "block status", syscall.EBADF)
		if img.Size() != size {
			t.Fatalf("Size() after Close = %d", img.Size())
		}
	})
}

func TestZeroesDiscardBlockStatus(t *testing.T) {
	const cs = 65536
	const size = 64 * cs
	path := newImage(t, size, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	ref := make([]byte, size)
	write := func(off int64, n int, seed byte) {
		t.Helper()
		d := pattern(seed, off, n)
		if _, err := img.WriteAt(d, off); err != nil {
			t.Fatal(err)
		}
		copy(ref[off:], d)
	}
	zero := func(off, n int64) {
		for i := off; i < off+n; i++ {
			ref[i] = 0
		}
	}
	status := func(off, n int64) oxcow.Extent {
		t.Helper()
		e, err := img.BlockStatus(off, n)
		if err != nil {
			t.Fatalf("BlockStatus(%d, %d): %v", off, n, err)
		}
		if e.Offset != off || e.Length < 1 || e.Length > n {
			t.Fatalf("BlockStatus(%d, %d) = %+v", off, n, e)
		}
		return e
	}

	// Unallocated image: one extent covering everything, not allocated.
	if e := status(0, size); e.Allocated() || e.Data() || e.Length != size {
		t.Fatalf("fresh image: %+v", e)
	}
	write(0, 8*cs, 1)
	e := status(0, size)
	if !e.Data() || e.Length != 8*cs || e.HostOffset == 0 || e.HostOffset%cs != 0 {
		t.Fatalf("after writing 8 clusters: %+v", e)
	}
	if e := status(8*cs, size-8*cs); e.Allocated() || e.Length != size-8*cs {
		t.Fatalf("after the written clusters: %+v", e)
	}

	// Zeroes keeping the allocation: reads zero, status zero.
	if err := img.WriteZeroes(cs, 2*cs, false); err != nil {
		t.Fatal(err)
	}
	zero(cs, 2*cs)
	if e := status(cs, 2*cs); !e.Zero() || e.Length != 2*cs {
		t.Fatalf("after WriteZeroes: %+v", e)
	}
	// Unaligned zeroes inside a cluster: the rest of the cluster keeps its data.
	if err := img.WriteZeroes(4*cs+100, 1000, true); err != nil {
		t.Fatal(err)
	}
	zero(4*cs+100, 1000)
	// Zeroes with unmap.
	if err := img.WriteZeroes(5*cs, cs, true); err != nil {
		t.Fatal(err)
	}
	zero(5*cs, cs)
	if e := status(5*cs, cs); !e.Zero() || e.Data() {
		t.Fatalf("after WriteZeroes(mayUnmap): %+v", e)
	}
	// Discard of whole clusters: they read as zeros and hold no data.
	if err := img.Discard(6*cs, 2*cs); err != nil {
		t.Fatal(err)
	}
	zero(6*cs, 2*cs)
	if e := status(6*cs, 2*cs); e.Data() {
		t.Fatalf("after Discard: %+v", e)
	}
	// Discard of a partial cluster leaves it unchanged.
	if err := img.Discard(100, 1000); err != nil {
		t.Fatal(err)
	}
	if e := status(0, cs); !e.Data() || e.Length != cs {
		t.Fatalf("after partial Discard: %+v", e)
	}
	if d := firstDiff(readAll(t, img), ref); d != "" {
		t.Fatalf("contents: %s", d)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	rawPath := filepath.Join(t.TempDir(), "ref.raw")
	if err := os.WriteFile(rawPath, ref, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	qemuCompareRaw(t, path, rawPath)
}

// TestReopen: a read-only handle becomes writable and back, keeping its data.
func TestReopen(t *testing.T) {
	path := newImage(t, miB, nil)
	img := mustOpen(t, path, nil)
	defer img.Close()
	err := img.Reopen(true)
	if err != nil {
		t.Fatalf("Reopen(true): %v", err)
	}
	if _, err := img.WriteAt([]byte{42}, 0); err != nil {
		t.Fatalf("write after Reopen(true): %v", err)
	}
	if err := img.Reopen(false); err != nil {
		t.Fatalf("Reopen(false): %v", err)
	}
	_, err = img.WriteAt([]byte{1}, 0)
	wantErrno(t, err, "write", syscall.EROFS)
	b := make([]byte, 1)
	if _, err := img.ReadAt(b, 0); err != nil || b[0] != 42 {
		t.Fatalf("read after reopen = %v, %v", b, err)
	}
}

func TestCheck(t *testing.T) {
	path := newImage(t, 4*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	if _, err := img.WriteAt(pattern(3, 0, 300000), 0); err != nil {
		t.Fatal(err)
	}
	r, err := img.Check(oxcow.CheckFixNone)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	if !r.Clean() {
		t.Fatalf("Check of a fresh image is not clean: %+v", r)
	}
	// 300000 bytes = 5 clusters of 64 KiB, out of 64.
	if r.AllocatedClusters != 5 || r.TotalClusters != 64 {
		t.Fatalf("Check counts: %+v", r)
	}
}

// TestConcurrentClose closes an image while other goroutines use it: every call either
// succeeds or fails with EBADF; nothing crashes.
func TestConcurrentClose(t *testing.T) {
	path := newImage(t, 8*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	var wg sync.WaitGroup
	start := make(chan struct{})
	errs := make(chan error, 1000)
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			<-start
			buf := pattern(byte(g), int64(g)*miB, 64*kiB)
			for i := 0; ; i++ {
				var err error
				switch i % 4 {
				case 0:
					_, err = img.WriteAt(buf, int64(g)*miB)
				case 1:
					_, err = img.ReadAt(buf, int64(g)*miB)
				case 2:
					_, err = img.BlockStatus(0, 8*miB)
				case 3:
					err = img.Flush()
				}
				if err != nil {
					if !errors.Is(err, syscall.EBADF) {
						errs <- err
					}
					return
				}
			}
		}(g)
	}
	close(start)
	time.Sleep(50 * time.Millisecond)
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("call racing Close: %v", err)
	}
	qemuCheck(t, path)
}

// TestFinalizer: a leaked writable image is closed by the garbage collector, which releases
// its lock so the image can be opened read-write again.
func TestFinalizer(t *testing.T) {
	path := newImage(t, miB, nil)
	func() {
		img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
		if _, err := img.WriteAt([]byte("leaked"), 0); err != nil {
			t.Fatal(err)
		}
		// Precondition: the open image holds the write lock.
		_, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
		wantErrno(t, err, "open", syscall.EAGAIN)
	}()
	var img *oxcow.Image
	var err error
	for i := 0; i < 50; i++ {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
		img, err = oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EAGAIN) {
			t.Fatal(err)
		}
	}
	if err != nil {
		t.Fatalf("leaked image was not closed by its finalizer: %v", err)
	}
	defer img.Close()
	got := make([]byte, 6)
	if _, err := img.ReadAt(got, 0); err != nil || string(got) != "leaked" {
		t.Fatalf("data written through the leaked image: %q, %v", got, err)
	}
}

// TestDirectWritethrough: O_DIRECT and writethrough opens work with ordinary (unaligned) Go
// buffers and offsets (the library bounces O_DIRECT transfers through aligned buffers).
func TestDirectWritethrough(t *testing.T) {
	for _, opts := range []oxcow.OpenOptions{
		{Writable: true, Writethrough: true},
		{Writable: true, Direct: true},
		{Writable: true, Direct: true, Writethrough: true},
	} {
		opts := opts
		t.Run(fmt.Sprintf("direct=%v,writethrough=%v", opts.Direct, opts.Writethrough), func(t *testing.T) {
			path := newImage(t, 4*miB, nil)
			img, err := oxcow.Open(path, &opts)
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 100001)
			data := pattern(9, 777, len(buf)-1)
			copy(buf[1:], data) // buf[1:] is not aligned
			if _, err := img.WriteAt(buf[1:], 777); err != nil {
				t.Fatalf("WriteAt: %v", err)
			}
			got := make([]byte, len(buf))
			if _, err := img.ReadAt(got[1:], 777); err != nil {
				t.Fatalf("ReadAt: %v", err)
			}
			if d := firstDiff(got[1:], data); d != "" {
				t.Fatal(d)
			}
			if err := img.Close(); err != nil {
				t.Fatal(err)
			}
			qemuCheck(t, path)
			ref := make([]byte, 4*miB)
			copy(ref[777:], data)
			if d := firstDiff(qemuToRaw(t, path), ref); d != "" {
				t.Fatalf("qemu reads: %s", d)
			}
		})
	}
}
