package oxcow_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"oxcow.dev/oxcow"
)

// TestReadQemuWritten: images written by qemu-io in several variants read back through Go
// byte-for-byte like qemu-img convert -O raw.
func TestReadQemuWritten(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	variants := []struct {
		name, opts string
		cluster    int64
	}{
		{"v3-64k", "cluster_size=65536", 65536},
		{"v2-compat010", "compat=0.10", 65536},
		{"v3-4k", "cluster_size=4096", 4096},
		{"v3-extl2", "cluster_size=131072,extended_l2=on", 131072},
		{"v3-zstd", "compression_type=zstd", 65536},
		{"v3-refcount1", "refcount_bits=1", 65536},
	}
	for _, v := range variants {
		t.Run(v.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "qemu.qcow2")
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", v.opts, path, "16M")
			c := v.cluster
			cmds := []string{
				"write -P 0x11 0 64k",
				"write -P 0x22 100k 3k",
				"write -P 0x33 1M 1M",
				"write -z 1200k 128k",
				"write -P 0x44 5M 777",
				"write -P 0x55 16773120 4096",                     // the last 4 KiB
				"write -c -P 0x66 " + itoa(8<<20) + " " + itoa(c), // one compressed cluster
				"discard " + itoa(1<<20+c) + " " + itoa(c),
			}
			args := []string{"-f", "qcow2"}
			for _, cmd := range cmds {
				args = append(args, "-c", cmd)
			}
			run(t, "qemu-io", append(args, path)...)
			want := qemuToRaw(t, path)

			img := mustOpen(t, path, nil)
			defer img.Close()
			if img.Size() != 16*miB {
				t.Fatalf("Size() = %d", img.Size())
			}
			if d := firstDiff(readAll(t, img), want); d != "" {
				t.Fatalf("oxcow reads differ from qemu-img convert: %s", d)
			}
			// Also read in odd-sized pieces.
			buf := make([]byte, 12345)
			for off := int64(0); off < img.Size(); off += int64(len(buf)) {
				n, err := img.ReadAt(buf, off)
				if int64(n) != min64(int64(len(buf)), img.Size()-off) || (err != nil && off+int64(n) != img.Size()) {
					t.Fatalf("ReadAt(%d) = %d, %v", off, n, err)
				}
				if d := firstDiff(buf[:n], want[off:off+int64(n)]); d != "" {
					t.Fatalf("piece at %d: %s", off, d)
				}
			}
			e, err := img.BlockStatus(8<<20, c)
			if err != nil {
				t.Fatal(err)
			}
			if !e.Compressed() || !e.Allocated() {
				t.Fatalf("compressed cluster: %+v", e)
			}
			// write -z 1200k 128k: the first fully covered cluster (subcluster with
			// extended L2) reads as zero; a partially covered one may hold zero data.
			gran := c
			if strings.Contains(v.opts, "extended_l2=on") {
				gran = c / 32
			}
			zoff := (1200*kiB + gran - 1) / gran * gran
			if zoff+gran > 1328*kiB {
				t.Fatalf("test bug: no whole granule in the write -z range")
			}
			e, err = img.BlockStatus(zoff, gran)
			if err != nil {
				t.Fatal(err)
			}
			if !e.Zero() || e.Data() || e.Length != gran {
				t.Fatalf("write -z range at %d: %+v", zoff, e)
			}
		})
	}
}

// TestBacking: an oxcow overlay on a QEMU-written base reads through to the base; Go writes
// land in the overlay; NoBacking hides the base.
func TestBacking(t *testing.T) {
	needTool(t, "qemu-img")
	needTool(t, "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xaa 0 4M", base)
	overlay := filepath.Join(dir, "overlay.qcow2")
	err := oxcow.Create(overlay, 0, &oxcow.CreateOptions{BackingFile: "base.qcow2", BackingFormat: "qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	img := mustOpen(t, overlay, &oxcow.OpenOptions{Writable: true})
	if img.Size() != 4*miB {
		t.Fatalf("overlay size %d, want the base's 4 MiB", img.Size())
	}
	info, err := img.Info()
	if err != nil {
		t.Fatal(err)
	}
	if !info.HasBacking || info.BackingFile != "base.qcow2" || info.BackingFormat != "qcow2" {
		t.Fatalf("Info() backing = %v %q %q", info.HasBacking, info.BackingFile, info.BackingFormat)
	}
	if _, err := img.WriteAt([]byte(strings.Repeat("x", 1000)), 70000); err != nil {
		t.Fatal(err)
	}
	e, err := img.BlockStatus(0, 65536)
	if err != nil {
		t.Fatal(err)
	}
	if !e.Backing() || e.Allocated() {
		t.Fatalf("unwritten overlay cluster: %+v", e)
	}
	got := readAll(t, img)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if d := firstDiff(got, qemuToRaw(t, overlay)); d != "" {
		t.Fatalf("overlay contents differ from qemu-img convert: %s", d)
	}
	if got[0] != 0xaa || got[70000] != 'x' || got[69999] != 0xaa || got[71000] != 0xaa {
		t.Fatal("overlay does not combine base and overlay data")
	}
	qemuCheck(t, overlay)

	img = mustOpen(t, overlay, &oxcow.OpenOptions{NoBacking: true})
	defer img.Close()
	// Cluster 0 was never written in the overlay: zeros without the backing file. Cluster 1
	// was copied from the base on the first write (copy-on-write), so it holds base data.
	b := make([]byte, 3)
	if _, err := img.ReadAt(b[:1], 0); err != nil || b[0] != 0 {
		t.Fatalf("NoBacking read of an unwritten cluster = %x, %v; want 00", b[:1], err)
	}
	if _, err := img.ReadAt(b, 65536); err != nil || b[0] != 0xaa {
		t.Fatalf("NoBacking read of a copied-on-write cluster = %x, %v; want aa", b[:1], err)
	}
	if _, err := img.ReadAt(b, 69999); err != nil || b[0] != 0xaa || b[1] != 'x' {
		t.Fatalf("NoBacking read = %x, %v; want aa 78", b[:2], err)
	}
	if _, err := os.Stat(base); err != nil {
		t.Fatal(err)
	}
}

func min64(a, b int64) int64 {
	if a < b {
		return a
	}
	return b
}

func itoa(i int64) string { return fmtInt(int(i)) }
