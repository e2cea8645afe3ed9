package capi

/*
#include <oxcow.h>
*/
import "C"

// ResizeShrink is OXCOW_RESIZE_SHRINK.
const ResizeShrink = uint32(C.OXCOW_RESIZE_SHRINK)

// Resize calls oxcow_resize.
func Resize(h Handle, newSize uint64, flags uint32) *Err {
	var e *C.oxcow_error
	rc := C.oxcow_resize(h.p, C.uint64_t(newSize), C.uint32_t(flags), &e)
	return fromErr(rc, e)
}
