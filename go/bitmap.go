package oxcow

import (
	"syscall"

	"oxcow.dev/oxcow/internal/capi"
)

// ExtentDirty marks an Extent of BitmapStatus / DirtyExtents as dirty in the bitmap.
const ExtentDirty ExtentFlags = ExtentFlags(capi.ExtentDirty)

// Dirty reports whether the range is dirty in the bitmap it was asked about.
func (e Extent) Dirty() bool { return e.Flags&ExtentDirty != 0 }

// Bitmap is one persistent dirty bitmap of an image (QEMU-compatible, see Image.Bitmaps).
type Bitmap struct {
	Name        string
	Granularity uint64 // guest bytes per bit: a power of two from 512 B to 2 GiB
	// Enabled: the bitmap records guest writes now.
	Enabled bool
	// Inconsistent: the bitmap was found in use at open (its writer crashed or still runs).
	// It is not tracked; every operation but RemoveBitmap fails with syscall.EBUSY.
	Inconsistent bool
	// Auto: stored with QEMU's "auto" flag (enabled at every read-write open).
	Auto bool
}

// Bitmaps lists the image's persistent bitmaps in directory order. Works on read-only images.
func (img *Image) Bitmaps() ([]Bitmap, error) {
	h, err := img.acquire("bitmaps")
	if err != nil {
		return nil, err
	}
	defer img.mu.RUnlock()
	list, cerr := capi.BitmapList(h)
	if cerr != nil {
		return nil, wrap("bitmaps", img.path, cerr)
	}
	out := make([]Bitmap, len(list))
	for i, b := range list {
		out[i] = Bitmap{
			Name:         b.Name,
			Granularity:  b.Granularity,
			Enabled:      b.Flags&capi.BitmapEnabled != 0,
			Inconsistent: b.Flags&capi.BitmapInconsistent != 0,
			Auto:         b.Flags&capi.BitmapAuto != 0,
		}
	}
	return out, nil
}

// bitmapOp runs one control call on the live handle, naming the operation in errors.
func (img *Image) bitmapOp(op string, f func(capi.Handle) *capi.Err) error {
	h, err := img.acquire(op)
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	return wrap(op, img.path, f(h))
}

// AddBitmap adds an empty persistent bitmap that records guest writes from now on, or, with
// disabled, one that records nothing until EnableBitmap. A granularity of 0 picks qemu-img's
// default (the cluster size clamped to 4 KiB..64 KiB). Errors wrap syscall.EEXIST (the name
// is taken), EINVAL (bad name or granularity), EROFS, ENOSPC.
func (img *Image) AddBitmap(name string, granularity uint64, disabled bool) error {
	var flags uint32
	if disabled {
		flags = capi.BitmapDisabled
	}
	return img.bitmapOp("add bitmap", func(h capi.Handle) *capi.Err {
		return capi.BitmapAdd(h, name, granularity, flags)
	})
}

// RemoveBitmap removes a bitmap (inconsistent ones too) and frees its space. Errors wrap
// syscall.ENOENT (no such bitmap) or EROFS.
func (img *Image) RemoveBitmap(name string) error {
	return img.bitmapOp("remove bitmap", func(h capi.Handle) *capi.Err {
		return capi.BitmapRemove(h, name)
	})
}

// ClearBitmap clears every bit of a bitmap. Errors wrap syscall.ENOENT, EBUSY (inconsistent
// bitmap) or EROFS.
func (img *Image) ClearBitmap(name string) error {
	return img.bitmapOp("clear bitmap", func(h capi.Handle) *capi.Err {
		return capi.BitmapClear(h, name)
	})
}

// EnableBitmap makes a bitmap record guest writes. Errors wrap syscall.ENOENT, EBUSY or EROFS.
func (img *Image) EnableBitmap(name string) error {
	return img.bitmapOp("enable bitmap", func(h capi.Handle) *capi.Err {
		return capi.BitmapEnable(h, name)
	})
}

