//! oxcow: a qcow2 disk-image engine with a stable C ABI.
//!
//! The Rust API is [`Image`] (open, read, write, zero, discard, flush, info, block status) and
//! [`create`]. The C ABI in `capi` wraps exactly this API; see `include/oxcow.h`.
//!
//! Threads: an [`Image`] is `Send + Sync`; every method may be called from any number of threads
//! at once, except that closing (dropping) races nothing by construction in Rust.
//!
//! Durability: like a disk with a volatile write cache. Data and metadata written before a
//! successful [`Image::flush`] survive a crash; later writes may or may not. A crash never
//! leaves worse than leaked clusters.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod capi;
mod engine;
pub mod error;
pub mod format;
mod options;
pub mod storage;

pub use engine::aio::{AioBackend, AioBuf, AioCompletion, AioOp, AioOptions, AioPlug, AioQueue};
pub use engine::amend::{amend, AmendOptions};
pub use engine::bitmap::{
    BitmapAddOptions, BitmapInfo, BITMAP_AUTO, BITMAP_ENABLED, BITMAP_INCONSISTENT,
};
pub use engine::check::{CheckFix, CheckReport};
pub use engine::commit::CommitOptions;
pub use engine::create::create;
pub use engine::events::{CorruptionEvent, EventHandler};
pub use engine::rebase::is_known_backing_format;
pub use engine::CompressedCluster;
pub use engine::Image;
pub use error::{Error, ErrorKind, Result};
pub use options::{
    BackingFormat, CompressionType, CreateOptions, Extent, ImageInfo, OpenOptions, Preallocation,
    ZeroFlags, EXTENT_ALLOCATED, EXTENT_BACKING, EXTENT_COMPRESSED, EXTENT_DIRTY, EXTENT_ZERO,
};
pub use storage::OverlapCheck;
