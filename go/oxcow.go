package oxcow

import (
	"io"
	"runtime"
	"runtime/cgo"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"oxcow.dev/oxcow/internal/capi"
)

// Compression is the qcow2 compression type of an image.
type Compression uint32

// Compression types.
const (
	CompressionDeflate Compression = Compression(capi.CompressionDeflate) // QEMU's "zlib"
	CompressionZstd    Compression = Compression(capi.CompressionZstd)
)

func (c Compression) String() string {
	switch c {
	case CompressionDeflate:
		return "zlib"
	case CompressionZstd:
		return "zstd"
	}
	return "unknown"
}

// Preallocation selects what Create allocates up front.
type Preallocation uint32

// Preallocation modes.
const (
	// PreallocOff allocates only the header, refcount structures and the L1 table.
	PreallocOff Preallocation = Preallocation(capi.PreallocOff)
	// PreallocMetadata also allocates every L2 table and data cluster (the file grows
	// sparsely).
	PreallocMetadata Preallocation = Preallocation(capi.PreallocMetadata)
)

// CreateOptions are the parameters of Create. The zero value (and a nil pointer) means the
// defaults: 64 KiB clusters, qcow2 version 3, 16-bit refcounts, deflate compression, no
// preallocation, no backing file.
type CreateOptions struct {
	ClusterSize   uint32 // a power of two from 512 to 2 MiB; 0 means 65536
	Version       int    // qcow2 version, 2 or 3; 0 means 3
	RefcountBits  int    // a power of two up to 64 (version 2: 16); 0 means 16
	LazyRefcounts bool   // set the lazy-refcounts compatible bit (version 3)
	ExtendedL2    bool   // 32 subclusters per cluster (version 3, clusters >= 16 KiB)
	Compression   Compression
	Preallocation Preallocation
	// BackingFile is stored in the header; relative names resolve against the new image's
	// directory. BackingFormat ("qcow2" or "raw") is required with it. With a backing file,
	// a size of 0 means the backing file's size.
	BackingFile   string
	BackingFormat string
	// DataFile puts the guest data in an external data file (qemu-img's -o data_file=),
	// created or truncated to the disk's size; a relative name resolves against the current
	// directory, as in QEMU. DataFileRaw keeps it a valid raw image of the disk
	// (data_file_raw=on; no backing file).
	DataFile    string
	DataFileRaw bool
}

// Create creates a new qcow2 image at path (replacing any existing file) with size bytes of
// guest space.
func Create(path string, size uint64, opts *CreateOptions) error {
	var co *capi.CreateOptions
	if opts != nil {
		if opts.Version < 0 || opts.RefcountBits < 0 {
			return newError("create", path, syscall.EINVAL, "negative version or refcount width")
		}
		co = &capi.CreateOptions{
			ClusterSize:     opts.ClusterSize,
			Version:         uint32(opts.Version),
			RefcountBits:    uint32(opts.RefcountBits),
			CompressionType: uint32(opts.Compression),
			Preallocation:   uint32(opts.Preallocation),
			BackingFile:     opts.BackingFile,
			BackingFormat:   opts.BackingFormat,
			DataFile:        opts.DataFile,
		}
		if opts.DataFileRaw {
			co.Flags |= capi.CreateDataFileRaw
		}
		if opts.LazyRefcounts {
			co.Flags |= capi.CreateLazyRefcounts
		}
		if opts.ExtendedL2 {
			co.Flags |= capi.CreateExtendedL2
		}
	}
	return wrap("create", path, capi.Create(path, size, co))
}

