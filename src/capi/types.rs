//! Flag constants and the option/result structs of the C ABI, with their `_init` functions.
//!
//! Every struct the caller passes in or out starts with `struct_size` so it can grow without
//! breaking the ABI: the library reads (or fills) only the version-1 prefix and rejects a
//! `struct_size` smaller than that prefix.

use std::ffi::c_char;
use std::mem::size_of;

/// Open flag: open read-write. Without it the image is read-only and no byte is ever written.
pub const OXCOW_OPEN_RDWR: u32 = 1u32;
/// Open flag: do not open the backing file; unallocated clusters read as zeros.
pub const OXCOW_OPEN_NO_BACKING: u32 = 2u32;
/// Open flag: read-only open that ignores other processes' locks (like `qemu-img -U`).
pub const OXCOW_OPEN_FORCE_SHARE: u32 = 4u32;
/// Open flag: open the image file with O_DIRECT. Buffers, offsets and lengths of any
/// alignment are accepted (oxcow bounces them); 4 KiB-aligned requests are the fast path.
/// -ENOTSUP when the file system refuses O_DIRECT.
pub const OXCOW_OPEN_DIRECT: u32 = 8u32;
/// Open flag: every write is durable when it returns.
pub const OXCOW_OPEN_WRITETHROUGH: u32 = 16u32;
/// Open flag (read-only opens): the handle will never be reopened read-write; oxcow_reopen()
/// with OXCOW_OPEN_RDWR then fails with -EROFS.
pub const OXCOW_OPEN_KEEP_READ_ONLY: u32 = 32u32;
/// Open flag: refuse (-ENOTSUP) a backing chain in which an image does not record its
/// backing file's format, instead of guessing it from the backing file's contents (which a
/// guest may control). Set it for untrusted images. A recorded format is always obeyed.
pub const OXCOW_OPEN_NO_PROBE: u32 = 64u32;
/// Open flag (read-write opens): QEMU's `discard=unmap`. Clusters freed by oxcow_discard()
/// or an unmapping oxcow_write_zeroes() have their host ranges punched
/// (`fallocate(PUNCH_HOLE|KEEP_SIZE)`) once the free is durable (after the next flush) and
/// no request can still touch them, so the file's allocated blocks shrink. Without it freed
/// clusters keep their blocks until reused. May change in oxcow_reopen().
pub const OXCOW_OPEN_DISCARD_UNMAP: u32 = 128u32;

/// oxcow_write_zeroes() flag: the clusters may be deallocated instead of kept allocated.
pub const OXCOW_ZERO_MAY_UNMAP: u32 = 1u32;

/// oxcow_create_options flag: set the lazy-refcounts compatible bit (version 3 only).
pub const OXCOW_CREATE_LAZY_REFCOUNTS: u32 = 1u32;
/// oxcow_create_options flag: extended L2 entries with 32 subclusters (version 3 only,
/// cluster size at least 16 KiB).
pub const OXCOW_CREATE_EXTENDED_L2: u32 = 2u32;
/// oxcow_create_options flag: keep the data file a valid raw image of the disk
/// (`data_file_raw=on`; needs `data_file`, excludes a backing file).
pub const OXCOW_CREATE_DATA_FILE_RAW: u32 = 4u32;

/// Compression type "deflate" (QEMU's "zlib"), header value 0.
pub const OXCOW_COMPRESSION_DEFLATE: u32 = 0u32;
/// Compression type zstd, header value 1 (version 3 only).
pub const OXCOW_COMPRESSION_ZSTD: u32 = 1u32;

/// Preallocation: only header, refcount structures and L1 table.
pub const OXCOW_PREALLOC_OFF: u32 = 0u32;
/// Preallocation: also every L2 table and every data cluster (the file grows sparsely).
pub const OXCOW_PREALLOC_METADATA: u32 = 1u32;

/// Extent flag: the range's contents are determined by this image (data, compressed data or a
/// zero cluster), not by the backing chain. Without OXCOW_EXTENT_ZERO the range holds data.
pub const OXCOW_EXTENT_ALLOCATED: u32 = 1u32;
/// Extent flag: the range is known to read as zeros.
pub const OXCOW_EXTENT_ZERO: u32 = 2u32;
/// Extent flag: the range reads from the backing chain.
pub const OXCOW_EXTENT_BACKING: u32 = 4u32;
/// Extent flag: the range is stored compressed.
pub const OXCOW_EXTENT_COMPRESSED: u32 = 8u32;
/// Extent flag (oxcow_bitmap_status()): the range is dirty in the bitmap.
pub const OXCOW_EXTENT_DIRTY: u32 = 16u32;

