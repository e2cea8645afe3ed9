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
use crate::storage::WriteKind;

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
        let offset = self.check_range(offset, buf.len() as u64)?;
        let geo = self.geo;
        let cs = geo.cluster_size();
        if !offset.is_cluster_aligned(&geo) {
            return invalid!("compressed write at {offset:#x} is not cluster-aligned");
        }
        let whole = buf.len() as u64 == cs;
        let tail =
            (offset + buf.len() as u64).get() == self.virtual_size && (buf.len() as u64) < cs;
        if buf.is_empty() || !(whole || tail) {
            return invalid!(
                "compressed writes take exactly one cluster ({cs} bytes), not {} bytes at {offset:#x}",
                buf.len()
            );
        }
        let mut padded;
        let input = if whole {
            buf
        } else {
            padded = vec![0u8; cs as usize];
            padded[..buf.len()].copy_from_slice(buf);
            &padded[..]
        };
        let Some(data) = super::compress::compress(self.compression, input)? else {
            // Not compressible: store as a normal cluster (the gate is already held).
            super::write::write(self, buf, offset)?;
            return self.after_write();
        };
        let gidx = offset.cluster(&geo);

        // Plan: reserve the guest cluster and the host bytes.
        let host = {
            let mut m = self.lock_meta();
            while self.inflight.is_claimed(gidx) {
                drop(m);
                self.inflight.wait_released(gidx);
                m = self.lock_meta();
            }
            let host = match m.alloc_compressed_bytes(&self.file, data.len() as u64) {
                Ok(h) => h,
                Err(e) => return Err(self.on_error(e)),
            };
            let len = data.len() as u64;
            if let Err(e) = self.file.guard().check_write(host.get(), len, None) {
                m.give_back_compressed_bytes(&self.file, host);
                return Err(self.on_error(e));
            }
            let _ = self.inflight.try_claim(gidx);
            host
        };

        // I/O without the lock.
        let io = self.file.write(&data, host, WriteKind::Data);

        // Link (or give the bytes back).
        let mut m = self.lock_meta();
        let linked = io.and_then(|()| {
            let old = m.lookup(&self.file, offset)?;
            let table = m.l2_for_write(&self.file, offset.l1_index(&geo))?;
            m.set_mapping(
                &self.file,
                table,
                offset.l2_index(&geo),
                Mapping::Compressed {
                    host,
                    csize: data.len() as u64,
                },
            )?;
            m.release(old);
            Ok(())
        });
        self.inflight.release(gidx);
        let result = match linked {
            Ok(()) => Ok(()),
            Err(e) => {
                let current = m.lookup(&self.file, offset).ok();
                if !matches!(current, Some(Mapping::Compressed { host: h, .. }) if h == host) {
                    m.give_back_compressed_bytes(&self.file, host);
                }
                Err(self.on_error(e))
            }
        };
        drop(m);
        result?;
        self.after_write()
    }
}
