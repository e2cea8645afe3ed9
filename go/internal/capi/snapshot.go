package capi

/*
#include <stdlib.h>
#include <oxcow.h>
*/
import "C"

import "unsafe"

// Snapshot flag values (OXCOW_SNAPSHOT_*).
const (
	SnapshotHasDiskSize = uint32(C.OXCOW_SNAPSHOT_HAS_DISK_SIZE)
	SnapshotHasIcount   = uint32(C.OXCOW_SNAPSHOT_HAS_ICOUNT)
)

// OpenWith calls oxcow_open with a cache size and, when snapshot is not empty, the snapshot
// view key of oxcow_open_options.
func OpenWith(path string, flags uint32, cacheSize uint64, snapshot string) (Handle, *Err) {
	return OpenWithCaches(path, flags, CacheSizes{L2: cacheSize}, snapshot)
}

// CacheSizes are the metadata cache fields of oxcow_open_options (0 = library default).
// CleanInterval is cache_clean_interval in seconds (CacheCleanNever: never).
type CacheSizes struct {
	L2, Refcount, Slice, CleanInterval uint64
}

// CacheCleanNever is OXCOW_CACHE_CLEAN_NEVER.
const CacheCleanNever = uint64(C.OXCOW_CACHE_CLEAN_NEVER)

// OpenWithCaches calls oxcow_open with oxcow_open_options (version 4).
func OpenWithCaches(path string, flags uint32, caches CacheSizes, snapshot string) (Handle, *Err) {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var copts C.oxcow_open_options
	C.oxcow_open_options_init(&copts)
	copts.cache_size = C.uint64_t(caches.L2)
	copts.refcount_cache_size = C.uint64_t(caches.Refcount)
	copts.l2_slice_size = C.uint64_t(caches.Slice)
	copts.cache_clean_interval = C.uint64_t(caches.CleanInterval)
	if snapshot != "" {
		csnap := C.CString(snapshot)
		defer C.free(unsafe.Pointer(csnap))
		copts.snapshot = csnap
	}
	var img *C.oxcow_image
	var e *C.oxcow_error
	rc := C.oxcow_open(cpath, C.uint32_t(flags), &copts, &img, &e)
	if err := fromErr(rc, e); err != nil {
		return Handle{}, err
	}
	return Handle{p: img}, nil
}

// SnapshotInfo mirrors oxcow_snapshot_info.
type SnapshotInfo struct {
	ID          string
	Name        string
	DateSec     uint32
	DateNsec    uint32
	VMClockNsec uint64
	VMStateSize uint64
	DiskSize    uint64
	Icount      uint64
	Flags       uint32
}

// snapshotOp calls one of the oxcow_snapshot_{create,apply,delete} functions with a key.
func snapshotOp(h Handle, key string, which int) *Err {
	ckey := C.CString(key)
	defer C.free(unsafe.Pointer(ckey))
	var e *C.oxcow_error
	var rc C.int
	switch which {
	case 0:
		rc = C.oxcow_snapshot_create(h.p, ckey, &e)
	case 1:
		rc = C.oxcow_snapshot_apply(h.p, ckey, &e)
	default:
		rc = C.oxcow_snapshot_delete(h.p, ckey, &e)
	}
	return fromErr(rc, e)
}

// SnapshotCreate calls oxcow_snapshot_create.
func SnapshotCreate(h Handle, name string) *Err { return snapshotOp(h, name, 0) }

// SnapshotApply calls oxcow_snapshot_apply.
func SnapshotApply(h Handle, key string) *Err { return snapshotOp(h, key, 1) }

// SnapshotDelete calls oxcow_snapshot_delete.
func SnapshotDelete(h Handle, key string) *Err { return snapshotOp(h, key, 2) }

// SnapshotList calls oxcow_snapshot_list, growing the array until every entry fits (the
// list may grow between calls when other threads create snapshots).
func SnapshotList(h Handle) ([]SnapshotInfo, *Err) {
	var count C.size_t
	if err := fromCode(C.oxcow_snapshot_list(h.p, nil, 0, &count)); err != nil {
		return nil, err
	}
	for {
		n := count
		buf := (*C.oxcow_snapshot_info)(C.calloc(n+1, C.sizeof_oxcow_snapshot_info))
		if buf == nil {
			return nil, &Err{Errno: 12, Message: "out of memory"} // ENOMEM
		}
		rc := C.oxcow_snapshot_list(h.p, buf, n+1, &count)
		if err := fromCode(rc); err != nil {
			C.free(unsafe.Pointer(buf))
			return nil, err
		}
		if count <= n+1 {
			out := convertSnapshots(unsafe.Slice(buf, int(count)))
			C.free(unsafe.Pointer(buf))
			return out, nil
		}
		C.free(unsafe.Pointer(buf))
	}
}

func convertSnapshots(in []C.oxcow_snapshot_info) []SnapshotInfo {
	out := make([]SnapshotInfo, len(in))
	for i, s := range in {
		out[i] = SnapshotInfo{
			ID:          cArrayString(s.id[:]),
			Name:        cArrayString(s.name[:]),
			DateSec:     uint32(s.date_sec),
			DateNsec:    uint32(s.date_nsec),
			VMClockNsec: uint64(s.vm_clock_nsec),
			VMStateSize: uint64(s.vm_state_size),
			DiskSize:    uint64(s.disk_size),
			Icount:      uint64(s.icount),
			Flags:       uint32(s.flags),
		}
	}
	return out
}
