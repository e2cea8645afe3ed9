//! The on-disk layout of qcow2: bytes to typed structures and back, with validation.
//!
//! Nothing in here does I/O or takes locks; the engine reads bytes and hands them over.

pub mod be;
pub mod bitmap;
pub mod entry;
pub mod geometry;
pub mod header;
pub mod measure;
pub mod offset;
pub mod refcount;
pub mod snapshot;
pub mod structure;

pub use geometry::Geometry;
pub use header::Header;
pub use offset::{GuestCluster, GuestOffset, HostCluster, HostOffset};
pub use structure::MetaKind;
