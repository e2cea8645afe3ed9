//! Options for creating and opening images, and the descriptive types the API returns.

/// Compression algorithm recorded in the image header (qcow2 `compression_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CompressionType {
    /// Raw deflate, called "zlib" by QEMU (header value 0).
    #[default]
    Deflate,
    /// Zstandard (header value 1, sets incompatible bit 3).
    Zstd,
}

/// How much of the image `create` allocates up front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// Only the header, refcount structures and L1 table.
    #[default]
    Off,
    /// Also every L2 table and every data cluster (the file is extended sparsely).
    Metadata,
}

/// Format of a backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingFormat {
    /// A qcow2 image (which may have its own backing file).
    Qcow2,
    /// A raw image.
    Raw,
}

impl BackingFormat {
    /// The name used in the backing-format header extension ("qcow2" or "raw").
    pub fn name(self) -> &'static str {
        match self {
            BackingFormat::Qcow2 => "qcow2",
            BackingFormat::Raw => "raw",
        }
    }

    /// Parses a backing-format name; `None` for formats oxcow cannot read.
    pub fn from_name(name: &str) -> Option<BackingFormat> {
        match name {
            "qcow2" => Some(BackingFormat::Qcow2),
            "raw" | "file" => Some(BackingFormat::Raw),
            _ => None,
        }
    }
}

/// Parameters of [`crate::create`]. `Default` gives what `qemu-img create -f qcow2` gives.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Cluster size in bytes: a power of two from 512 to 2 MiB. Default 64 KiB.
    pub cluster_size: u32,
    /// qcow2 version: 2 (compat 0.10) or 3 (compat 1.1). Default 3.
    pub version: u32,
    /// Refcount entry width in bits: 1, 2, 4, 8, 16, 32 or 64 (v2 only allows 16). Default 16.
    pub refcount_bits: u32,
    /// Set the lazy-refcounts compatible bit (v3 only).
    pub lazy_refcounts: bool,
    /// Use extended L2 entries with 32 subclusters (v3 only, cluster size >= 16 KiB).
    pub extended_l2: bool,
    /// Compression type recorded in the header (zstd needs v3).
    pub compression: CompressionType,
    /// Backing file name stored in the header, as given (relative names resolve against the
    /// directory of the new image).
    pub backing_file: Option<String>,
    /// Format of the backing file; required when `backing_file` is set, like qemu-img's `-F`.
    pub backing_format: Option<BackingFormat>,
    /// Preallocation mode.
    pub preallocation: Preallocation,
    /// External data file for the guest data (`-o data_file=`, version 3 only), created or
    /// truncated to the virtual size like qemu-img does. A relative name is stored as given
    /// and resolved against the current directory, as QEMU resolves it.
    pub data_file: Option<String>,
    /// Declare the data file a valid raw image of the disk (`-o data_file_raw=on`): every
    /// cluster is mapped 1:1 at creation (metadata preallocation), no backing file allowed.
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression: CompressionType::Deflate,
            backing_file: None,
            backing_format: None,
            preallocation: Preallocation::Off,
            data_file: None,
            data_file_raw: false,
        }
    }
}

