package oxcow_test

import (
	"fmt"
	"log"
	"os"
	"path/filepath"

	"oxcow.dev/oxcow"
)

// An incremental backup: freeze the bitmap with a helper bitmap that records the writes made
// meanwhile, copy the dirty ranges, then restart the bitmap from the freeze.
func ExampleImage_DirtyExtents() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.qcow2")
	if err := oxcow.Create(path, 64<<20, nil); err != nil {
		log.Fatal(err)
	}
	img, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	if err := img.AddBitmap("backup", 0, false); err != nil { // at the last full backup
		log.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("guest data"), 5<<20); err != nil {
		log.Fatal(err)
	}

	// Freeze: "backup.next" records from now on, "backup" stops changing.
	must := func(err error) {
		if err != nil {
			log.Fatal(err)
		}
	}
	must(img.AddBitmap("backup.next", 0, false))
	must(img.DisableBitmap("backup"))
	buf := make([]byte, 64<<10)
	it := img.DirtyExtents("backup", 0, img.Size())
	for it.Next() {
		e := it.Extent()
		fmt.Printf("dirty: %d bytes at %d\n", e.Length, e.Offset)
		for off := e.Offset; off < e.Offset+e.Length; off += int64(len(buf)) {
			n := e.Offset + e.Length - off
			if n > int64(len(buf)) {
				n = int64(len(buf))
			}
			if _, err := img.ReadAt(buf[:n], off); err != nil {
				log.Fatal(err)
			}
			// ... write buf[:n] at off into the backup ...
		}
	}
	must(it.Err())
	// Restart "backup" at the freeze, plus what was written during the copy.
	must(img.ClearBitmap("backup"))
	must(img.EnableBitmap("backup"))
	must(img.MergeBitmap("backup", "backup.next"))
	must(img.RemoveBitmap("backup.next"))
	// Output:
	// dirty: 65536 bytes at 5242880
}
