package oxcow_test

import (
	"bytes"
	"errors"
	"io"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"oxcow.dev/oxcow"
)

const mib = 1 << 20

func TestResizeGrowsAndShrinksLikeQemuImg(t *testing.T) {
	needTool(t, "qemu-img")
	path := newImage(t, 4*mib, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	data := pattern(7, 0, 64<<10)
	if _, err := img.WriteAt(data, 3*mib); err != nil {
		t.Fatal(err)
	}
	if err := img.Resize(100*mib, false); err != nil {
		t.Fatalf("grow: %v", err)
	}
	if img.Size() != 100*mib {
		t.Fatalf("Size() = %d after growing", img.Size())
	}
	if _, err := img.WriteAt(data, 100*mib-int64(len(data))); err != nil {
		t.Fatalf("write at the new end: %v", err)
	}
	wantErrno(t, img.Resize(mib, false), "resize", syscall.EINVAL)
	wantErrno(t, img.Resize(8*mib+100, false), "resize", syscall.EINVAL)
	if err := img.Resize(3*mib+64<<10, true); err != nil {
		t.Fatalf("shrink: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := img.ReadAt(got, 3*mib); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("data inside the new size: err %v, %s", err, firstDiff(got, data))
	}
	if n, err := img.ReadAt(got, 3*mib+32<<10); n != 32<<10 || err == nil {
		t.Fatalf("read across the new end: n=%d err=%v, want a short read", n, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
	out := run(t, "qemu-img", "info", "--output=json", path)
	if !bytes.Contains([]byte(out), []byte(`"virtual-size": 3211264`)) {
		t.Fatalf("qemu-img info after resize:\n%s", out)
	}
	ro := mustOpen(t, path, nil)
	defer ro.Close()
	wantErrno(t, ro.Resize(8*mib, false), "resize", syscall.EROFS)
}

// Goroutines write and read whole clusters across the boundary while another resizes the
// image back and forth: every error is EINVAL, and reads see zeros or a whole cluster.
func TestResizeLiveWithConcurrentIO(t *testing.T) {
	needTool(t, "qemu-img")
	const cs, small, big = 64 << 10, 8 * mib, 12 * mib
	path := newImage(t, big, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	var stop atomic.Bool
	var wg sync.WaitGroup
	var ok atomic.Int64
	fail := make(chan string, 16)
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			buf := make([]byte, cs)
			for i := 0; !stop.Load(); i++ {
				slot := int64((small-2*mib)/cs + (i*7+g*13)%((big-small+2*mib)/cs))
				var err error
				if g%2 == 0 {
					for j := range buf {
						buf[j] = byte(slot)
					}
					_, err = img.WriteAt(buf, slot*cs)
				} else {
					var n int
					n, err = img.ReadAt(buf, slot*cs)
					if err == nil && !bytes.Equal(buf[:n], bytes.Repeat([]byte{0}, n)) &&
						!bytes.Equal(buf[:n], bytes.Repeat([]byte{byte(slot)}, n)) {
						fail <- "torn or foreign cluster"
						return
					}
				}
				if err == nil {
					ok.Add(1)
				} else if !errorsIsEINVALOrEOF(err) {
					fail <- err.Error()
					return
				}
			}
		}(g)
	}
	for r := 0; r < 20; r++ {
		if err := img.Resize(small, true); err != nil {
			t.Fatal(err)
		}
		if err := img.Resize(big, false); err != nil {
			t.Fatal(err)
		}
	}
	stop.Store(true)
	wg.Wait()
	close(fail)
	for f := range fail {
		t.Error(f)
	}
	if ok.Load() == 0 {
		t.Error("no request succeeded")
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
}

// errorsIsEINVALOrEOF: a request racing a resize fails with EINVAL, or reads short at the end.
func errorsIsEINVALOrEOF(err error) bool {
	return errors.Is(err, syscall.EINVAL) || err == io.EOF
}
