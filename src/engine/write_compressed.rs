//! Compressed cluster writes (`convert -c`, backup tools): one whole guest cluster is
//! compressed and stored packed with other compressed clusters in shared host clusters.
//!
//! Packing: the metadata keeps a byte cursor (`Meta::compressed_tail`) inside the host cluster
//! that received the last compressed cluster. The next one starts there, byte-aligned like
//! QEMU's; when it does not fit in the rest of that cluster it continues into the next host
//! cluster if the allocator hands out exactly that one, otherwise it starts a fresh cluster.
//! Every host cluster a compressed cluster touches holds one reference for it (QEMU's layout),
//! so the data of consecutive compressed writes is contiguous on the host, without holes.

use super::Image;
use crate::error::{invalid, Result};
use crate::format::entry::Mapping;
use crate::format::{GuestOffset, HostOffset};
use crate::storage::{Pinned, WriteKind};
use std::borrow::Cow;

/// One guest cluster made ready for [`Image::write_compressed_cluster`] by
/// [`Image::compress_cluster`]: compressed, or kept as is when it does not compress. Preparing
/// takes no lock, so callers compress on many threads and write in any order they choose
/// (guest order packs best).
#[derive(Debug, Clone)]
pub struct CompressedCluster {
    /// Guest offset (cluster-aligned, checked when prepared).
    offset: u64,
    /// Guest bytes covered: one cluster, or less for the short last cluster of the disk.
    len: u64,
    /// The caller's bytes when they do not compress (written as a normal cluster).
    raw: Option<Vec<u8>>,
    /// The compressed stream, when it is smaller than the cluster.
    compressed: Vec<u8>,
    /// Cluster size and codec it was prepared for: another image refuses it.
    cluster_size: u64,
    kind: crate::options::CompressionType,
}

impl CompressedCluster {
    /// The guest offset the cluster will be written at.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Whether the data compressed (otherwise it is stored as a normal cluster).
    pub fn is_compressed(&self) -> bool {
        self.raw.is_none()
    }

    /// Bytes the cluster takes on the host: the compressed size, or the raw size when it did
    /// not compress.
    pub fn stored_len(&self) -> usize {
        self.raw.as_ref().map_or(self.compressed.len(), Vec::len)
    }
}

