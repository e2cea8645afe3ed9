//! A small write-back cache of metadata tables keyed by host offset, with LRU eviction of
//! clean entries. Dirty entries are never evicted: the owner writes them back in crash-safe
//! order first (see `Meta::writeback`).

use crate::format::HostOffset;
use std::collections::HashMap;

struct Slot<T> {
    data: T,
    dirty: bool,
    last_use: u64,
}

/// Cached tables of type `T` (decoded L2 words, raw refcount block bytes).
pub struct TableCache<T> {
    slots: HashMap<HostOffset, Slot<T>>,
    capacity: usize,
    clock: u64,
}

impl<T> TableCache<T> {
    /// A cache holding at most `capacity` tables (at least 4).
    pub fn new(capacity: usize) -> TableCache<T> {
        TableCache {
            slots: HashMap::new(),
            capacity: capacity.max(4),
            clock: 0,
        }
    }

    /// Whether the table at `offset` is cached.
    pub fn contains(&self, offset: HostOffset) -> bool {
        self.slots.contains_key(&offset)
    }

    /// The cached table, marked as recently used.
    pub fn get(&mut self, offset: HostOffset) -> Option<&T> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = clock;
            &s.data
        })
    }

    /// The cached table for modification; marks it dirty.
    pub fn get_mut(&mut self, offset: HostOffset) -> Option<&mut T> {
        self.clock += 1;
        let clock = self.clock;
        self.slots.get_mut(&offset).map(|s| {
            s.last_use = clock;
            s.dirty = true;
            &mut s.data
        })
    }

    /// Whether inserting another table needs an eviction first.
    pub fn is_full(&self) -> bool {
        self.slots.len() >= self.capacity
    }

    /// Evicts the least recently used clean table. Returns false if every table is dirty.
    pub fn evict_one_clean(&mut self) -> bool {
        let victim = self
            .slots
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.last_use)
            .map(|(k, _)| *k);
        match victim {
            Some(k) => {
                self.slots.remove(&k);
                true
            }
            None => false,
        }
    }

    /// Evicts a clean table chosen by LRU with a second chance: a candidate for which
    /// `used(data)` reports recent use elsewhere (lock-free readers) is kept this time and
    /// counts as just used. Returns the evicted offset, or None if every table is dirty.
    pub fn evict_clean_second_chance(
        &mut self,
        mut used: impl FnMut(&T) -> bool,
    ) -> Option<HostOffset> {
        // Readers may mark tables as fast as we clear the marks: spare each table at most
        // about once, then take the least recently used regardless.
        let mut spares = self.slots.len();
        loop {
            let victim = self
                .slots
                .iter()
                .filter(|(_, s)| !s.dirty)
                .min_by_key(|(_, s)| s.last_use)
                .map(|(k, _)| *k)?;
            let spared = spares > 0 && self.slots.get(&victim).is_some_and(|s| used(&s.data));
            if !spared {
                self.slots.remove(&victim);
                return Some(victim);
            }
            spares -= 1;
            self.clock += 1;
            if let Some(s) = self.slots.get_mut(&victim) {
                s.last_use = self.clock;
            }
        }
    }

    /// Inserts a table (replacing any cached one at the same offset).
    pub fn insert(&mut self, offset: HostOffset, data: T, dirty: bool) {
        self.clock += 1;
        self.slots.insert(
            offset,
            Slot {
                data,
                dirty,
                last_use: self.clock,
            },
        );
    }

    /// Drops every table without writing it (the owner wrote the dirty ones back first).
    pub fn clear(&mut self) {
        self.slots.clear();
    }

    /// Drops a table from the cache without writing it.
    pub fn remove(&mut self, offset: HostOffset) {
        self.slots.remove(&offset);
    }

    /// Offsets of the dirty tables, in ascending order (sequential write-back).
    pub fn dirty_offsets(&self) -> Vec<HostOffset> {
        let mut v: Vec<HostOffset> = self
            .slots
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(k, _)| *k)
            .collect();
        v.sort_unstable();
        v
    }

    /// Whether any table is dirty.
    pub fn has_dirty(&self) -> bool {
        self.slots.values().any(|s| s.dirty)
    }

    /// The table at `offset` without touching LRU state or dirtiness.
    pub fn peek(&self, offset: HostOffset) -> Option<&T> {
        self.slots.get(&offset).map(|s| &s.data)
    }

    /// Marks a table clean after it was written.
    pub fn mark_clean(&mut self, offset: HostOffset) {
        if let Some(s) = self.slots.get_mut(&offset) {
            s.dirty = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(n: u64) -> HostOffset {
        HostOffset::new(n)
    }

    #[test]
    fn second_chance_spares_used_tables_but_always_makes_progress() {
        let mut c = TableCache::new(4);
        c.insert(h(1), 1u32, false);
        c.insert(h(2), 2u32, false);
        c.insert(h(3), 3u32, true);
        // Table 1 (least recent) is in use: table 2 goes instead.
        assert_eq!(c.evict_clean_second_chance(|&v| v == 1), Some(h(2)));
        // Everything clean is always in use: something is evicted anyway.
        assert_eq!(c.evict_clean_second_chance(|_| true), Some(h(1)));
        // Only a dirty table is left.
        assert_eq!(c.evict_clean_second_chance(|_| false), None);
    }

    #[test]
    fn eviction_takes_the_least_recent_clean_table_and_never_a_dirty_one() {
        let mut c = TableCache::new(4);
        c.insert(h(1), 1, false);
        c.insert(h(2), 2, true);
        c.insert(h(3), 3, false);
        c.insert(h(4), 4, false);
        c.get(h(1));
        assert!(c.is_full());
        assert!(c.evict_one_clean());
        assert!(!c.contains(h(3)));
        assert!(c.evict_one_clean());
        assert!(c.evict_one_clean());
        assert!(!c.evict_one_clean());
        assert!(c.contains(h(2)));
        assert_eq!(c.dirty_offsets(), vec![h(2)]);
    }
}
