package capi

/*
#include <stdint.h>
#include <stdlib.h>
#include <oxcow.h>

extern void goOxcowProgress(void *opaque, uint64_t done, uint64_t total);

static void oxcow_go_progress_trampoline(void *opaque, uint64_t done, uint64_t total) {
    goOxcowProgress(opaque, done, total);
}

// The handle travels as an integer so that no Go pointer is stored in C.
static int oxcow_go_commit(oxcow_image *img, const char *base, uint32_t flags,
                           uintptr_t progress, oxcow_error **err) {
    oxcow_commit_options o;
    oxcow_commit_options_init(&o);
    o.base = base;
    o.flags = flags;
    if (progress != 0) {
        o.progress = oxcow_go_progress_trampoline;
        o.progress_opaque = (void *)progress;
    }
    return oxcow_commit(img, &o, err);
}
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// CommitKeepTop is OXCOW_COMMIT_KEEP_TOP.
const CommitKeepTop = uint32(C.OXCOW_COMMIT_KEEP_TOP)

// ProgressFunc receives (bytes done, bytes total) on the calling goroutine's thread.
type ProgressFunc func(done, total uint64)

// Commit calls oxcow_commit; base "" means the direct backing file.
func Commit(h Handle, base string, flags uint32, progress ProgressFunc) *Err {
	var cbase *C.char
	if base != "" {
		cbase = C.CString(base)
		defer C.free(unsafe.Pointer(cbase))
	}
	var hd cgo.Handle
	if progress != nil {
		hd = cgo.NewHandle(progress)
		defer hd.Delete()
	}
	var e *C.oxcow_error
	rc := C.oxcow_go_commit(h.p, cbase, C.uint32_t(flags), C.uintptr_t(hd), &e)
	return fromErr(rc, e)
}