/// Parameters of [`crate::Image::open`]. `Default` is a read-only open with the backing chain.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Open read-write. Without it the open never writes a byte to any file.
    pub writable: bool,
    /// Do not open the backing file: unallocated clusters read as zeros.
    pub no_backing: bool,
    /// Refuse to open a backing chain in which any image does not record its backing file's
    /// format (it would have to be guessed from the backing file's contents, which a guest
    /// may control). Callers handling untrusted images should set it.
    pub no_probe: bool,
    /// Read-only open that ignores other writers' locks (like `qemu-img -U`).
    pub force_share: bool,
    /// Metadata-only open of an image with an external data file (read-only opens only,
    /// `InvalidArgument` otherwise): the data file is neither opened nor locked, so an image
    /// whose data file is missing still reports its header, snapshots and bitmaps, as
    /// `qemu-img info` does. Reading guest data that lives in the data file fails with
    /// `Io` (-EIO); unallocated and zero clusters still read as zeros. No effect on images
    /// without a data file.
    pub no_data_file: bool,
    /// Open the image file with O_DIRECT (bypass the host page cache). Requests of any
    /// alignment are accepted: transfers are bounced through 4 KiB-aligned buffers and
    /// unaligned writes become read-modify-write of whole 4 KiB blocks, so aligned 4 KiB
    /// requests are the fast path. The file may grow to a 4 KiB multiple. Backing files stay
    /// buffered. Fails with `Unsupported` (-ENOTSUP) where the file system refuses O_DIRECT.
    pub direct: bool,
    /// Make every write durable before it returns (flush after each write).
    pub writethrough: bool,
    /// Read-only open that will never be reopened read-write: [`crate::Image::reopen`] to
    /// read-write fails with `ReadOnly` (-EROFS).
    pub keep_read_only: bool,
    /// Which metadata structures the overlap guard protects from writes (default: all).
    pub overlap_check: crate::storage::OverlapCheck,
    /// QEMU's `discard=unmap` (read-write opens): when a guest discard or an unmapping
    /// write_zeroes frees clusters, their host ranges are punched
    /// (`fallocate(PUNCH_HOLE|KEEP_SIZE)`) once the free is durable and no request can still
    /// touch them, so the host file's allocated blocks shrink. Without it nothing is punched:
    /// freed clusters keep their blocks until reused. Ignored where the file system cannot
    /// punch holes.
    pub discard_unmap: bool,
    /// L2 cache size in bytes; 0 means the default: enough to map the whole image, at most
    /// 32 MiB (QEMU's rule). At least two slices are cached whatever is asked.
    pub l2_cache_size: u64,
    /// Refcount cache size in bytes; 0 means the default (four clusters, QEMU's rule).
    pub refcount_cache_size: u64,
    /// Size of one cached slice of an L2 table or refcount block in bytes (QEMU's
    /// l2-cache-entry-size); 0 means the default, 4 KiB (or the cluster size when smaller).
    /// Must be a power of two from 512 up to the cluster size (`InvalidArgument` otherwise).
    pub l2_slice_size: u64,
    /// Cache entries unused for this long are dropped at the next cache miss or flush, so
    /// an idle handle gives its cache memory back (QEMU's cache-clean-interval). None means
    /// the default (600 s); a zero duration keeps entries until evicted.
    pub cache_clean_interval: Option<std::time::Duration>,
    /// Open a read-only view of this internal snapshot's disk (an id, else a name) instead
    /// of the active state, like `qemu-img convert -l`. Requires a read-only open
    /// (`InvalidArgument` otherwise); `NotFound` when no snapshot matches.
    pub snapshot: Option<String>,
}

/// Flags of [`crate::Image::write_zeroes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The engine may deallocate the clusters instead of keeping them allocated.
    pub may_unmap: bool,
}

/// Static facts about an open image, as `qemu-img info` would report them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u32,
    /// qcow2 version (2 or 3).
    pub version: u32,
    /// Refcount entry width in bits.
    pub refcount_bits: u32,
    /// Extended L2 entries (subclusters) in use.
    pub extended_l2: bool,
    /// Compression type in the header.
    pub compression: CompressionType,
    /// Lazy refcounts compatible bit.
    pub lazy_refcounts: bool,
    /// Dirty bit (refcounts may be stale).
    pub dirty: bool,
    /// Corrupt bit.
    pub corrupt: bool,
    /// The handle is read-only.
    pub read_only: bool,
    /// Number of internal snapshots.
    pub snapshot_count: u32,
    /// Backing file name as stored in the header.
    pub backing_file: Option<String>,
    /// Backing format as stored in the header extension.
    pub backing_format: Option<String>,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// The external data file's name as recorded in the header (`None`: data in the image).
    pub data_file: Option<String>,
    /// Whether the data file is declared a valid raw image of the disk (autoclear bit 1).
    pub data_file_raw: bool,
}

/// Allocation status of a guest range, returned by [`crate::Image::block_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset where the extent starts (the requested offset).
    pub offset: u64,
    /// Length in bytes over which the status below holds (>= 1, <= the requested count).
    pub length: u64,
    /// `EXTENT_*` flags.
    pub flags: u32,
    /// Host offset of the data in this image's file when the range holds uncompressed data
    /// (`EXTENT_ALLOCATED` without `EXTENT_ZERO` or `EXTENT_COMPRESSED`); 0 otherwise.
    pub host_offset: u64,
}

/// The range's contents are determined by this image (data, compressed data or a zero
/// cluster), not by the backing chain. Without `EXTENT_ZERO` the range holds data.
pub const EXTENT_ALLOCATED: u32 = 1;
/// The range is known to read as zeros.
pub const EXTENT_ZERO: u32 = 2;
/// The range reads from the backing chain.
pub const EXTENT_BACKING: u32 = 4;
/// The range is stored compressed.
pub const EXTENT_COMPRESSED: u32 = 8;
/// [`crate::Image::bitmap_status`]: the range is dirty in the bitmap.
pub const EXTENT_DIRTY: u32 = 16;
