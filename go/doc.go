// Package oxcow reads and writes qcow2 disk images through liboxcow, the oxcow engine's C
// library.
//
// An [*Image] is an [io.ReaderAt], [io.WriterAt] and [io.Closer] over the image's guest
// (virtual) contents. One Image may be used by any number of goroutines at once: I/O calls run
// in parallel inside the library (they are not serialised by a Go lock) and only Close waits
// for the calls in progress to finish. Calls made after Close fail with an error wrapping
// [syscall.EBADF].
//
// Every error returned by this package for a failed library call is an [*Error], which names
// the operation, carries the errno and the library's message, and unwraps to the
// [syscall.Errno]:
//
//	img, err := oxcow.Open("disk.qcow2", nil)
//	if errors.Is(err, fs.ErrNotExist) { ... }      // ENOENT
//	_, err = img.WriteAt(buf, 0)
//	if errors.Is(err, syscall.EROFS) { ... }       // opened read-only
//
// Building requires liboxcow to be visible to pkg-config (package "oxcow"); see go/run.sh in
// the oxcow repository for a build against an uninstalled tree.
package oxcow