/// oxcow_info flag: extended L2 entries (subclusters) are in use.
pub const OXCOW_INFO_EXTENDED_L2: u32 = 1u32;
/// oxcow_info flag: the lazy-refcounts compatible bit is set.
pub const OXCOW_INFO_LAZY_REFCOUNTS: u32 = 2u32;
/// oxcow_info flag: the dirty bit is set (refcounts may be stale).
pub const OXCOW_INFO_DIRTY: u32 = 4u32;
/// oxcow_info flag: the corrupt bit is set.
pub const OXCOW_INFO_CORRUPT: u32 = 8u32;
/// oxcow_info flag: the handle is read-only.
pub const OXCOW_INFO_READ_ONLY: u32 = 16u32;
/// oxcow_info flag: the image names a backing file (see oxcow_info.backing_file).
pub const OXCOW_INFO_HAS_BACKING: u32 = 32u32;

/// oxcow_check() flag: repair leaked clusters.
pub const OXCOW_CHECK_FIX_LEAKS: u32 = 1u32;
/// oxcow_check() flag: repair corruptions.
pub const OXCOW_CHECK_FIX_ERRORS: u32 = 2u32;

/// Size of oxcow_info.backing_file, including the terminating NUL.
pub const OXCOW_INFO_BACKING_FILE_LEN: usize = 1024;
/// Size of oxcow_info.backing_format, including the terminating NUL.
pub const OXCOW_INFO_BACKING_FORMAT_LEN: usize = 32;

/// Parameters of oxcow_create(). Initialise with oxcow_create_options_init(), then change the
/// fields you need. Zero in a numeric field means "the default".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_create_options {
    /// sizeof(oxcow_create_options) as the caller knows it; set by the _init function.
    pub struct_size: u32,
    /// Cluster size in bytes, a power of two from 512 to 2097152; 0 means 65536.
    pub cluster_size: u32,
    /// qcow2 version, 2 or 3; 0 means 3.
    pub version: u32,
    /// Refcount width in bits, a power of two up to 64 (version 2: only 16); 0 means 16.
    pub refcount_bits: u32,
    /// OXCOW_CREATE_* flags.
    pub flags: u32,
    /// OXCOW_COMPRESSION_* value.
    pub compression_type: u32,
    /// OXCOW_PREALLOC_* value (must be OXCOW_PREALLOC_OFF with a backing file).
    pub preallocation: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Backing file name stored in the header, or NULL for none. Relative names resolve
    /// against the directory of the new image. Must be valid UTF-8.
    pub backing_file: *const c_char,
    /// Format of the backing file, "qcow2" or "raw"; required with backing_file, NULL without.
    pub backing_format: *const c_char,
    /// Version 2: external data file for the guest data (qemu-img's `-o data_file=`), or
    /// NULL for none. Created or truncated to the virtual size; the name is stored as given
    /// and a relative one resolves against the current directory (as QEMU does). Version 3
    /// images only. Must be valid UTF-8.
    pub data_file: *const c_char,
}

/// Parameters of oxcow_open(). Initialise with oxcow_open_options_init().
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_open_options {
    /// sizeof(oxcow_open_options) as the caller knows it; set by the _init function.
    pub struct_size: u32,
    /// Which metadata the overlap guard protects from writes: OXCOW_OVERLAP_* (0, the
    /// default, means OXCOW_OVERLAP_ALL).
    pub overlap_check: u32,
    /// L2 cache size in bytes; 0 means the default: enough to map the whole image, at most
    /// 32 MiB (QEMU's rule). At least two slices are cached whatever is asked.
    pub cache_size: u64,
    /// Version 2: NULL for the active state, or a NUL-terminated snapshot id or name to open
    /// a read-only view of that internal snapshot's disk (like `qemu-img convert -l`); the
    /// open must then be read-only (-EINVAL with OXCOW_OPEN_RDWR), -ENOENT when no snapshot
    /// matches. Read during oxcow_open() only.
    pub snapshot: *const c_char,
    /// Version 3: refcount cache size in bytes; 0 means the default (four clusters).
    pub refcount_cache_size: u64,
    /// Version 3: size in bytes of one cached slice of an L2 table or refcount block (like
    /// qemu's l2-cache-entry-size); 0 means the default, 4 KiB (the cluster size when
    /// smaller). Otherwise a power of two from 512 up to the cluster size (-EINVAL at open).
    pub l2_slice_size: u64,
    /// Version 4: seconds after which cache entries nobody used are dropped, so an idle
    /// handle gives its cache memory back (qemu's cache-clean-interval; checked at cache
    /// misses, flushes and every few hundred requests, no timer thread); 0 means the default
    /// (600), OXCOW_CACHE_CLEAN_NEVER keeps entries until evicted.
    pub cache_clean_interval: u64,
}

