package capi

/*
#include <stdint.h>
#include <oxcow.h>

extern void goOxcowEvent(void *opaque, oxcow_event *ev);

static void oxcow_go_event_trampoline(void *opaque, const oxcow_event *ev) {
    goOxcowEvent(opaque, (oxcow_event *)ev);
}

// The handle travels as an integer so that no Go pointer is stored in C.
static int oxcow_go_set_event_callback(oxcow_image *img, uintptr_t handle) {
    if (handle == 0)
        return oxcow_set_event_callback(img, NULL, NULL);
    return oxcow_set_event_callback(img, oxcow_go_event_trampoline, (void *)handle);
}
*/
import "C"

import "runtime/cgo"

// Overlap-check modes (OXCOW_OVERLAP_*).
const (
	OverlapNone     = uint32(C.OXCOW_OVERLAP_NONE)
	OverlapConstant = uint32(C.OXCOW_OVERLAP_CONSTANT)
	OverlapCached   = uint32(C.OXCOW_OVERLAP_CACHED)
	OverlapAll      = uint32(C.OXCOW_OVERLAP_ALL)
)

// SetEventCallback registers fn (nil removes it) and returns the cgo handle that keeps it
// alive; the caller deletes the previous handle once the library no longer uses it.
func SetEventCallback(h Handle, fn EventFunc) (cgo.Handle, *Err) {
	var hd cgo.Handle
	if fn != nil {
		hd = cgo.NewHandle(fn)
	}
	rc := C.oxcow_go_set_event_callback(h.p, C.uintptr_t(hd))
	if rc != 0 && hd != 0 {
		hd.Delete()
		hd = 0
	}
	return hd, fromCode(rc)
}

// SetOverlapCheck calls oxcow_set_overlap_check.
func SetOverlapCheck(h Handle, mode uint32) *Err {
	return fromCode(C.oxcow_set_overlap_check(h.p, C.uint32_t(mode)))
}
