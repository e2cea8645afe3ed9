package oxcow_test

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"oxcow.dev/oxcow"
)

// sharedByte is the content every writer puts at position p of the shared region, so that
// overlapping concurrent writes have one well-defined outcome. Never 0, so a reader can tell
// "not written yet" (0) from "written" (sharedByte) from garbage (anything else).
func sharedByte(p int64) byte { return byte(p%251) + 1 }

func sharedData(off int64, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = sharedByte(off + int64(i))
	}
	return b
}

// TestConcurrentIO: 8 goroutines share one image. Each owns a private region (random
// unaligned writes, zeroes and discards, verified by reads against its own model) and all of
// them write and read an overlapping shared region concurrently. Every write is mirrored
// into a raw reference file; afterwards qemu-img check must pass and qemu-img compare must
// find the image identical to the reference.
func TestConcurrentIO(t *testing.T) {
	const (
		goroutines = 8
		cs         = 65536
		region     = 2 * miB
		sharedOff  = goroutines * region
		sharedLen  = 6 * miB
		size       = sharedOff + sharedLen
		opsPerG    = 60
	)
	dir := t.TempDir()
	path := filepath.Join(dir, "conc.qcow2")
	if err := oxcow.Create(path, size, &oxcow.CreateOptions{ClusterSize: cs}); err != nil {
		t.Fatal(err)
	}
	rawPath := filepath.Join(dir, "conc.raw")
	raw, err := os.Create(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if err := raw.Truncate(size); err != nil {
		t.Fatal(err)
	}

	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)

	var wg sync.WaitGroup
	errc := make(chan error, goroutines)
	start := make(chan struct{})
	for g := 0; g < goroutines; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			<-start
			errc <- worker(img, raw, rand.New(rand.NewSource(seed+int64(g))), g, int64(g)*region, region,
				sharedOff, sharedLen, cs, opsPerG)
		}(g)
	}
	close(start)
	wg.Wait()
	close(errc)
	for err := range errc {
		if err != nil {
			t.Error(err)
		}
	}
	if t.Failed() {
		img.Close()
		return
	}
	if err := img.Flush(); err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile(rawPath)
	if err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(readAll(t, img), want); d != "" {
		t.Fatalf("image vs reference before close: %s", d)
	}
	if err := img.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	qemuCheck(t, path)
	qemuCompareRaw(t, path, rawPath)
}

func worker(img *oxcow.Image, raw *os.File, rng *rand.Rand, g int, base, length, sharedOff, sharedLen, cs int64, ops int) error {
	model := make([]byte, length)
	fail := func(format string, args ...interface{}) error {
		return fmt.Errorf("goroutine %d: "+format, append([]interface{}{g}, args...)...)
	}
	verify := func(off, n int64) error {
		got := make([]byte, n)
		if k, err := img.ReadAt(got, base+off); err != nil || int64(k) != n {
			return fail("ReadAt(%d, %d) = %d, %v", base+off, n, k, err)
		}
		if d := firstDiff(got, model[off:off+n]); d != "" {
			return fail("private region read at %d+%d: %s", base+off, n, d)
		}
		return nil
	}
	for i := 0; i < ops; i++ {
		switch op := rng.Intn(10); {
		case op < 5: // private unaligned write
			off := rng.Int63n(length)
			n := 1 + rng.Int63n(min64(length-off, 3*cs))
			data := make([]byte, n)
			rng.Read(data)
			if k, err := img.WriteAt(data, base+off); err != nil || int64(k) != n {
				return fail("WriteAt(%d, %d) = %d, %v", base+off, n, k, err)
			}
			if _, err := raw.WriteAt(data, base+off); err != nil {
				return err
			}
			copy(model[off:], data)
			if err := verify(off, n); err != nil {
				return err
			}
		case op == 5: // private zeroes (unaligned, maybe unmapping)
			off := rng.Int63n(length)
			n := 1 + rng.Int63n(min64(length-off, 2*cs))
			if err := img.WriteZeroes(base+off, n, rng.Intn(2) == 0); err != nil {
				return fail("WriteZeroes(%d, %d): %v", base+off, n, err)
			}
			z := make([]byte, n)
			if _, err := raw.WriteAt(z, base+off); err != nil {
				return err
			}
			copy(model[off:], z)
			if err := verify(0, length); err != nil {
				return err
			}
		case op == 6: // private discard of whole clusters
			off := rng.Int63n(length/cs) * cs
			n := (1 + rng.Int63n(min64((length-off)/cs, 3))) * cs
			if err := img.Discard(base+off, n); err != nil {
				return fail("Discard(%d, %d): %v", base+off, n, err)
			}
			z := make([]byte, n)
			if _, err := raw.WriteAt(z, base+off); err != nil {
				return err
			}
			copy(model[off:], z)
			if err := verify(off, n); err != nil {
				return err
			}
		case op < 9: // shared write: overlapping with the other goroutines
			off := rng.Int63n(sharedLen)
			n := 1 + rng.Int63n(min64(sharedLen-off, 4*cs))
			data := sharedData(sharedOff+off, int(n))
			if k, err := img.WriteAt(data, sharedOff+off); err != nil || int64(k) != n {
				return fail("shared WriteAt(%d, %d) = %d, %v", sharedOff+off, n, k, err)
			}
			if _, err := raw.WriteAt(data, sharedOff+off); err != nil {
				return err
			}
			// What this goroutine just wrote must read back (others write the same bytes).
			got := make([]byte, n)
			if _, err := img.ReadAt(got, sharedOff+off); err != nil {
				return fail("shared ReadAt: %v", err)
			}
			if !bytes.Equal(got, data) {
				return fail("shared read-back at %d+%d: %s", sharedOff+off, n, firstDiff(got, data))
			}
		default: // shared read: every byte is either unwritten (0) or the shared pattern
			off := rng.Int63n(sharedLen)
			n := 1 + rng.Int63n(min64(sharedLen-off, 8*cs))
			got := make([]byte, n)
			if _, err := img.ReadAt(got, sharedOff+off); err != nil {
				return fail("shared ReadAt: %v", err)
			}
			for j, b := range got {
				p := sharedOff + off + int64(j)
				if b != 0 && b != sharedByte(p) {
					return fail("shared region byte %d = %#x, want 0 or %#x", p, b, sharedByte(p))
				}
			}
		}
	}
	return verify(0, length)
}