/// oxcow_open_options.cache_clean_interval: never drop idle cache entries.
pub const OXCOW_CACHE_CLEAN_NEVER: u64 = u64::MAX;

/// Overlap-check mode: the default (OXCOW_OVERLAP_ALL).
pub const OXCOW_OVERLAP_DEFAULT: u32 = 0u32;
/// Overlap-check mode: no checks.
pub const OXCOW_OVERLAP_NONE: u32 = 1u32;
/// Overlap-check mode: header, active L1, refcount table, snapshot table, bitmap directory.
pub const OXCOW_OVERLAP_CONSTANT: u32 = 2u32;
/// Overlap-check mode: constant plus active L2 tables, refcount blocks, snapshot L1 tables and
/// bitmap tables.
pub const OXCOW_OVERLAP_CACHED: u32 = 3u32;
/// Overlap-check mode: every structure, snapshot L2 tables included.
pub const OXCOW_OVERLAP_ALL: u32 = 4u32;

/// oxcow_event flag: the image was marked corrupt and the handle fenced (every later request
/// fails with -ENOMEDIUM). Without it the event is the single report of a read-only image.
pub const OXCOW_EVENT_FATAL: u32 = 1u32;
/// oxcow_event flag: `host_offset` and `size` are meaningful.
pub const OXCOW_EVENT_HAS_LOCATION: u32 = 2u32;

/// A corruption event, passed to the callback set with oxcow_set_event_callback(). Valid only
/// during the callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_event {
    /// sizeof(oxcow_event) as this library knows it.
    pub struct_size: u32,
    /// OXCOW_EVENT_* flags.
    pub flags: u32,
    /// Host offset of the prevented write or inconsistent entry (see OXCOW_EVENT_HAS_LOCATION).
    pub host_offset: u64,
    /// Size in bytes of the prevented write (see OXCOW_EVENT_HAS_LOCATION).
    pub size: u64,
    /// NUL-terminated description naming the structure, e.g. "Preventing invalid write on
    /// metadata (overlaps with active L2 table) ...".
    pub message: *const std::ffi::c_char,
}

/// Receives corruption events: `opaque` as given to oxcow_set_event_callback(), and the event.
/// Called on the thread whose request found the problem, with no oxcow lock held (the
/// callback may call oxcow functions on the image, except oxcow_close()).
pub type oxcow_event_fn =
    Option<unsafe extern "C" fn(opaque: *mut std::ffi::c_void, event: *const oxcow_event)>;

/// Static facts about an open image, filled by oxcow_get_info(). Initialise with
/// oxcow_info_init() before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_info {
    /// sizeof(oxcow_info) as the caller knows it; on success, the number of bytes filled.
    pub struct_size: u32,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Refcount entry width in bits.
    pub refcount_bits: u32,
    /// OXCOW_COMPRESSION_* value from the header.
    pub compression_type: u32,
    /// OXCOW_INFO_* flags.
    pub flags: u32,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// Always 0.
    pub reserved: u32,
    /// Backing file name as stored in the header, NUL-terminated; empty without one.
    pub backing_file: [c_char; OXCOW_INFO_BACKING_FILE_LEN],
    /// Backing format as stored in the header extension, NUL-terminated; empty if absent.
    pub backing_format: [c_char; OXCOW_INFO_BACKING_FORMAT_LEN],
}

/// Allocation status of a guest range, filled by oxcow_block_status().
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct oxcow_extent {
    /// Guest offset where the extent starts (the requested offset).
    pub offset: u64,
    /// Length in bytes over which the status holds: at least 1, at most the requested count.
    pub length: u64,
    /// Host offset of the data in the image file when the range holds uncompressed data of
    /// this image (OXCOW_EXTENT_ALLOCATED without ZERO or COMPRESSED); 0 otherwise.
    pub host_offset: u64,
    /// OXCOW_EXTENT_* flags.
    pub flags: u32,
    /// Always 0.
    pub reserved: u32,
}

