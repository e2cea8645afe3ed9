//! Refcount block entries of every width (1 to 64 bits; sub-byte widths are LSB-first).

/// Reserved bits of a refcount table entry.
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;
/// Offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = !REFTABLE_RESERVED_MASK;

/// Reads entry `idx` of a refcount block with entries `1 << order` bits wide.
pub fn get(block: &[u8], order: u32, idx: usize) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let byte = block[bit / 8];
            u64::from(byte >> (bit % 8)) & ((1u64 << bits) - 1)
        }
        3 => u64::from(block[idx]),
        4 => u64::from(u16::from_be_bytes([block[idx * 2], block[idx * 2 + 1]])),
        5 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(&block[idx * 4..idx * 4 + 4]);
            u64::from(u32::from_be_bytes(a))
        }
        _ => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&block[idx * 8..idx * 8 + 8]);
            u64::from_be_bytes(a)
        }
    }
}

/// Writes entry `idx`; `value` must fit the width (callers check against the maximum).
pub fn set(block: &mut [u8], order: u32, idx: usize, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let bit = idx * bits;
            let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
            let b = &mut block[bit / 8];
            *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        }
        3 => block[idx] = value as u8,
        4 => block[idx * 2..idx * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[idx * 4..idx * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[idx * 8..idx * 8 + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_stores_independent_entries() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set(&mut block, order, i, (i as u64 * 7 + 1) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get(&block, order, i),
                    (i as u64 * 7 + 1) & max,
                    "order {order} idx {i}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_widths_are_lsb_first() {
        let mut block = vec![0u8; 1];
        set(&mut block, 0, 0, 1);
        assert_eq!(block[0], 0b0000_0001);
        set(&mut block, 0, 7, 1);
        assert_eq!(block[0], 0b1000_0001);
        let mut block = vec![0u8; 1];
        set(&mut block, 2, 1, 0xa);
        assert_eq!(block[0], 0xa0);
    }
}
