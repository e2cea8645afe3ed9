package capi

/*
#include <oxcow.h>
*/
import "C"

import (
	"runtime/cgo"
	"unsafe"
)

// Event is a corruption event as the library reports it.
type Event struct {
	// Message names the structure and what was prevented or found.
	Message string
	// HostOffset and Size locate it in the image file when HasLocation is true.
	HostOffset, Size uint64
	HasLocation      bool
	// Fatal: the image was marked corrupt and the handle fenced.
	Fatal bool
}

// EventFunc receives events; it runs on the thread of the request that found the problem.
type EventFunc func(Event)

//export goOxcowEvent
func goOxcowEvent(opaque unsafe.Pointer, ev *C.oxcow_event) {
	fn, ok := cgo.Handle(uintptr(opaque)).Value().(EventFunc)
	if !ok || ev == nil {
		return
	}
	fn(Event{
		Message:     C.GoString(ev.message),
		HostOffset:  uint64(ev.host_offset),
		Size:        uint64(ev.size),
		HasLocation: uint32(ev.flags)&uint32(C.OXCOW_EVENT_HAS_LOCATION) != 0,
		Fatal:       uint32(ev.flags)&uint32(C.OXCOW_EVENT_FATAL) != 0,
	})
}
