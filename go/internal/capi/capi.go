// Package capi is the thin cgo layer over liboxcow's C API (oxcow.h). It converts between Go
// and C types and nothing else: no locking, no lifetime management, no policy. The idiomatic
// API lives in package oxcow.
//
// Every function returns a *Err (nil on success) carrying the positive errno and, where the C
// call has an oxcow_error ** out-parameter, the library's message. No thread-local state is
// used. Go memory passed to C is a pointer to the first byte of a slice whose memory holds no
// Go pointers, and C never retains it after the call returns.
package capi

/*
#cgo pkg-config: oxcow
#include <stdlib.h>
#include <oxcow.h>
*/
import "C"

import (
	"runtime"
	"syscall"
	"unsafe"
)

// Open flags (OXCOW_OPEN_*).
const (
	OpenRDWR         = uint32(C.OXCOW_OPEN_RDWR)
	OpenNoBacking    = uint32(C.OXCOW_OPEN_NO_BACKING)
	OpenForceShare   = uint32(C.OXCOW_OPEN_FORCE_SHARE)
	OpenDirect       = uint32(C.OXCOW_OPEN_DIRECT)
	OpenWritethrough = uint32(C.OXCOW_OPEN_WRITETHROUGH)
	OpenNoProbe      = uint32(C.OXCOW_OPEN_NO_PROBE)
	OpenDiscardUnmap = uint32(C.OXCOW_OPEN_DISCARD_UNMAP)
)

// Other flag values from oxcow.h.
const (
	ZeroMayUnmap = uint32(C.OXCOW_ZERO_MAY_UNMAP)

	CreateLazyRefcounts = uint32(C.OXCOW_CREATE_LAZY_REFCOUNTS)
	CreateExtendedL2    = uint32(C.OXCOW_CREATE_EXTENDED_L2)
	CreateDataFileRaw   = uint32(C.OXCOW_CREATE_DATA_FILE_RAW)

	CompressionDeflate = uint32(C.OXCOW_COMPRESSION_DEFLATE)
	CompressionZstd    = uint32(C.OXCOW_COMPRESSION_ZSTD)

	PreallocOff      = uint32(C.OXCOW_PREALLOC_OFF)
	PreallocMetadata = uint32(C.OXCOW_PREALLOC_METADATA)

	ExtentAllocated  = uint32(C.OXCOW_EXTENT_ALLOCATED)
	ExtentZero       = uint32(C.OXCOW_EXTENT_ZERO)
	ExtentBacking    = uint32(C.OXCOW_EXTENT_BACKING)
	ExtentCompressed = uint32(C.OXCOW_EXTENT_COMPRESSED)

	InfoExtendedL2    = uint32(C.OXCOW_INFO_EXTENDED_L2)
	InfoLazyRefcounts = uint32(C.OXCOW_INFO_LAZY_REFCOUNTS)
	InfoDirty         = uint32(C.OXCOW_INFO_DIRTY)
	InfoCorrupt       = uint32(C.OXCOW_INFO_CORRUPT)
	InfoReadOnly      = uint32(C.OXCOW_INFO_READ_ONLY)
	InfoHasBacking    = uint32(C.OXCOW_INFO_HAS_BACKING)

	CheckFixLeaks  = uint32(C.OXCOW_CHECK_FIX_LEAKS)
	CheckFixErrors = uint32(C.OXCOW_CHECK_FIX_ERRORS)
)

// Header version macros, as compiled into this package.
const (
	HeaderVersionMajor  = int(C.OXCOW_VERSION_MAJOR)
	HeaderVersionMinor  = int(C.OXCOW_VERSION_MINOR)
	HeaderVersionPatch  = int(C.OXCOW_VERSION_PATCH)
	HeaderVersionNumber = HeaderVersionMajor*10000 + HeaderVersionMinor*100 + HeaderVersionPatch
)

// Err is a failed call: the positive errno and the library's message ("" when the C function
// has no oxcow_error out-parameter).
type Err struct {
	Errno   syscall.Errno
	Message string
}

// Handle is an open oxcow_image. The zero Handle is "no image".
type Handle struct {
	p *C.oxcow_image
}

// Valid reports whether h refers to an image.
func (h Handle) Valid() bool { return h.p != nil }

// fromCode converts a return code of a call without an error object.
func fromCode(rc C.int) *Err {
	if rc == 0 {
		return nil
	}
	return &Err{Errno: errnoOf(int(rc))}
}

