package capi

/*
#cgo pkg-config: oxcow
#include <stdlib.h>
#include <oxcow.h>
*/
import "C"

import (
	"syscall"
	"unsafe"
)

// Bitmap flags from oxcow.h.
const (
	BitmapDisabled     = uint32(C.OXCOW_BITMAP_DISABLED)
	BitmapEnabled      = uint32(C.OXCOW_BITMAP_ENABLED)
	BitmapInconsistent = uint32(C.OXCOW_BITMAP_INCONSISTENT)
	BitmapAuto         = uint32(C.OXCOW_BITMAP_AUTO)
	ExtentDirty        = uint32(C.OXCOW_EXTENT_DIRTY)
)

// BitmapInfo mirrors oxcow_bitmap_info.
type BitmapInfo struct {
	Name        string
	Granularity uint64
	Flags       uint32
}

// withName passes name to f as a C string; names holding a NUL byte are refused here, since C
// would silently cut them.
func withName(name string, f func(*C.char) *Err) *Err {
	for i := 0; i < len(name); i++ {
		if name[i] == 0 {
			return &Err{Errno: syscall.EINVAL, Message: "bitmap name contains a NUL byte"}
		}
	}
	cname := C.CString(name)
	defer C.free(unsafe.Pointer(cname))
	return f(cname)
}

// BitmapAdd calls oxcow_bitmap_add.
func BitmapAdd(h Handle, name string, granularity uint64, flags uint32) *Err {
	return withName(name, func(n *C.char) *Err {
		var e *C.oxcow_error
		rc := C.oxcow_bitmap_add(h.p, n, C.uint64_t(granularity), C.uint32_t(flags), &e)
		return fromErr(rc, e)
	})
}

// BitmapRemove calls oxcow_bitmap_remove.
func BitmapRemove(h Handle, name string) *Err {
	return withName(name, func(n *C.char) *Err {
		var e *C.oxcow_error
		return fromErr(C.oxcow_bitmap_remove(h.p, n, &e), e)
	})
}

// BitmapClear calls oxcow_bitmap_clear.
func BitmapClear(h Handle, name string) *Err {
	return withName(name, func(n *C.char) *Err {
		var e *C.oxcow_error
		return fromErr(C.oxcow_bitmap_clear(h.p, n, &e), e)
	})
}

// BitmapEnable calls oxcow_bitmap_enable.
func BitmapEnable(h Handle, name string) *Err {
	return withName(name, func(n *C.char) *Err {
		var e *C.oxcow_error
		return fromErr(C.oxcow_bitmap_enable(h.p, n, &e), e)
	})
}

// BitmapDisable calls oxcow_bitmap_disable.
func BitmapDisable(h Handle, name string) *Err {
	return withName(name, func(n *C.char) *Err {
		var e *C.oxcow_error
		return fromErr(C.oxcow_bitmap_disable(h.p, n, &e), e)
	})
}

// BitmapMerge calls oxcow_bitmap_merge.
func BitmapMerge(h Handle, dst, src string) *Err {
	return withName(dst, func(d *C.char) *Err {
		return withName(src, func(s *C.char) *Err {
			var e *C.oxcow_error
			return fromErr(C.oxcow_bitmap_merge(h.p, d, s, &e), e)
		})
	})
}

// BitmapList calls oxcow_bitmap_list, growing the C array until every bitmap fits (the list
// may change between calls while another thread adds bitmaps). The array is C memory: each
// entry holds a 1 KiB name.
func BitmapList(h Handle) ([]BitmapInfo, *Err) {
	var total C.size_t
	if err := fromCode(C.oxcow_bitmap_list(h.p, nil, 0, &total)); err != nil {
		return nil, err
	}
	// QEMU allows 65535 bitmaps per image; a few retries cover concurrent additions.
	for tries := 0; tries < 8; tries++ {
		capacity := total + 4
		arr := (*C.oxcow_bitmap_info)(C.calloc(capacity, C.sizeof_oxcow_bitmap_info))
		if arr == nil {
			return nil, &Err{Errno: syscall.ENOMEM, Message: "cannot allocate the bitmap list"}
		}
		rc := C.oxcow_bitmap_list(h.p, arr, capacity, &total)
		if err := fromCode(rc); err != nil {
			C.free(unsafe.Pointer(arr))
			return nil, err
		}
		if total <= capacity {
			entries := unsafe.Slice(arr, int(total))
			out := make([]BitmapInfo, len(entries))
			for i := range entries {
				out[i] = BitmapInfo{
					Name:        cArrayString(entries[i].name[:]),
					Granularity: uint64(entries[i].granularity),
					Flags:       uint32(entries[i].flags),
				}
			}
			C.free(unsafe.Pointer(arr))
			return out, nil
		}
		C.free(unsafe.Pointer(arr))
	}
	return nil, &Err{Errno: syscall.EAGAIN, Message: "the bitmap list kept growing while it was read"}
}

// BitmapStatus calls oxcow_bitmap_status.
func BitmapStatus(h Handle, name string, off, count uint64) (Extent, *Err) {
	var ext C.oxcow_extent
	err := withName(name, func(n *C.char) *Err {
		return fromCode(C.oxcow_bitmap_status(h.p, n, C.uint64_t(off), C.uint64_t(count), &ext))
	})
	if err != nil {
		return Extent{}, err
	}
	return Extent{
		Offset:     uint64(ext.offset),
		Length:     uint64(ext.length),
		HostOffset: uint64(ext.host_offset),
		Flags:      uint32(ext.flags),
	}, nil
}