// OpenOptions are the parameters of Open. A nil pointer opens read-only with the defaults.
type OpenOptions struct {
	// Writable opens read-write. Without it the image is read-only and no byte is written
	// to any file.
	Writable bool
	// NoBacking does not open the backing file; unallocated clusters read as zeros.
	NoBacking bool
	// ForceShare opens read-only while ignoring other processes' locks (like qemu-img -U).
	// It cannot be combined with Writable.
	ForceShare bool
	// Direct opens the image file with O_DIRECT.
	Direct bool
	// Writethrough makes every write durable when it returns.
	Writethrough bool
	// NoProbe refuses (ENOTSUP) a backing chain in which an image does not record its
	// backing file's format, instead of guessing the format from the backing file's
	// contents, which a guest may control. Set it for untrusted images.
	NoProbe bool
	// DiscardUnmap is QEMU's discard=unmap (writable opens): clusters freed by Discard or an
	// unmapping WriteZeroes have their host ranges punched once the free is durable (after
	// the next Flush), so the file's allocated blocks shrink. Without it nothing is punched.
	DiscardUnmap bool
	// CacheSize is the L2 cache size in bytes; 0 means the library default (enough to map
	// the whole image, at most 32 MiB, as QEMU).
	CacheSize uint64
	// RefcountCacheSize is the refcount cache size in bytes; 0 means the default (four
	// clusters).
	RefcountCacheSize uint64
	// L2SliceSize is the size of one cached slice of an L2 table or refcount block (qemu's
	// l2-cache-entry-size); 0 means 4 KiB. Otherwise a power of two from 512 up to the
	// cluster size (EINVAL).
	L2SliceSize uint64
	// CacheCleanInterval drops cache entries nobody used for this long, so an idle handle
	// gives its cache memory back (qemu's cache-clean-interval; checked at cache misses,
	// flushes and every few hundred requests). 0 means the default (600 s), a negative value
	// never drops them; otherwise rounded up to whole seconds.
	CacheCleanInterval time.Duration
	// Snapshot, when not empty, opens a read-only view of the internal snapshot with this
	// id, else this name (like qemu-img convert -l); EINVAL with Writable, ENOENT when
	// there is no such snapshot.
	Snapshot string
}

func (o *OpenOptions) flags() uint32 {
	var f uint32
	if o == nil {
		return f
	}
	if o.Writable {
		f |= capi.OpenRDWR
	}
	if o.NoBacking {
		f |= capi.OpenNoBacking
	}
	if o.ForceShare {
		f |= capi.OpenForceShare
	}
	if o.Direct {
		f |= capi.OpenDirect
	}
	if o.Writethrough {
		f |= capi.OpenWritethrough
	}
	if o.NoProbe {
		f |= capi.OpenNoProbe
	}
	if o.DiscardUnmap {
		f |= capi.OpenDiscardUnmap
	}
	return f
}

// Image is an open qcow2 image. Its methods may be called from any number of goroutines at
// once. Close it when done; a finalizer closes leaked images as a last resort, but relying on
// it loses the flush error and keeps the image locked until the garbage collector runs.
type Image struct {
	// mu is held in read mode by every call that uses h (they run concurrently in the
	// library) and in write mode by Close, which therefore waits for calls in progress and
	// makes later calls fail with EBADF instead of touching a freed handle.
	mu   sync.RWMutex
	h    capi.Handle // zero after Close
	path string
	size atomic.Int64 // virtual size; changed only by Resize and ApplySnapshot
	// resizeMu serialises Resize and ApplySnapshot calls so that size ends up as the library's.
	resizeMu sync.Mutex

	// reopenMu serialises Reopen calls so that flags matches the library's state.
	reopenMu sync.Mutex
	flags    uint32 // open flags; guarded by reopenMu

	// eventHandles keeps every registered event handler alive until Close: the library may
	// still be calling a replaced handler on another thread.
	eventMu      sync.Mutex
	eventHandles []cgo.Handle
}

// cleanSeconds is oxcow_open_options.cache_clean_interval for d (see CacheCleanInterval).
func cleanSeconds(d time.Duration) uint64 {
	switch {
	case d < 0:
		return capi.CacheCleanNever
	case d == 0:
		return 0
	default:
		return uint64((d + time.Second - 1) / time.Second)
	}
}

// Open opens the image at path.
func Open(path string, opts *OpenOptions) (*Image, error) {
	flags := opts.flags()
	var caches capi.CacheSizes
	var snapshot string
	if opts != nil {
		caches = capi.CacheSizes{L2: opts.CacheSize, Refcount: opts.RefcountCacheSize, Slice: opts.L2SliceSize,
			CleanInterval: cleanSeconds(opts.CacheCleanInterval)}
		snapshot = opts.Snapshot
	}
	h, cerr := capi.OpenWithCaches(path, flags, caches, snapshot)
	if cerr != nil {
		return nil, wrap("open", path, cerr)
	}
	info, cerr := capi.GetInfo(h)
	if cerr == nil && info.VirtualSize > uint64(maxInt64) {
		cerr = &capi.Err{Errno: syscall.EOVERFLOW, Message: "virtual size does not fit in int64"}
	}
	if cerr != nil {
		capi.Close(h)
		return nil, wrap("open", path, cerr)
	}
	img := &Image{h: h, flags: flags, path: path}
	img.size.Store(int64(info.VirtualSize))
	runtime.SetFinalizer(img, (*Image).finalize)
	return img, nil
}