// fromErr converts a return code and the error object of a call that has one, and frees it.
func fromErr(rc C.int, e *C.oxcow_error) *Err {
	if rc == 0 {
		if e != nil {
			C.oxcow_error_free(e)
		}
		return nil
	}
	out := &Err{Errno: errnoOf(int(rc))}
	if e != nil {
		out.Message = C.GoString(C.oxcow_error_message(e))
		if n := int(C.oxcow_error_errno(e)); n > 0 {
			out.Errno = syscall.Errno(n)
		}
		C.oxcow_error_free(e)
	}
	return out
}

func errnoOf(rc int) syscall.Errno {
	if rc < 0 {
		return syscall.Errno(-rc)
	}
	// A positive return is not part of the contract; report it as an I/O error.
	return syscall.EIO
}

// CreateOptions mirrors oxcow_create_options (zero numeric values mean "the default").
type CreateOptions struct {
	ClusterSize     uint32
	Version         uint32
	RefcountBits    uint32
	Flags           uint32
	CompressionType uint32
	Preallocation   uint32
	BackingFile     string
	BackingFormat   string
	DataFile        string
}

// Create calls oxcow_create. A nil opts means the library defaults.
func Create(path string, size uint64, opts *CreateOptions) *Err {
	cpath := C.CString(path)
	defer C.free(unsafe.Pointer(cpath))
	var copts *C.oxcow_create_options
	if opts != nil {
		copts = (*C.oxcow_create_options)(C.calloc(1, C.sizeof_oxcow_create_options))
		defer C.free(unsafe.Pointer(copts))
		C.oxcow_create_options_init(copts)
		copts.cluster_size = C.uint32_t(opts.ClusterSize)
		copts.version = C.uint32_t(opts.Version)
		copts.refcount_bits = C.uint32_t(opts.RefcountBits)
		copts.flags = C.uint32_t(opts.Flags)
		copts.compression_type = C.uint32_t(opts.CompressionType)
		copts.preallocation = C.uint32_t(opts.Preallocation)
		if opts.BackingFile != "" {
			copts.backing_file = C.CString(opts.BackingFile)
			defer C.free(unsafe.Pointer(copts.backing_file))
		}
		if opts.BackingFormat != "" {
			copts.backing_format = C.CString(opts.BackingFormat)
			defer C.free(unsafe.Pointer(copts.backing_format))
		}
		if opts.DataFile != "" {
			copts.data_file = C.CString(opts.DataFile)
			defer C.free(unsafe.Pointer(copts.data_file))
		}
	}
	var e *C.oxcow_error
	rc := C.oxcow_create(cpath, C.uint64_t(size), copts, &e)
	return fromErr(rc, e)
}

// Open calls oxcow_open. cacheSize 0 means the library default.
func Open(path string, flags uint32, cacheSize uint64) (Handle, *Err) {
	return OpenWith(path, flags, cacheSize, "")
}

// Close calls oxcow_close. The handle is freed even when the flush fails.
func Close(h Handle) *Err {
	return fromCode(C.oxcow_close(h.p))
}

// Pread reads len(buf) bytes at off.
func Pread(h Handle, buf []byte, off uint64) *Err {
	if len(buf) == 0 {
		return fromCode(C.oxcow_pread(h.p, nil, 0, C.uint64_t(off)))
	}
	rc := C.oxcow_pread(h.p, unsafe.Pointer(&buf[0]), C.size_t(len(buf)), C.uint64_t(off))
	runtime.KeepAlive(buf)
	return fromCode(rc)
}

// Pwrite writes buf at off.
func Pwrite(h Handle, buf []byte, off uint64) *Err {
	if len(buf) == 0 {
		return fromCode(C.oxcow_pwrite(h.p, nil, 0, C.uint64_t(off)))
	}
	rc := C.oxcow_pwrite(h.p, unsafe.Pointer(&buf[0]), C.size_t(len(buf)), C.uint64_t(off))
	runtime.KeepAlive(buf)
	return fromCode(rc)
}

// WriteCompressed calls oxcow_write_compressed.
func WriteCompressed(h Handle, buf []byte, off uint64) *Err {
	if len(buf) == 0 {
		return fromCode(C.oxcow_write_compressed(h.p, nil, 0, C.uint64_t(off)))
	}
	rc := C.oxcow_write_compressed(h.p, unsafe.Pointer(&buf[0]), C.size_t(len(buf)), C.uint64_t(off))
	runtime.KeepAlive(buf)
	return fromCode(rc)
}

// WriteZeroes calls oxcow_write_zeroes.
func WriteZeroes(h Handle, off, count uint64, flags uint32) *Err {
	return fromCode(C.oxcow_write_zeroes(h.p, C.uint64_t(off), C.uint64_t(count), C.uint32_t(flags)))
}