/// Result of oxcow_check(). Initialise with oxcow_check_result_init() before the call.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct oxcow_check_result {
    /// sizeof(oxcow_check_result) as the caller knows it; on success, the bytes filled.
    pub struct_size: u32,
    /// Always 0.
    pub reserved: u32,
    /// Corruptions found (and not fixed).
    pub corruptions: u64,
    /// Leaked clusters found (and not fixed).
    pub leaks: u64,
    /// Errors that prevented checking part of the image.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaked clusters repaired.
    pub leaks_fixed: u64,
    /// Guest clusters in the image.
    pub total_clusters: u64,
    /// Guest clusters allocated in this image.
    pub allocated_clusters: u64,
    /// Allocated guest clusters not contiguous with their predecessor on the host.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// Offset of the end of the last used host cluster.
    pub image_end_offset: u64,
}

/// Version 1 of oxcow_create_options ends before `data_file`.
pub(crate) const CREATE_OPTIONS_V1_SIZE: u32 =
    std::mem::offset_of!(oxcow_create_options, data_file) as u32;
pub(crate) const CREATE_OPTIONS_V2_SIZE: u32 = size_of::<oxcow_create_options>() as u32;
/// Version 1 of oxcow_open_options ends before `snapshot`.
pub(crate) const OPEN_OPTIONS_V1_SIZE: u32 =
    std::mem::offset_of!(oxcow_open_options, snapshot) as u32;
/// Version 2 of oxcow_open_options ends before `refcount_cache_size`.
pub(crate) const OPEN_OPTIONS_V2_SIZE: u32 =
    std::mem::offset_of!(oxcow_open_options, refcount_cache_size) as u32;
/// Version 3 of oxcow_open_options ends before `cache_clean_interval`.
pub(crate) const OPEN_OPTIONS_V3_SIZE: u32 =
    std::mem::offset_of!(oxcow_open_options, cache_clean_interval) as u32;
pub(crate) const OPEN_OPTIONS_V4_SIZE: u32 = size_of::<oxcow_open_options>() as u32;
pub(crate) const INFO_V1_SIZE: u32 = size_of::<oxcow_info>() as u32;
pub(crate) const CHECK_RESULT_V1_SIZE: u32 = size_of::<oxcow_check_result>() as u32;

impl oxcow_create_options {
    /// The defaults oxcow_create_options_init() writes.
    pub(crate) fn defaults() -> oxcow_create_options {
        oxcow_create_options {
            struct_size: CREATE_OPTIONS_V2_SIZE,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            flags: 0,
            compression_type: OXCOW_COMPRESSION_DEFLATE,
            preallocation: OXCOW_PREALLOC_OFF,
            reserved: 0,
            backing_file: std::ptr::null(),
            backing_format: std::ptr::null(),
            data_file: std::ptr::null(),
        }
    }
}

impl oxcow_open_options {
    /// The defaults oxcow_open_options_init() writes.
    pub(crate) fn defaults() -> oxcow_open_options {
        oxcow_open_options {
            struct_size: OPEN_OPTIONS_V4_SIZE,
            overlap_check: OXCOW_OVERLAP_DEFAULT,
            cache_size: 0,
            snapshot: std::ptr::null(),
            refcount_cache_size: 0,
            l2_slice_size: 0,
            cache_clean_interval: 0,
        }
    }
}

impl oxcow_info {
    /// An all-zero info with `struct_size` set, as oxcow_info_init() writes it.
    pub(crate) fn empty() -> oxcow_info {
        oxcow_info {
            struct_size: INFO_V1_SIZE,
            cluster_size: 0,
            virtual_size: 0,
            file_size: 0,
            version: 0,
            refcount_bits: 0,
            compression_type: 0,
            flags: 0,
            snapshot_count: 0,
            reserved: 0,
            backing_file: [0; OXCOW_INFO_BACKING_FILE_LEN],
            backing_format: [0; OXCOW_INFO_BACKING_FORMAT_LEN],
        }
    }
}

impl oxcow_check_result {
    /// An all-zero result with `struct_size` set, as oxcow_check_result_init() writes it.
    pub(crate) fn empty() -> oxcow_check_result {
        oxcow_check_result {
            struct_size: CHECK_RESULT_V1_SIZE,
            ..oxcow_check_result::default()
        }
    }
}

