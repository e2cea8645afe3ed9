package capi

/*
#include <stdlib.h>
#include <oxcow.h>
*/
import "C"

import "unsafe"

// RebaseUnsafe is OXCOW_REBASE_UNSAFE.
const RebaseUnsafe = uint32(C.OXCOW_REBASE_UNSAFE)

// Rebase calls oxcow_rebase; an empty backing removes the backing file (the format is
// then passed as NULL).
func Rebase(h Handle, backing, format string, flags uint32) *Err {
	var cb, cf *C.char
	if backing != "" {
		cb = C.CString(backing)
		defer C.free(unsafe.Pointer(cb))
		cf = C.CString(format)
		defer C.free(unsafe.Pointer(cf))
	}
	var e *C.oxcow_error
	rc := C.oxcow_rebase(h.p, cb, cf, C.uint32_t(flags), &e)
	return fromErr(rc, e)
}
