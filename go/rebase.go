package oxcow

import "oxcow.dev/oxcow/internal/capi"

// Rebase changes the backing file of a read-write image, like `qemu-img rebase` (QEMU 10),
// while other goroutines may keep reading and writing it.
//
// backing is the name stored in the header (relative names are relative to the image's
// directory); "" removes the backing file. format ("qcow2" or "raw"; with unsafe, any format
// name QEMU knows) is required with a backing file. Without unsafe the guest-visible content
// does not change: where the image is unallocated and the old and new chains differ, the old
// content is copied into the image first. With unsafe only the header changes (like -u).
// Crash-safe: a crash leaves the old chain or the new one.
//
// Errors (as *Error with a syscall.Errno): EINVAL (missing or unknown format, a name over
// 1023 bytes), ENOTSUP (safe mode with a format oxcow cannot read), ENOSPC (the name does
// not fit in the header cluster), ENOENT and other errors opening the new backing file
// (nothing changed), EAGAIN (the new backing file is locked by a writer), EROFS (read-only
// image), EIO.
func (img *Image) Rebase(backing, format string, unsafe bool) error {
	h, err := img.acquire("rebase")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	var flags uint32
	if unsafe {
		flags = capi.RebaseUnsafe
	}
	if cerr := capi.Rebase(h, backing, format, flags); cerr != nil {
		return wrap("rebase", img.path, cerr)
	}
	return nil
}
