package oxcow

import "oxcow.dev/oxcow/internal/capi"

// AmendOptions says what Amend changes; zero values keep the current setting.
type AmendOptions struct {
	// Version converts the image to qcow2 version 2 (compat=0.10) or 3 (compat=1.1).
	Version uint32
	// RefcountBits sets the refcount width: a power of two up to 64 (not 16: version 3).
	RefcountBits uint32
	// LazyRefcounts turns lazy refcounts on (version 3) or off; nil keeps the setting.
	LazyRefcounts *bool
}

// Amend changes format options of the qcow2 image at path like `qemu-img amend -o` (QEMU
// 10): the version, lazy refcounts and the refcount width. The image must not be open
// anywhere (EAGAIN otherwise). Each step is crash-safe and the guest content never changes.
//
// Errors (as *Error with a syscall.Errno): EINVAL (QEMU's refusals: an unknown version, a
// width that is not a power of two up to 64, lazy refcounts or a width other than 16 on
// version 2, a width too narrow for a refcount), ENOTSUP (a downgrade of an image with
// extended L2 entries, zstd-compressed clusters, bitmaps or shared zero-allocated clusters),
// EAGAIN, EUCLEAN, ENOENT, EIO, ENOSPC.
func Amend(path string, opts AmendOptions) error {
	lazy := capi.AmendLazyKeep
	if opts.LazyRefcounts != nil {
		lazy = capi.AmendLazyOff
		if *opts.LazyRefcounts {
			lazy = capi.AmendLazyOn
		}
	}
	if cerr := capi.Amend(path, opts.Version, opts.RefcountBits, lazy); cerr != nil {
		return wrap("amend", path, cerr)
	}
	return nil
}
