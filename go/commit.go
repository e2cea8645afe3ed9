package oxcow

import (
	"oxcow.dev/oxcow/internal/capi"
)

// CommitOptions are the parameters of Commit. The zero value commits into the direct
// backing file and empties the image afterwards, like `qemu-img commit`.
type CommitOptions struct {
	// Base names the backing file to commit into (as the chain names it, or any path to the
	// same file); "" means the direct backing file. Naming a base keeps the image's data,
	// as `qemu-img commit -b` implies -d.
	Base string
	// KeepTop keeps the image's data after the commit (`qemu-img commit -d`).
	KeepTop bool
	// Progress, when set, is called now and then with the bytes done and the total.
	Progress func(done, total uint64)
}

// Commit writes what the image (and the images between it and the base) holds into a
// backing file, like `qemu-img commit` (QEMU 10), while other goroutines may keep reading and
// writing the image: their writes go to the image and stay visible. The base is reopened
// read-write for the commit and read-only again afterwards; a shorter base is grown.
//
// Errors (as *Error with a syscall.Errno): EINVAL (no backing file, base not in the chain),
// EROFS (read-only image), EAGAIN (another process uses the base), ESTALE (the base's path
// names another file now), EIO, ENOSPC. On error both files are consistent and the image
// reads as before; Commit may be retried.
func (img *Image) Commit(opts *CommitOptions) error {
	h, err := img.acquire("commit")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	var o CommitOptions
	if opts != nil {
		o = *opts
	}
	var flags uint32
	if o.KeepTop {
		flags |= capi.CommitKeepTop
	}
	var progress capi.ProgressFunc
	if o.Progress != nil {
		progress = o.Progress
	}
	if cerr := capi.Commit(h, o.Base, flags, progress); cerr != nil {
		return wrap("commit", img.path, cerr)
	}
	return nil
}