const maxInt64 = 1<<63 - 1

// finalize is the garbage collector's backstop for images that were never closed.
func (img *Image) finalize() {
	img.mu.Lock()
	defer img.mu.Unlock()
	if img.h.Valid() {
		capi.Close(img.h)
		img.h = capi.Handle{}
	}
}

// Close flushes and closes the image and returns the flush error, if any; the handle is
// released even when the flush fails. Close waits for calls in progress on other goroutines.
// Closing an already closed image does nothing and returns nil; every other method of a
// closed image returns an error wrapping syscall.EBADF.
func (img *Image) Close() error {
	img.mu.Lock()
	defer img.mu.Unlock()
	if !img.h.Valid() {
		return nil
	}
	cerr := capi.Close(img.h)
	img.h = capi.Handle{}
	runtime.SetFinalizer(img, nil)
	img.eventMu.Lock()
	for _, hd := range img.eventHandles {
		hd.Delete()
	}
	img.eventHandles = nil
	img.eventMu.Unlock()
	return wrap("close", img.path, cerr)
}

// acquire takes the read lock and returns the live handle, or an EBADF error (with the lock
// released) when the image is closed. The caller must call img.mu.RUnlock() on success.
func (img *Image) acquire(op string) (capi.Handle, error) {
	img.mu.RLock()
	if !img.h.Valid() {
		img.mu.RUnlock()
		return capi.Handle{}, &Error{Op: op, Path: img.path, Errno: syscall.EBADF, Message: "image is closed"}
	}
	return img.h, nil
}

// Path returns the path the image was opened with.
func (img *Image) Path() string { return img.path }

// Size returns the virtual (guest-visible) size in bytes.
func (img *Image) Size() int64 { return img.size.Load() }

// checkRange validates a request of n bytes at off against the virtual size.
func (img *Image) checkRange(op string, off, n int64) error {
	if off < 0 || n < 0 {
		return newError(op, img.path, syscall.EINVAL, "negative offset %d or length %d", off, n)
	}
	size := img.size.Load()
	if off > size || n > size-off {
		return newError(op, img.path, syscall.EINVAL,
			"range [%d, %d) is beyond the virtual size %d", off, uint64(off)+uint64(n), size)
	}
	return nil
}

// ReadAt reads len(p) bytes of guest data at off (io.ReaderAt). Reads are complete: a short
// count happens only at the end of the image, where ReadAt returns the bytes before the end
// and io.EOF (io.EOF with 0 bytes when off is at or past the end). A read that fails in the
// library returns 0 and the error.
func (img *Image) ReadAt(p []byte, off int64) (int, error) {
	h, err := img.acquire("read")
	if err != nil {
		return 0, err
	}
	defer img.mu.RUnlock()
	if off < 0 {
		return 0, newError("read", img.path, syscall.EINVAL, "negative offset %d", off)
	}
	if len(p) == 0 {
		return 0, nil
	}
	size := img.size.Load()
	if off >= size {
		return 0, io.EOF
	}
	var eof error
	if int64(len(p)) > size-off {
		p = p[:size-off]
		eof = io.EOF
	}
	if cerr := capi.Pread(h, p, uint64(off)); cerr != nil {
		return 0, wrap("read", img.path, cerr)
	}
	return len(p), eof
}

// WriteAt writes p at guest offset off (io.WriterAt). A write that does not fit inside the
// virtual size writes nothing and fails with EINVAL; a read-only image fails with EROFS.
// Writes are all-or-nothing as far as the return value goes: n is len(p) or 0.
func (img *Image) WriteAt(p []byte, off int64) (int, error) {
	h, err := img.acquire("write")
	if err != nil {
		return 0, err
	}
	defer img.mu.RUnlock()
	if err := img.checkRange("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if cerr := capi.Pwrite(h, p, uint64(off)); cerr != nil {
		return 0, wrap("write", img.path, cerr)
	}
	return len(p), nil
}

