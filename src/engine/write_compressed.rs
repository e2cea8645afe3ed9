//! Compressed cluster writes (`convert -c`, backup tools): one whole guest cluster is
//! compressed and stored packed with other compressed clusters in shared host clusters.
//!
//! Packing: the metadata keeps a byte cursor (`Meta::compressed_tail`) inside the host cluster
//! that received the last compressed cluster. The next one goes there if it fits (the host
//! cluster gains one reference per compressed cluster that touches it, as in QEMU's layout),
//! otherwise into a freshly allocated cluster. Compressed data never spans two host clusters,
//! so each compressed cluster holds exactly one reference on exactly one host cluster.

use super::Image;
use crate::error::{invalid, Result};
use crate::format::entry::Mapping;
use crate::format::{GuestCluster, GuestOffset, HostOffset};
use crate::storage::WriteKind;
use std::borrow::Cow;

impl Image {
    /// Writes one whole guest cluster compressed. `offset` must be cluster-aligned and `buf`
    /// exactly one cluster long, except for the last cluster of a disk whose size is not a
    /// multiple of the cluster size, where `buf` covers the rest of the disk. Data that does
    /// not compress is written uncompressed, like QEMU does. Replaces whatever the cluster
    /// held; the old clusters are released once the change is durable.
    pub fn write_compressed(&self, buf: &[u8], offset: u64) -> Result<()> {
        let r = {
            let _pin = self.file.grace().pin();
            let _gate = self.enter_write_gate();
            self.write_compressed_gated(buf, offset)
        };
        self.finish(r)
    }

    fn write_compressed_gated(&self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.refuse_with_data_file("a compressed write")?;
        let offset = self.check_range(offset, buf.len() as u64)?;
        let cluster = self.whole_cluster(buf, offset)?;
        self.bitmaps.mark(offset.get(), buf.len() as u64);
        let Some(data) = super::compress::compress(self.compression, &cluster)? else {
            // Not compressible: store as a normal cluster (the gate is already held).
            super::write::write(self, buf, offset)?;
            return self.after_write();
        };
        let gidx = offset.cluster(&self.geo);
        let host = self.reserve_compressed(gidx, data.len() as u64)?;
        // I/O without the lock.
        let io = self.file.write(&data, host, WriteKind::Data);
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

    /// Claims guest cluster `gidx` (waiting for another writer of it) and reserves `len`
    /// host bytes for its compressed data.
    fn reserve_compressed(&self, gidx: GuestCluster, len: u64) -> Result<HostOffset> {
        let mut m = self.lock_meta();
        while self.inflight.is_claimed(gidx) {
            drop(m);
            self.inflight.wait_released(gidx);
            m = self.lock_meta();
        }
        let host = match m.alloc_compressed_bytes(&self.file, len) {
            Ok(h) => h,
            Err(e) => return Err(self.on_error(e)),
        };
        if let Err(e) = self.file.guard().check_write(host.get(), len, None) {
            m.give_back_compressed_bytes(&self.file, host);
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
            m.give_back_compressed_bytes(&self.file, host);
        }
        Err(self.on_error(e))
    }
}
