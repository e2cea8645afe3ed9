package oxcow_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"oxcow.dev/oxcow"
)

// qemuBitmap is one entry of qemu-img info's "bitmaps" list.
type qemuBitmap struct {
	Flags       []string `json:"flags"`
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
}

// qemuBitmaps returns the bitmaps qemu-img info reports for path.
func qemuBitmaps(t *testing.T, path string) []qemuBitmap {
	t.Helper()
	needTool(t, "qemu-img")
	out, err := exec.Command("qemu-img", "info", "-U", "--output=json", path).Output()
	if err != nil {
		t.Fatalf("qemu-img info %s: %v", path, err)
	}
	var info struct {
		FormatSpecific struct {
			Data struct {
				Bitmaps []qemuBitmap `json:"bitmaps"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info JSON: %v\n%s", err, out)
	}
	return info.FormatSpecific.Data.Bitmaps
}

// span is a guest range [Off, Off+Len).
type span struct{ Off, Len int64 }

// qemuDirty returns the dirty ranges of bitmap name as QEMU reports them: qemu-nbd exports the
// bitmap and qemu-img map reads it through x-dirty-bitmap (dirty ranges show "data": false).
func qemuDirty(t *testing.T, path, name string) []span {
	t.Helper()
	needTool(t, "qemu-nbd")
	tmp := t.TempDir()
	sock, pidFile := filepath.Join(tmp, "nbd.sock"), filepath.Join(tmp, "nbd.pid")
	run(t, "qemu-nbd", "-r", "-f", "qcow2", "-B", name, "-k", sock, "--pid-file="+pidFile, "--fork", path)
	opts := fmt.Sprintf("driver=nbd,server.type=unix,server.path=%s,x-dirty-bitmap=qemu:dirty-bitmap:%s", sock, name)
	out, err := exec.Command("qemu-img", "map", "--output=json", "--image-opts", opts).Output()
	if err != nil {
		t.Fatalf("qemu-img map of the bitmap: %v", err)
	}
	waitExit(t, pidFile)
	var rows []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal(out, &rows); err != nil {
		t.Fatalf("qemu-img map JSON: %v\n%s", err, out)
	}
	var spans []span
	for _, r := range rows {
		if r.Data {
			continue
		}
		if n := len(spans); n > 0 && spans[n-1].Off+spans[n-1].Len == r.Start {
			spans[n-1].Len += r.Length
		} else {
			spans = append(spans, span{r.Start, r.Length})
		}
	}
	return spans
}

// waitExit waits until the process whose pid is in pidFile is gone: qemu-nbd exits after its
// one client, and holds the image's lock until then.
func waitExit(t *testing.T, pidFile string) {
	t.Helper()
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 500; i++ {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("qemu-nbd (pid %d) did not exit", pid)
}

// oxcowDirty collects the dirty ranges of bitmap name through DirtyExtents.
func oxcowDirty(t *testing.T, img *oxcow.Image, name string) []span {
	t.Helper()
	var spans []span
	it := img.DirtyExtents(name, 0, img.Size())
	for it.Next() {
		e := it.Extent()
		if !e.Dirty() {
			t.Fatalf("DirtyExtents returned a clean extent %+v", e)
		}
		spans = append(spans, span{e.Offset, e.Length})
	}
	if err := it.Err(); err != nil {
		t.Fatalf("DirtyExtents(%s): %v", name, err)
	}
	return spans
}

// checkDirty asserts that oxcow (read-only open) and QEMU report exactly want for name.
func checkDirty(t *testing.T, path, name string, want []span) {
	t.Helper()
	img := mustOpen(t, path, nil)
	got := oxcowDirty(t, img, name)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("oxcow dirty ranges of %s = %v, want %v", name, got, want)
	}
	if q := qemuDirty(t, path, name); !reflect.DeepEqual(q, want) {
		t.Errorf("QEMU dirty ranges of %s = %v, want %v", name, q, want)
	}
}

// TestBitmapAddListRemove: bitmaps added through Go are listed with their flags, appear in
// qemu-img info identically, and go away with RemoveBitmap.
func TestBitmapAddListRemove(t *testing.T) {
	path := newImage(t, 64*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	err := img.AddBitmap("a", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.AddBitmap("b", 4096, true); err != nil {
		t.Fatal(err)
	}
	got, err := img.Bitmaps()
	if err != nil {
		t.Fatal(err)
	}
	want := []oxcow.Bitmap{
		{Name: "a", Granularity: 65536, Enabled: true, Auto: true},
		{Name: "b", Granularity: 4096},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Bitmaps() = %+v, want %+v", got, want)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	wantQ := []qemuBitmap{
		{Flags: []string{"auto"}, Name: "a", Granularity: 65536},
		{Flags: []string{}, Name: "b", Granularity: 4096},
	}
	if q := qemuBitmaps(t, path); !reflect.DeepEqual(q, wantQ) {
		t.Fatalf("qemu-img info bitmaps = %+v, want %+v", q, wantQ)
	}
	qemuCheck(t, path)

	img = mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	if err := img.RemoveBitmap("a"); err != nil {
		t.Fatal(err)
	}
	if got, err := img.Bitmaps(); err != nil || len(got) != 1 || got[0].Name != "b" {
		t.Fatalf("after remove: %+v, %v", got, err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if q := qemuBitmaps(t, path); len(q) != 1 || q[0].Name != "b" {
		t.Fatalf("qemu-img info after remove: %+v", q)
	}
	qemuCheck(t, path)
}

// TestBitmapDirtyExtents: writes of every kind through Go are tracked at granule resolution,
// merged, cleared, frozen and thawed exactly as QEMU then reports them; QEMU's writes are seen.
func TestBitmapDirtyExtents(t *testing.T) {
	needTool(t, "qemu-io")
	path := newImage(t, 32*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	err := img.AddBitmap("b", 64*kiB, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.AddBitmap("m", miB, true); err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err = img.WriteAt(pattern(1, 0, 100), 70*kiB) // sub-granule
	must(err)
	_, err = img.WriteAt(pattern(2, 0, 70*kiB), 2*miB) // two granules
	must(err)
	must(img.WriteZeroes(8*miB, 64*kiB, false))
	must(img.Discard(12*miB, 128*kiB))
	must(img.DisableBitmap("b"))
	_, err = img.WriteAt(pattern(3, 0, 4096), 20*miB) // not recorded
	must(err)
	must(img.EnableBitmap("b"))
	must(img.WriteCompressed(pattern(4, 0, 64*kiB), 16*miB))
	must(img.MergeBitmap("m", "b"))
	must(img.Close())
	b := []span{{64 * kiB, 64 * kiB}, {2 * miB, 128 * kiB}, {8 * miB, 64 * kiB}, {12 * miB, 128 * kiB}, {16 * miB, 64 * kiB}}
	checkDirty(t, path, "b", b)
	checkDirty(t, path, "m", []span{{0, miB}, {2 * miB, miB}, {8 * miB, miB}, {12 * miB, miB}, {16 * miB, miB}})

	// QEMU writes; oxcow reports QEMU's set. Then clearing through Go empties it for QEMU.
	run(t, "qemu-io", "-f", "qcow2", "-c", "write 30M 512", path)
	checkDirty(t, path, "b", append(b, span{30 * miB, 64 * kiB}))
	img = mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	must(img.ClearBitmap("b"))
	must(img.Close())
	checkDirty(t, path, "b", nil)
	qemuCheck(t, path)

	// A window of the walk is clipped to the range asked for.
	img = mustOpen(t, path, nil)
	defer img.Close()
	it := img.DirtyExtents("m", 2*miB+100, 1000)
	if !it.Next() || it.Extent() != (oxcow.Extent{Offset: 2*miB + 100, Length: 1000, Flags: oxcow.ExtentDirty}) {
		t.Fatalf("clipped walk: %+v %v", it.Extent(), it.Err())
	}
	if it.Next() || it.Err() != nil {
		t.Fatalf("clipped walk went on: %+v %v", it.Extent(), it.Err())
	}
}

// TestBitmapErrors: errno mapping of the bitmap calls (EEXIST, ENOENT, EINVAL, EROFS, EBUSY).
func TestBitmapErrors(t *testing.T) {
	needTool(t, "qemu-io")
	path := newImage(t, 4*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	err := img.AddBitmap("a", 0, false)
	if err != nil {
		t.Fatal(err)
	}
	wantErrno(t, img.AddBitmap("a", 0, false), "add bitmap", syscall.EEXIST)
	wantErrno(t, img.AddBitmap("nul\x00name", 0, false), "add bitmap", syscall.EINVAL)
	wantErrno(t, img.AddBitmap("g", 1000, false), "add bitmap", syscall.EINVAL)
	wantErrno(t, img.AddBitmap("", 0, false), "add bitmap", syscall.EINVAL)
	wantErrno(t, img.RemoveBitmap("x"), "remove bitmap", syscall.ENOENT)
	wantErrno(t, img.ClearBitmap("x"), "clear bitmap", syscall.ENOENT)
	wantErrno(t, img.EnableBitmap("x"), "enable bitmap", syscall.ENOENT)
	wantErrno(t, img.DisableBitmap("x"), "disable bitmap", syscall.ENOENT)
	wantErrno(t, img.MergeBitmap("a", "x"), "merge bitmap", syscall.ENOENT)
	_, err = img.BitmapStatus("x", 0, 1)
	wantErrno(t, err, "bitmap status", syscall.ENOENT)
	_, err = img.BitmapStatus("a", 0, 8*miB)
	wantErrno(t, err, "bitmap status", syscall.EINVAL)
	it := img.DirtyExtents("a", -1, 10)
	if it.Next() {
		t.Fatal("walk from a negative offset yielded an extent")
	}
	wantErrno(t, it.Err(), "bitmap status", syscall.EINVAL)
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	wantErrno(t, img.AddBitmap("z", 0, false), "add bitmap", syscall.EBADF)
	if _, err := img.Bitmaps(); !errors.Is(err, syscall.EBADF) {
		t.Fatalf("Bitmaps on a closed image: %v", err)
	}

	ro := mustOpen(t, path, nil)
	wantErrno(t, ro.AddBitmap("b", 0, false), "add bitmap", syscall.EROFS)
	wantErrno(t, ro.RemoveBitmap("a"), "remove bitmap", syscall.EROFS)
	wantErrno(t, ro.ClearBitmap("a"), "clear bitmap", syscall.EROFS)
	if bms, err := ro.Bitmaps(); err != nil || len(bms) != 1 {
		t.Fatalf("Bitmaps on a read-only image: %+v %v", bms, err)
	}
	if err := ro.Close(); err != nil {
		t.Fatal(err)
	}

	// qemu-io killed while it holds the image read-write leaves the bitmap in use.
	// The write is flushed first, so that only the bitmap is left behind, not QEMU's leaks.
	cmd := exec.Command("qemu-io", "-f", "qcow2", "-c", "write 0 4k", "-c", "flush", "-c", "sleep 60000", path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waitInUse(t, path)
	time.Sleep(time.Second)
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	img = mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	bms, err := img.Bitmaps()
	if err != nil || len(bms) != 1 || !bms[0].Inconsistent || bms[0].Enabled {
		t.Fatalf("Bitmaps after the crash: %+v %v", bms, err)
	}
	wantErrno(t, img.ClearBitmap("a"), "clear bitmap", syscall.EBUSY)
	wantErrno(t, img.EnableBitmap("a"), "enable bitmap", syscall.EBUSY)
	wantErrno(t, img.DisableBitmap("a"), "disable bitmap", syscall.EBUSY)
	_, err = img.BitmapStatus("a", 0, 1)
	wantErrno(t, err, "bitmap status", syscall.EBUSY)
	if err := img.RemoveBitmap("a"); err != nil {
		t.Fatal(err)
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	if q := qemuBitmaps(t, path); len(q) != 0 {
		t.Fatalf("qemu-img still shows %+v", q)
	}
	qemuCheck(t, path)
}

// waitInUse waits until qemu-img info shows a bitmap of path in use.
func waitInUse(t *testing.T, path string) {
	t.Helper()
	for i := 0; i < 100; i++ {
		out, _ := exec.Command("qemu-img", "info", "-U", "--output=json", path).Output()
		if strings.Contains(string(out), "in-use") {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("qemu-io never marked the bitmap in use")
}

// TestBitmapControlWhileWriting: goroutines write while another freezes, merges, clears and
// thaws bitmaps; the always-enabled bitmap ends with exactly the granules written.
func TestBitmapControlWhileWriting(t *testing.T) {
	path := newImage(t, 64*miB, nil)
	img := mustOpen(t, path, &oxcow.OpenOptions{Writable: true})
	defer img.Close()
	err := img.AddBitmap("all", 64*kiB, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := img.AddBitmap("frozen", 64*kiB, true); err != nil {
		t.Fatal(err)
	}
	const writers, perWriter = 4, 64
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := pattern(byte(w), 0, 4096)
			for i := 0; i < perWriter; i++ {
				// Every other granule, each writer in its own quarter of the disk.
				off := int64(w)*16*miB + int64(i)*128*kiB
				if _, err := img.WriteAt(buf, off); err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	for i := 0; i < 20; i++ {
		for _, err := range []error{
			img.MergeBitmap("frozen", "all"),
			img.DisableBitmap("all"),
			img.EnableBitmap("all"),
			img.ClearBitmap("frozen"),
		} {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	wg.Wait()
	// "all" was disabled for short moments: only writes outside them are guaranteed, so
	// check the final state with one more, uninterrupted round.
	if err := img.ClearBitmap("all"); err != nil {
		t.Fatal(err)
	}
	for w := 0; w < writers; w++ {
		for i := 0; i < perWriter; i++ {
			if _, err := img.WriteAt(pattern(9, 0, 512), int64(w)*16*miB+int64(i)*128*kiB+1000); err != nil {
				t.Fatal(err)
			}
		}
	}
	got := oxcowDirty(t, img, "all")
	if len(got) != writers*perWriter {
		t.Fatalf("%d dirty ranges, want %d: %v", len(got), writers*perWriter, got)
	}
	for _, s := range got {
		if s.Len != 64*kiB || s.Off%(128*kiB) != 0 {
			t.Fatalf("unexpected dirty range %+v", s)
		}
	}
	if err := img.Close(); err != nil {
		t.Fatal(err)
	}
	qemuCheck(t, path)
}