/// Fills `*opts` with the defaults (64 KiB clusters, version 3, 16-bit refcounts, no flags,
/// deflate, no preallocation, no backing file) and sets `struct_size`. NULL is a no-op.
///
/// # Safety
/// `opts` is NULL or points to writable memory for one `oxcow_create_options`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_create_options_init(opts: *mut oxcow_create_options) {
    // SAFETY: the caller guarantees `opts` is NULL or valid for writing one struct; write()
    // does not read the (possibly uninitialised) old contents.
    unsafe { super::init_struct(opts, oxcow_create_options::defaults()) }
}

/// Fills `*opts` with the defaults (cache_size 0 = library default) and sets `struct_size`.
/// NULL is a no-op.
///
/// # Safety
/// `opts` is NULL or points to writable memory for one `oxcow_open_options`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_open_options_init(opts: *mut oxcow_open_options) {
    // SAFETY: the caller guarantees `opts` is NULL or valid for writing one struct.
    unsafe { super::init_struct(opts, oxcow_open_options::defaults()) }
}

/// Zeroes `*info` and sets `struct_size`. NULL is a no-op.
///
/// # Safety
/// `info` is NULL or points to writable memory for one `oxcow_info`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_info_init(info: *mut oxcow_info) {
    // SAFETY: the caller guarantees `info` is NULL or valid for writing one struct.
    unsafe { super::init_struct(info, oxcow_info::empty()) }
}

/// Zeroes `*r` and sets `struct_size`. NULL is a no-op.
///
/// # Safety
/// `r` is NULL or points to writable memory for one `oxcow_check_result`.
#[no_mangle]
pub unsafe extern "C" fn oxcow_check_result_init(r: *mut oxcow_check_result) {
    // SAFETY: the caller guarantees `r` is NULL or valid for writing one struct.
    unsafe { super::init_struct(r, oxcow_check_result::empty()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    /// These sizes and offsets are ABI (ctests/header_twice.c pins the same values from C).
    #[test]
    fn struct_layout_is_stable() {
        assert_eq!(size_of::<oxcow_create_options>(), 56);
        assert_eq!(CREATE_OPTIONS_V1_SIZE, 48);
        assert_eq!(offset_of!(oxcow_create_options, backing_file), 32);
        assert_eq!(size_of::<oxcow_open_options>(), 48);
        assert_eq!(OPEN_OPTIONS_V1_SIZE, 16);
        assert_eq!(OPEN_OPTIONS_V2_SIZE, 24);
        assert_eq!(OPEN_OPTIONS_V3_SIZE, 40);
        assert_eq!(size_of::<oxcow_snapshot_info>(), 432);
        assert_eq!(offset_of!(oxcow_snapshot_info, date_sec), 384);
        assert_eq!(size_of::<oxcow_info>(), 48 + 1024 + 32);
        assert_eq!(offset_of!(oxcow_info, backing_file), 48);
        assert_eq!(size_of::<oxcow_extent>(), 32);
        assert_eq!(size_of::<oxcow_check_result>(), 88);
    }
}

/// Bytes of oxcow_snapshot_info.id: QEMU's id buffer (ids longer than 127 bytes are cut).
pub const OXCOW_SNAPSHOT_ID_LEN: usize = 128;
/// Bytes of oxcow_snapshot_info.name: QEMU's name buffer (names longer than 255 bytes are
/// cut, as `qemu-img snapshot -l` cuts them).
pub const OXCOW_SNAPSHOT_NAME_LEN: usize = 256;
/// oxcow_snapshot_info flag: `disk_size` was recorded (every version-3 entry has it).
pub const OXCOW_SNAPSHOT_HAS_DISK_SIZE: u32 = 1u32;
/// oxcow_snapshot_info flag: `icount` was recorded.
pub const OXCOW_SNAPSHOT_HAS_ICOUNT: u32 = 2u32;

/// One internal snapshot, filled by oxcow_snapshot_list() into a caller-provided array
/// (fixed-size strings, so the caller owns all memory: nothing to free).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct oxcow_snapshot_info {
    /// Unique id, NUL-terminated (e.g. "1").
    pub id: [c_char; OXCOW_SNAPSHOT_ID_LEN],
    /// Name (tag), NUL-terminated; names need not be unique.
    pub name: [c_char; OXCOW_SNAPSHOT_NAME_LEN],
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state in bytes (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Virtual disk size at creation (see OXCOW_SNAPSHOT_HAS_DISK_SIZE).
    pub disk_size: u64,
    /// Instruction counter at creation (see OXCOW_SNAPSHOT_HAS_ICOUNT).
    pub icount: u64,
    /// OXCOW_SNAPSHOT_* flags.
    pub flags: u32,
    /// Always 0.
    pub reserved: u32,
}
