//! Metadata contexts: `base:allocation` (the engine's block status) and
//! `qemu:dirty-bitmap:NAME` (the exported bitmap's dirty state), the names a client may query
//! with NBD_OPT_LIST_META_CONTEXT / select with NBD_OPT_SET_META_CONTEXT, and the ids used in
//! NBD_REPLY_TYPE_BLOCK_STATUS chunks.

/// The context id of `base:allocation` (the same number qemu-nbd uses).
pub const BASE_ALLOCATION_ID: u32 = 0;
/// The context id of the exported dirty bitmap.
pub const DIRTY_BITMAP_ID: u32 = 1;

/// Queries longer than this are ignored (they cannot name anything we serve).
pub const MAX_QUERY_LEN: usize = 4096;

/// The contexts a connection selected with NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Selected {
    /// `base:allocation` was selected.
    pub allocation: bool,
    /// The exported bitmap's context was selected.
    pub bitmap: bool,
}

impl Selected {
    /// Whether any context is selected (BLOCK_STATUS is refused otherwise).
    pub fn any(&self) -> bool {
        self.allocation || self.bitmap
    }
}

/// The full name of the bitmap context for bitmap `name`.
pub fn bitmap_context_name(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// The contexts one query matches: exact names in both modes; in list mode also the empty
/// leaf of a namespace (`base:`, `qemu:`, `qemu:dirty-bitmap:`), which matches all of it.
pub fn matches(query: &[u8], bitmap: Option<&str>, list: bool) -> Selected {
    let mut s = Selected::default();
    let Ok(q) = std::str::from_utf8(query) else {
        return s;
    };
    if let Some(rest) = q.strip_prefix("base:") {
        s.allocation = rest == "allocation" || (list && rest.is_empty());
    } else if let Some(rest) = q.strip_prefix("qemu:") {
        let all = list && (rest.is_empty() || rest == "dirty-bitmap:");
        s.bitmap = bitmap.is_some_and(|b| all || rest.strip_prefix("dirty-bitmap:") == Some(b));
    }
    s
}

/// The contexts to answer for a whole request: with no query at all, list mode returns
/// every context; set mode selects nothing.
pub fn resolve(queries: &[&[u8]], bitmap: Option<&str>, list: bool) -> Selected {
    if queries.is_empty() {
        return Selected {
            allocation: list,
            bitmap: list && bitmap.is_some(),
        };
    }
    let mut s = Selected::default();
    for q in queries {
        let m = matches(q, bitmap, list);
        s.allocation |= m.allocation;
        s.bitmap |= m.bitmap;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_match_only_when_listing() {
        assert!(matches(b"base:", None, true).allocation);
        assert!(!matches(b"base:", None, false).allocation);
        assert!(matches(b"base:allocation", None, false).allocation);
        assert!(matches(b"qemu:dirty-bitmap:", Some("b"), true).bitmap);
        assert!(matches(b"qemu:dirty-bitmap:b", Some("b"), false).bitmap);
        assert!(!matches(b"qemu:dirty-bitmap:c", Some("b"), false).bitmap);
        assert!(!matches(b"qemu:dirty-bitmap:b", None, true).bitmap);
        assert!(!matches(b"\xff", Some("b"), true).any());
    }
}
