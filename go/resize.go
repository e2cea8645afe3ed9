package oxcow

import (
	"syscall"

	"oxcow.dev/oxcow/internal/capi"
)

// Resize changes the virtual size of a read-write image to newSize bytes, like
// `qemu-img resize` (QEMU 10), while other goroutines may keep reading and writing it.
//
// newSize must be a multiple of 512. Growing makes the new area read as zeros (also over a
// backing file longer than the old size). A smaller size needs shrink (like --shrink) and
// deletes the data past the new end; clusters shared with internal snapshots stay theirs.
// Requests in flight at the old size complete or fail with EINVAL; none touches bytes past
// the size in force when it was checked. Crash-safe: a crash leaves the old or the new size.
//
// Errors (as *Error with a syscall.Errno): EINVAL (smaller size without shrink, size not a
// multiple of 512, over the L1 limit, or above the int64 range), EROFS (read-only image),
// ENOTSUP (a version-2 image growing over a longer backing file), EBUSY (an inconsistent
// persistent bitmap; consistent ones are resized with the image),
// EIO, ENOSPC. Size reports the new size once Resize returns.
func (img *Image) Resize(newSize uint64, shrink bool) error {
	h, err := img.acquire("resize")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	if newSize > uint64(maxInt64) {
		return newError("resize", img.path, syscall.EINVAL,
			"new size %d does not fit in int64", newSize)
	}
	var flags uint32
	if shrink {
		flags = capi.ResizeShrink
	}
	// Serialised with other resizes so that the cached size ends up as the library's.
	img.resizeMu.Lock()
	defer img.resizeMu.Unlock()
	if cerr := capi.Resize(h, newSize, flags); cerr != nil {
		return wrap("resize", img.path, cerr)
	}
	img.size.Store(int64(newSize))
	return nil
}