// Event is a corruption event: a write the metadata-overlap guard stopped, or an
// inconsistency met during I/O.
type Event struct {
	// Message names the structure, e.g. "Preventing invalid write on metadata (overlaps with
	// active L2 table) ...".
	Message string
	// HostOffset and Size locate the problem in the image file when HasLocation is true.
	HostOffset, Size uint64
	HasLocation      bool
	// Fatal is true when the image was marked corrupt and the handle fenced: every later call
	// fails with ENOMEDIUM. A read-only image reports its first problem once, not fatally.
	Fatal bool
}

// SetEventHandler registers fn to receive corruption events (nil removes it). fn runs on the
// goroutine's thread whose call found the problem, before that call returns its error; it may
// call methods of img other than Close.
func (img *Image) SetEventHandler(fn func(Event)) error {
	h, err := img.acquire("set event handler")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	var cfn capi.EventFunc
	if fn != nil {
		cfn = func(e capi.Event) {
			fn(Event{Message: e.Message, HostOffset: e.HostOffset, Size: e.Size,
				HasLocation: e.HasLocation, Fatal: e.Fatal})
		}
	}
	hd, cerr := capi.SetEventCallback(h, cfn)
	if cerr != nil {
		return wrap("set event handler", img.path, cerr)
	}
	if hd != 0 {
		img.eventMu.Lock()
		img.eventHandles = append(img.eventHandles, hd)
		img.eventMu.Unlock()
	}
	return nil
}

// OverlapCheck selects which metadata the overlap guard protects from writes.
type OverlapCheck uint32

// Overlap-check modes, as QEMU's overlap-check option. OverlapAll is the default.
const (
	OverlapNone     OverlapCheck = OverlapCheck(capi.OverlapNone)
	OverlapConstant OverlapCheck = OverlapCheck(capi.OverlapConstant)
	OverlapCached   OverlapCheck = OverlapCheck(capi.OverlapCached)
	OverlapAll      OverlapCheck = OverlapCheck(capi.OverlapAll)
)

// SetOverlapCheck changes the overlap-check mode for the following requests.
func (img *Image) SetOverlapCheck(mode OverlapCheck) error {
	h, err := img.acquire("set overlap check")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	return wrap("set overlap check", img.path, capi.SetOverlapCheck(h, uint32(mode)))
}

// WriteCompressed writes one whole cluster compressed (the image's zlib or zstd), as backup
// and conversion tools do: off must be cluster-aligned and len(p) the cluster size (or the
// rest of the disk for a short last cluster). Data that does not compress is stored plain.
func (img *Image) WriteCompressed(p []byte, off int64) error {
	h, err := img.acquire("write compressed")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	if err := img.checkRange("write compressed", off, int64(len(p))); err != nil {
		return err
	}
	return wrap("write compressed", img.path, capi.WriteCompressed(h, p, uint64(off)))
}

// WriteZeroes makes [off, off+n) read as zeros. With mayUnmap the clusters may be
// deallocated; otherwise fully covered allocated clusters stay allocated.
func (img *Image) WriteZeroes(off, n int64, mayUnmap bool) error {
	h, err := img.acquire("write zeroes")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	if err := img.checkRange("write zeroes", off, n); err != nil {
		return err
	}
	var flags uint32
	if mayUnmap {
		flags = capi.ZeroMayUnmap
	}
	return wrap("write zeroes", img.path, capi.WriteZeroes(h, uint64(off), uint64(n), flags))
}

// Discard releases the clusters fully inside [off, off+n); they then read as zeros (in
// version-2 images with a backing file: as the backing data). Partial clusters at the edges
// are left unchanged.
func (img *Image) Discard(off, n int64) error {
	h, err := img.acquire("discard")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	if err := img.checkRange("discard", off, n); err != nil {
		return err
	}
	return wrap("discard", img.path, capi.Discard(h, uint64(off), uint64(n)))
}