impl Image {
    /// Writes one whole guest cluster compressed. `offset` must be cluster-aligned and `buf`
    /// exactly one cluster long, except for the last cluster of a disk whose size is not a
    /// multiple of the cluster size, where `buf` covers the rest of the disk. Data that does
    /// not compress is written uncompressed, like QEMU does. Replaces whatever the cluster
    /// held; the old clusters are released once the change is durable. Compression runs
    /// before any lock is taken, so concurrent callers compress in parallel.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let c = self.compress_cluster(buf, offset)?;
        self.write_compressed_cluster(&c)
    }

    /// The first half of [`Image::write_compressed`]: checks `buf` and `offset` as it does and
    /// compresses with the image's codec. Pure: takes no lock and changes nothing, so it can
    /// run on any number of threads while others write.
    pub fn compress_cluster(&self, buf: &[u8], offset: u64) -> Result<CompressedCluster> {
        let at = self.check_range(offset, buf.len() as u64)?;
        let cluster = self.whole_cluster(buf, at)?;
        let compressed = super::compress::compress(self.compression, &cluster)?;
        Ok(CompressedCluster {
            offset,
            len: buf.len() as u64,
            raw: compressed.is_none().then(|| buf.to_vec()),
            compressed: compressed.unwrap_or_default(),
            cluster_size: self.geo.cluster_size(),
            kind: self.compression,
        })
    }

    /// The second half of [`Image::write_compressed`]: stores a cluster prepared by
    /// [`Image::compress_cluster`] (of an image with the same cluster size and compression
    /// type), packed after the previous compressed cluster. Writing clusters in guest order
    /// gives the same file, byte for byte, whatever thread prepared them.
    pub fn write_compressed_cluster(&self, c: &CompressedCluster) -> Result<()> {
        let r = {
            // Counted before entering the gate, as the other write requests are.
            self.count_request();
            let writer = self.enter_write_gate();
            self.write_prepared_gated(&writer.pinned(), c)
        };
        self.finish(r)
    }

    fn write_prepared_gated(&self, pinned: &Pinned<'_>, c: &CompressedCluster) -> Result<()> {
        self.check_open_for_writes()?;
        self.refuse_with_data_file("a compressed write")?;
        if c.cluster_size != self.geo.cluster_size() || c.kind != self.compression {
            return invalid!(
                "compressed cluster prepared for {}-byte clusters ({:?}), image has {}-byte clusters ({:?})",
                c.cluster_size,
                c.kind,
                self.geo.cluster_size(),
                self.compression
            );
        }
        let len = c.len;
        // Revalidated: the image may have shrunk since the cluster was prepared.
        let offset = self.check_range(c.offset, len)?;
        self.bitmaps.mark(offset.get(), len);
        if let Some(raw) = &c.raw {
            // Not compressible: store as a normal cluster (the gate is already held).
            super::write::write(self, pinned, raw, offset)?;
            return self.after_write();
        }
        let data = &c.compressed;
        let gidx = offset.cluster(&self.geo);
        let host = self.reserve_compressed(offset, data.len() as u64)?;
        // I/O without the lock.
        let io = self.file.write(data, host, WriteKind::Data);
        let result = self.link_compressed(io, offset, host, data.len() as u64);
        self.inflight.release(gidx);
        result?;
        self.after_write()
    }

    /// The cluster to compress: `buf` itself, or the short last cluster of the disk padded
    /// with zeros. Anything else is refused.
    fn whole_cluster<'a>(&self, buf: &'a [u8], offset: GuestOffset) -> Result<Cow<'a, [u8]>> {
        let cs = self.geo.cluster_size();
        if !offset.is_cluster_aligned(&self.geo) {
            return invalid!("compressed write at {offset:#x} is not cluster-aligned");
        }
        let len = buf.len() as u64;
        let tail = (offset + len).get() == self.virtual_size() && len < cs;
        if buf.is_empty() || !(len == cs || tail) {
            return invalid!(
                "compressed writes take exactly one cluster ({cs} bytes), not {len} bytes at {offset:#x}"
            );
        }
        if len == cs {
            return Ok(Cow::Borrowed(buf));
        }
        let mut padded = vec![0u8; cs as usize];
        padded[..buf.len()].copy_from_slice(buf);
        Ok(Cow::Owned(padded))
    }

    /// Claims the guest cluster at `offset` (waiting for another writer of it) and reserves
    /// `len` host bytes for its compressed data. The L2 table is made writable first, as
    /// QEMU does: a table allocated between two compressed clusters would cut the packed
    /// stream and leave the rest of the packing cluster as a hole.
    fn reserve_compressed(&self, offset: GuestOffset, len: u64) -> Result<HostOffset> {
        let gidx = offset.cluster(&self.geo);
        let mut m = self.lock_meta();
        while self.inflight.is_claimed(gidx) {
            drop(m);
            self.wait_claim_released(gidx);
            m = self.lock_meta();
        }
        if let Err(e) = m.l2_for_write(&self.file, offset.l1_index(&self.geo)) {
            return Err(self.on_error(e));
        }
        let host = match m.alloc_compressed_bytes(&self.file, len) {
            Ok(h) => h,
            Err(e) => return Err(self.on_error(e)),
        };
        if let Err(e) = self.file.guard().check_write(host.get(), len, None) {
            m.give_back_compressed_bytes(&self.file, host, len);
            return Err(self.on_error(e));
        }
        let _ = self.inflight.try_claim(gidx);
        Ok(host)
    }

    /// Points the L2 entry at the compressed data once `io` succeeded; otherwise (or when
    /// linking fails) gives the reserved bytes back unless an entry already uses them.
    fn link_compressed(
        &self,
        io: Result<()>,
        offset: GuestOffset,
        host: HostOffset,
        csize: u64,
    ) -> Result<()> {
        let geo = self.geo;
        let mut m = self.lock_meta();
        let linked = io.and_then(|()| {
            let old = m.lookup(&self.file, offset)?;
            let table = m.l2_for_write(&self.file, offset.l1_index(&geo))?;
            let new = Mapping::Compressed { host, csize };
            m.set_mapping(&self.file, table, offset.l2_index(&geo), new)?;
            m.release(old);
            Ok(())
        });
        let Err(e) = linked else {
            return Ok(());
        };
        let current = m.lookup(&self.file, offset).ok();
        if !matches!(current, Some(Mapping::Compressed { host: h, .. }) if h == host) {
            m.give_back_compressed_bytes(&self.file, host, csize);
        }
        Err(self.on_error(e))
    }
}
