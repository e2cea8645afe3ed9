//! A compact per-host-cluster refcount array: two bytes per cluster, with the rare values that
//! do not fit kept in a side map.

use crate::error::ErrorKind;
use crate::error::{Error, Result};
use std::collections::HashMap;

/// Marks an entry whose value lives in `big`.
const SPILL: u16 = u16::MAX;

/// Refcounts indexed by host cluster; clusters past the end read as 0.
#[derive(Debug, Default)]
pub(super) struct RefArray {
    small: Vec<u16>,
    big: HashMap<u64, u64>,
}

impl RefArray {
    /// An all-zero array of `len` clusters; fails cleanly when the memory is not available.
    pub(super) fn zeroed(len: u64) -> Result<RefArray> {
        let mut a = RefArray::default();
        a.grow(len)?;
        Ok(a)
    }

    /// Number of clusters covered.
    pub(super) fn len(&self) -> u64 {
        self.small.len() as u64
    }

    /// Extends the array to at least `len` clusters (new entries are 0).
    pub(super) fn grow(&mut self, len: u64) -> Result<()> {
        if len <= self.len() {
            return Ok(());
        }
        let extra = usize::try_from(len - self.len()).map_err(|_| {
            Error::new(
                ErrorKind::NoMemory,
                format!("refcount array of {len} clusters"),
            )
        })?;
        self.small.try_reserve_exact(extra).map_err(|_| {
            Error::new(
                ErrorKind::NoMemory,
                format!("cannot allocate the in-memory refcount array for {len} clusters"),
            )
        })?;
        self.small.resize(self.small.len() + extra, 0);
        Ok(())
    }

    /// Refcount of cluster `i` (0 past the end).
    pub(super) fn get(&self, i: u64) -> u64 {
        match usize::try_from(i).ok().and_then(|k| self.small.get(k)) {
            None | Some(0) => 0,
            Some(&SPILL) => self.big.get(&i).copied().unwrap_or(0),
            Some(&v) => u64::from(v),
        }
    }

    /// Sets cluster `i`, which must be below [`Self::len`].
    pub(super) fn set(&mut self, i: u64, v: u64) {
        let Some(slot) = usize::try_from(i).ok().and_then(|k| self.small.get_mut(k)) else {
            return;
        };
        if *slot == SPILL {
            self.big.remove(&i);
        }
        match u16::try_from(v) {
            Ok(small) if small != SPILL => *slot = small,
            _ => {
                *slot = SPILL;
                self.big.insert(i, v);
            }
        }
    }

    /// Whether any cluster in `[start, end)` has a non-zero count.
    pub(super) fn any_in(&self, start: u64, end: u64) -> bool {
        let s = (start.min(self.len())) as usize;
        let e = (end.min(self.len())) as usize;
        self.small[s..e].iter().any(|&v| v != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_values_spill_and_come_back() {
        let mut a = RefArray::zeroed(4).unwrap();
        a.set(1, 7);
        a.set(2, 70000);
        a.set(3, u64::MAX);
        assert_eq!(a.get(0), 0);
        assert_eq!(a.get(1), 7);
        assert_eq!(a.get(2), 70000);
        assert_eq!(a.get(3), u64::MAX);
        a.set(2, 3);
        assert_eq!(a.get(2), 3);
        assert_eq!(a.get(99), 0);
        assert!(a.any_in(0, 2));
        assert!(!a.any_in(0, 1));
        a.grow(10).unwrap();
        assert_eq!(a.len(), 10);
        assert_eq!(a.get(9), 0);
    }
}
