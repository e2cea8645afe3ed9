package capi

/*
#include <stdint.h>
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

//export goOxcowProgress
func goOxcowProgress(opaque unsafe.Pointer, done, total C.uint64_t) {
	if fn, ok := cgo.Handle(uintptr(opaque)).Value().(ProgressFunc); ok {
		fn(uint64(done), uint64(total))
	}
}