// Flush makes every write that completed before the call durable. It is a no-op on
// read-only images.
func (img *Image) Flush() error {
	h, err := img.acquire("flush")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	return wrap("flush", img.path, capi.Flush(h))
}

// Sync is Flush, for callers that expect an *os.File-like method set.
func (img *Image) Sync() error { return img.Flush() }

// Reopen switches the open image between read-only and read-write, keeping the other open
// options: going read-only flushes and drops the write locks; going read-write takes them
// (EAGAIN while another process uses the image). A failed Reopen changes nothing.
func (img *Image) Reopen(writable bool) error {
	h, err := img.acquire("reopen")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	img.reopenMu.Lock()
	defer img.reopenMu.Unlock()
	flags := img.flags &^ capi.OpenRDWR
	if writable {
		flags |= capi.OpenRDWR
		flags &^= capi.OpenForceShare // force-share is read-only only
	}
	if cerr := capi.Reopen(h, flags); cerr != nil {
		return wrap("reopen", img.path, cerr)
	}
	img.flags = flags
	return nil
}

// CheckFix selects what Check repairs.
type CheckFix uint32

// Check repair modes.
const (
	CheckFixNone   CheckFix = 0
	CheckFixLeaks  CheckFix = CheckFix(capi.CheckFixLeaks)
	CheckFixErrors CheckFix = CheckFix(capi.CheckFixErrors)
	CheckFixAll             = CheckFixLeaks | CheckFixErrors
)

// CheckResult is the outcome of Check, with the same counters as qemu-img check.
type CheckResult struct {
	Corruptions        uint64 // corruptions found and not fixed
	Leaks              uint64 // leaked clusters found and not fixed
	CheckErrors        uint64 // errors that prevented checking part of the image
	CorruptionsFixed   uint64
	LeaksFixed         uint64
	TotalClusters      uint64 // guest clusters in the image
	AllocatedClusters  uint64 // guest clusters allocated in this image
	FragmentedClusters uint64
	CompressedClusters uint64
	ImageEndOffset     uint64 // end of the last used host cluster
}

// Clean reports whether the check found no corruption, leak or check error left unfixed.
func (r *CheckResult) Clean() bool {
	return r.Corruptions == 0 && r.Leaks == 0 && r.CheckErrors == 0
}

// Check checks the image's metadata consistency (like qemu-img check) and repairs what fix
// asks for: CheckFixLeaks lowers over-counted refcounts, CheckFixAll also repairs corruptions
// and clears the dirty and corrupt bits once the image is clean. I/O waits while it runs.
func (img *Image) Check(fix CheckFix) (*CheckResult, error) {
	h, err := img.acquire("check")
	if err != nil {
		return nil, err
	}
	defer img.mu.RUnlock()
	r, cerr := capi.Check(h, uint32(fix))
	if cerr != nil {
		return nil, wrap("check", img.path, cerr)
	}
	out := CheckResult(r)
	return &out, nil
}

// Info describes an open image.
type Info struct {
	VirtualSize   uint64 // guest-visible size in bytes
	FileSize      uint64 // size of the image file in bytes
	ClusterSize   uint32
	Version       int // qcow2 version, 2 or 3
	RefcountBits  int
	Compression   Compression
	SnapshotCount int
	BackingFile   string // as stored in the header; "" without one
	BackingFormat string // from the header extension; "" if absent
	ExtendedL2    bool   // subclusters in use
	LazyRefcounts bool   // the lazy-refcounts compatible bit is set
	Dirty         bool   // the dirty bit is set (refcounts may be stale)
	Corrupt       bool   // the corrupt bit is set
	ReadOnly      bool   // the handle is read-only
	HasBacking    bool   // the image names a backing file
}