// DisableBitmap stops a bitmap from recording guest writes (freezes it). Errors wrap
// syscall.ENOENT, EBUSY or EROFS.
func (img *Image) DisableBitmap(name string) error {
	return img.bitmapOp("disable bitmap", func(h capi.Handle) *capi.Err {
		return capi.BitmapDisable(h, name)
	})
}

// MergeBitmap sets in bitmap dst every bit set in bitmap src (granularities may differ).
// Errors wrap syscall.ENOENT, EBUSY or EROFS.
func (img *Image) MergeBitmap(dst, src string) error {
	return img.bitmapOp("merge bitmap", func(h capi.Handle) *capi.Err {
		return capi.BitmapMerge(h, dst, src)
	})
}

// BitmapStatus describes bitmap name from off, like BlockStatus: the extent starts at off and
// extends, at most n bytes, as far as the bitmap's state stays the same; Dirty() tells whether
// that range is dirty. Errors wrap syscall.ENOENT, EBUSY (inconsistent bitmap) or EINVAL.
func (img *Image) BitmapStatus(name string, off, n int64) (Extent, error) {
	const op = "bitmap status"
	h, err := img.acquire(op)
	if err != nil {
		return Extent{}, err
	}
	defer img.mu.RUnlock()
	if err := img.checkRange(op, off, n); err != nil {
		return Extent{}, err
	}
	if n == 0 {
		return Extent{}, newError(op, img.path, syscall.EINVAL, "zero-length range")
	}
	ce, cerr := capi.BitmapStatus(h, name, uint64(off), uint64(n))
	if cerr != nil {
		return Extent{}, wrap(op, img.path, cerr)
	}
	return Extent{Offset: int64(ce.Offset), Length: int64(ce.Length), Flags: ExtentFlags(ce.Flags)}, nil
}

// DirtyIterator walks the dirty ranges of a bitmap, in the style of bufio.Scanner:
//
//	it := img.DirtyExtents("backup", 0, img.Size())
//	for it.Next() {
//		e := it.Extent() // copy [e.Offset, e.Offset+e.Length)
//	}
//	if err := it.Err(); err != nil { ... }
//
// Each step asks the library for the next extents, so the walk sees the bitmap as it is at
// that moment; freeze the bitmap first (DisableBitmap) for a stable set.
type DirtyIterator struct {
	img      *Image
	name     string
	off, end int64
	cur      Extent
	err      error
}

// DirtyExtents returns an iterator over the dirty ranges of bitmap name within
// [off, off+n). Adjacent dirty extents are merged, so each Extent is a maximal dirty range
// (clipped to the requested range).
func (img *Image) DirtyExtents(name string, off, n int64) *DirtyIterator {
	it := &DirtyIterator{img: img, name: name, off: off, end: off + n}
	it.err = img.checkRange("bitmap status", off, n)
	return it
}

// Next advances to the next dirty range; false at the end or on an error (see Err).
func (it *DirtyIterator) Next() bool {
	if it.err != nil {
		return false
	}
	it.cur = Extent{}
	for it.off < it.end {
		e, err := it.img.BitmapStatus(it.name, it.off, it.end-it.off)
		if err != nil {
			it.err = err
			return false
		}
		if e.Length <= 0 {
			it.err = newError("bitmap status", it.img.path, syscall.EIO, "empty extent at %d", it.off)
			return false
		}
		it.off += e.Length
		if e.Dirty() {
			if it.cur.Length == 0 {
				it.cur = Extent{Offset: e.Offset, Flags: ExtentDirty}
			}
			it.cur.Length += e.Length
		} else if it.cur.Length > 0 {
			return true
		}
	}
	return it.cur.Length > 0
}

// Extent returns the dirty range found by the last successful Next.
func (it *DirtyIterator) Extent() Extent { return it.cur }

// Err returns the error that stopped the walk, or nil at a normal end.
func (it *DirtyIterator) Err() error { return it.err }
