package oxcow_test

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log"
	"os"
	"path/filepath"
	"syscall"

	"oxcow.dev/oxcow"
)

// exampleDir returns a scratch directory for an example; the caller removes it.
func exampleDir() string {
	dir, err := os.MkdirTemp("", "oxcow-example-")
	if err != nil {
		log.Fatal(err)
	}
	return dir
}

func ExampleCreate() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.qcow2")

	// A 1 GiB image with 64 KiB clusters and zstd compression.
	err := oxcow.Create(path, 1<<30, &oxcow.CreateOptions{
		ClusterSize: 65536,
		Compression: oxcow.CompressionZstd,
	})
	if err != nil {
		log.Fatal(err)
	}

	img, err := oxcow.Open(path, nil)
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	info, err := img.Info()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("size=%d cluster=%d version=%d compression=%v read-only=%v\n",
		info.VirtualSize, info.ClusterSize, info.Version, info.Compression, info.ReadOnly)
	// Output:
	// size=1073741824 cluster=65536 version=3 compression=zstd read-only=true
}

func ExampleOpen() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.qcow2")
	if err := oxcow.Create(path, 16<<20, nil); err != nil {
		log.Fatal(err)
	}

	img, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
	if err != nil {
		log.Fatal(err)
	}
	if _, err := img.WriteAt([]byte("hello, qcow2"), 1<<20); err != nil {
		log.Fatal(err)
	}
	// Close flushes and reports the flush error.
	if err := img.Close(); err != nil {
		log.Fatal(err)
	}

	img, err = oxcow.Open(path, nil) // read-only
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	buf := make([]byte, 12)
	if _, err := img.ReadAt(buf, 1<<20); err != nil {
		log.Fatal(err)
	}
	fmt.Printf("%s (image size %d)\n", buf, img.Size())
	// Output:
	// hello, qcow2 (image size 16777216)
}

func ExampleImage_ReadAt() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.qcow2")
	if err := oxcow.Create(path, 4096, nil); err != nil {
		log.Fatal(err)
	}
	img, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt([]byte("end"), 4093); err != nil {
		log.Fatal(err)
	}

	// Like any io.ReaderAt, a read crossing the end returns what there is and io.EOF.
	buf := make([]byte, 10)
	n, err := img.ReadAt(buf, 4093)
	fmt.Printf("%d %q %v\n", n, buf[:n], err)

	// *Image also works with the io helpers, e.g. io.SectionReader.
	data, err := io.ReadAll(io.NewSectionReader(img, 4090, 100))
	fmt.Printf("%q %v\n", data, err)
	// Output:
	// 3 "end" EOF
	// "\x00\x00\x00end" <nil>
}

func ExampleImage_BlockStatus() {
	dir := exampleDir()
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "disk.qcow2")
	if err := oxcow.Create(path, 1<<20, &oxcow.CreateOptions{ClusterSize: 65536}); err != nil {
		log.Fatal(err)
	}
	img, err := oxcow.Open(path, &oxcow.OpenOptions{Writable: true})
	if err != nil {
		log.Fatal(err)
	}
	defer img.Close()
	if _, err := img.WriteAt(make([]byte, 2*65536), 65536); err != nil {
		log.Fatal(err)
	}

	// Walk the image's extents. Without a backing file, unallocated clusters read as zeros.
	for off := int64(0); off < img.Size(); {
		e, err := img.BlockStatus(off, img.Size()-off)
		if err != nil {
			log.Fatal(err)
		}
		fmt.Printf("[%7d, %7d) data=%-5v zero=%v\n", e.Offset, e.Offset+e.Length, e.Data(), e.Zero())
		off += e.Length
	}
	// Output:
	// [      0,   65536) data=false zero=true
	// [  65536,  196608) data=true  zero=false
	// [ 196608, 1048576) data=false zero=true
}

func ExampleError() {
	_, err := oxcow.Open("/nonexistent/disk.qcow2", nil)

	// Errors carry the errno: test them with errors.Is ...
	fmt.Println(errors.Is(err, syscall.ENOENT), errors.Is(err, fs.ErrNotExist))

	// ... and inspect the details with errors.As.
	var oe *oxcow.Error
	if errors.As(err, &oe) {
		fmt.Println(oe.Op, oe.Path, oe.Errno == syscall.ENOENT)
	}
	// Output:
	// true true
	// open /nonexistent/disk.qcow2 true
}