// Discard calls oxcow_discard.
func Discard(h Handle, off, count uint64) *Err {
	return fromCode(C.oxcow_discard(h.p, C.uint64_t(off), C.uint64_t(count)))
}

// Flush calls oxcow_flush.
func Flush(h Handle) *Err {
	return fromCode(C.oxcow_flush(h.p))
}

// Reopen calls oxcow_reopen.
func Reopen(h Handle, flags uint32) *Err {
	var e *C.oxcow_error
	rc := C.oxcow_reopen(h.p, C.uint32_t(flags), &e)
	return fromErr(rc, e)
}

// CheckResult mirrors oxcow_check_result.
type CheckResult struct {
	Corruptions        uint64
	Leaks              uint64
	CheckErrors        uint64
	CorruptionsFixed   uint64
	LeaksFixed         uint64
	TotalClusters      uint64
	AllocatedClusters  uint64
	FragmentedClusters uint64
	CompressedClusters uint64
	ImageEndOffset     uint64
}

// Check calls oxcow_check.
func Check(h Handle, fix uint32) (CheckResult, *Err) {
	var r C.oxcow_check_result
	C.oxcow_check_result_init(&r)
	var e *C.oxcow_error
	rc := C.oxcow_check(h.p, C.uint32_t(fix), &r, &e)
	if err := fromErr(rc, e); err != nil {
		return CheckResult{}, err
	}
	return CheckResult{
		Corruptions:        uint64(r.corruptions),
		Leaks:              uint64(r.leaks),
		CheckErrors:        uint64(r.check_errors),
		CorruptionsFixed:   uint64(r.corruptions_fixed),
		LeaksFixed:         uint64(r.leaks_fixed),
		TotalClusters:      uint64(r.total_clusters),
		AllocatedClusters:  uint64(r.allocated_clusters),
		FragmentedClusters: uint64(r.fragmented_clusters),
		CompressedClusters: uint64(r.compressed_clusters),
		ImageEndOffset:     uint64(r.image_end_offset),
	}, nil
}

// Info mirrors oxcow_info.
type Info struct {
	ClusterSize     uint32
	VirtualSize     uint64
	FileSize        uint64
	Version         uint32
	RefcountBits    uint32
	CompressionType uint32
	Flags           uint32
	SnapshotCount   uint32
	BackingFile     string
	BackingFormat   string
}

// GetInfo calls oxcow_get_info. The struct is C memory: it is large (over 1 KiB) and holds
// the backing file name.
func GetInfo(h Handle) (Info, *Err) {
	ci := (*C.oxcow_info)(C.calloc(1, C.sizeof_oxcow_info))
	if ci == nil {
		return Info{}, &Err{Errno: syscall.ENOMEM, Message: "cannot allocate oxcow_info"}
	}
	defer C.free(unsafe.Pointer(ci))
	C.oxcow_info_init(ci)
	if err := fromCode(C.oxcow_get_info(h.p, ci)); err != nil {
		return Info{}, err
	}
	return Info{
		ClusterSize:     uint32(ci.cluster_size),
		VirtualSize:     uint64(ci.virtual_size),
		FileSize:        uint64(ci.file_size),
		Version:         uint32(ci.version),
		RefcountBits:    uint32(ci.refcount_bits),
		CompressionType: uint32(ci.compression_type),
		Flags:           uint32(ci.flags),
		SnapshotCount:   uint32(ci.snapshot_count),
		BackingFile:     cArrayString(ci.backing_file[:]),
		BackingFormat:   cArrayString(ci.backing_format[:]),
	}, nil
}

func cArrayString(a []C.char) string {
	b := make([]byte, 0, len(a))
	for _, c := range a {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b)
}

// Extent mirrors oxcow_extent.
type Extent struct {
	Offset     uint64
	Length     uint64
	HostOffset uint64
	Flags      uint32
}

// BlockStatus calls oxcow_block_status.
func BlockStatus(h Handle, off, count uint64) (Extent, *Err) {
	var ext C.oxcow_extent
	if err := fromCode(C.oxcow_block_status(h.p, C.uint64_t(off), C.uint64_t(count), &ext)); err != nil {
		return Extent{}, err
	}
	return Extent{
		Offset:     uint64(ext.offset),
		Length:     uint64(ext.length),
		HostOffset: uint64(ext.host_offset),
		Flags:      uint32(ext.flags),
	}, nil
}

// VersionNumber calls oxcow_version_number.
func VersionNumber() int { return int(C.oxcow_version_number()) }

// VersionString calls oxcow_version_string.
func VersionString() string { return C.GoString(C.oxcow_version_string()) }