// Info returns facts about the image: sizes, format parameters and state bits.
func (img *Image) Info() (*Info, error) {
	h, err := img.acquire("info")
	if err != nil {
		return nil, err
	}
	defer img.mu.RUnlock()
	ci, cerr := capi.GetInfo(h)
	if cerr != nil {
		return nil, wrap("info", img.path, cerr)
	}
	return &Info{
		VirtualSize:   ci.VirtualSize,
		FileSize:      ci.FileSize,
		ClusterSize:   ci.ClusterSize,
		Version:       int(ci.Version),
		RefcountBits:  int(ci.RefcountBits),
		Compression:   Compression(ci.CompressionType),
		SnapshotCount: int(ci.SnapshotCount),
		BackingFile:   ci.BackingFile,
		BackingFormat: ci.BackingFormat,
		ExtendedL2:    ci.Flags&capi.InfoExtendedL2 != 0,
		LazyRefcounts: ci.Flags&capi.InfoLazyRefcounts != 0,
		Dirty:         ci.Flags&capi.InfoDirty != 0,
		Corrupt:       ci.Flags&capi.InfoCorrupt != 0,
		ReadOnly:      ci.Flags&capi.InfoReadOnly != 0,
		HasBacking:    ci.Flags&capi.InfoHasBacking != 0,
	}, nil
}

// ExtentFlags describe the allocation status of an Extent.
type ExtentFlags uint32

// Extent flags.
const (
	// ExtentAllocated: the contents are determined by this image (data, compressed data or
	// a zero cluster), not by the backing chain.
	ExtentAllocated ExtentFlags = ExtentFlags(capi.ExtentAllocated)
	// ExtentZero: the range is known to read as zeros.
	ExtentZero ExtentFlags = ExtentFlags(capi.ExtentZero)
	// ExtentBacking: the range reads from the backing chain.
	ExtentBacking ExtentFlags = ExtentFlags(capi.ExtentBacking)
	// ExtentCompressed: the range is stored compressed.
	ExtentCompressed ExtentFlags = ExtentFlags(capi.ExtentCompressed)
)

// Extent is a guest range with a uniform allocation status.
type Extent struct {
	Offset int64 // guest offset (the requested offset)
	Length int64 // bytes over which the status holds, 1 to the requested count
	// HostOffset is where the data lives in the image file when the range holds
	// uncompressed data of this image; 0 otherwise.
	HostOffset uint64
	Flags      ExtentFlags
}

// Allocated reports whether the range's contents come from this image.
func (e Extent) Allocated() bool { return e.Flags&ExtentAllocated != 0 }

// Zero reports whether the range is known to read as zeros.
func (e Extent) Zero() bool { return e.Flags&ExtentZero != 0 }

// Backing reports whether the range reads from the backing chain.
func (e Extent) Backing() bool { return e.Flags&ExtentBacking != 0 }

// Compressed reports whether the range is stored compressed.
func (e Extent) Compressed() bool { return e.Flags&ExtentCompressed != 0 }

// Data reports whether the range holds data stored in this image (allocated, not zero).
func (e Extent) Data() bool { return e.Allocated() && !e.Zero() }

// BlockStatus describes the allocation status of the range starting at off: the returned
// extent starts at off and extends, at most n bytes, as far as the status stays the same.
// Call it again from off+Length for the rest.
func (img *Image) BlockStatus(off, n int64) (Extent, error) {
	h, err := img.acquire("block status")
	if err != nil {
		return Extent{}, err
	}
	defer img.mu.RUnlock()
	if err := img.checkRange("block status", off, n); err != nil {
		return Extent{}, err
	}
	if n == 0 {
		return Extent{}, newError("block status", img.path, syscall.EINVAL, "zero-length range")
	}
	ce, cerr := capi.BlockStatus(h, uint64(off), uint64(n))
	if cerr != nil {
		return Extent{}, wrap("block status", img.path, cerr)
	}
	return Extent{
		Offset:     int64(ce.Offset),
		Length:     int64(ce.Length),
		HostOffset: ce.HostOffset,
		Flags:      ExtentFlags(ce.Flags),
	}, nil
}

// Version returns the version of the loaded library, e.g. "0.1.0".
func Version() string { return capi.VersionString() }

// VersionNumber returns the loaded library's version as MAJOR*10000 + MINOR*100 + PATCH.
func VersionNumber() int { return capi.VersionNumber() }

// HeaderVersionNumber is the version of the oxcow.h this package was compiled against, in
// the same encoding as VersionNumber.
const HeaderVersionNumber = capi.HeaderVersionNumber

// Interface checks.
var (
	_ io.ReaderAt = (*Image)(nil)
	_ io.WriterAt = (*Image)(nil)
	_ io.Closer   = (*Image)(nil)
)
