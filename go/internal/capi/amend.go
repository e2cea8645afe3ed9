package capi

/*
#include <stdlib.h>
#include <oxcow.h>
*/
import "C"

import "unsafe"

// Lazy-refcounts values of oxcow_amend_options (OXCOW_AMEND_LAZY_*).
const (
	AmendLazyKeep = uint32(C.OXCOW_AMEND_LAZY_KEEP)
	AmendLazyOff  = uint32(C.OXCOW_AMEND_LAZY_OFF)
	AmendLazyOn   = uint32(C.OXCOW_AMEND_LAZY_ON)
)

// Amend calls oxcow_amend; zero values keep the current setting.
func Amend(path string, version, refcountBits, lazy uint32) *Err {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var o C.struct_oxcow_amend_options
	C.oxcow_amend_options_init(&o)
	o.version = C.uint32_t(version)
	o.refcount_bits = C.uint32_t(refcountBits)
	o.lazy_refcounts = C.uint32_t(lazy)
	var e *C.oxcow_error
	rc := C.oxcow_amend(cpath, &o, &e)
	return fromErr(rc, e)
}
