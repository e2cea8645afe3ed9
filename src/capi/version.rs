//! Library version, taken from Cargo's package version at compile time. The header's
//! OXCOW_VERSION_* macros are generated from the same values by build.rs.

use std::ffi::c_char;

/// Parses a decimal version component at compile time (panics, i.e. fails the build, on
/// anything else).
const fn parse_component(s: &str) -> u32 {
    let b = s.as_bytes();
    assert!(!b.is_empty(), "empty version component");
    let mut i = 0;
    let mut v: u32 = 0;
    while i < b.len() {
        assert!(b[i].is_ascii_digit(), "non-numeric version component");
        v = v * 10 + (b[i] - b'0') as u32;
        i += 1;
    }
    v
}

/// Major version of the library (from Cargo.toml).
pub(crate) const MAJOR: u32 = parse_component(env!("CARGO_PKG_VERSION_MAJOR"));
/// Minor version of the library (from Cargo.toml).
pub(crate) const MINOR: u32 = parse_component(env!("CARGO_PKG_VERSION_MINOR"));
/// Patch version of the library (from Cargo.toml).
pub(crate) const PATCH: u32 = parse_component(env!("CARGO_PKG_VERSION_PATCH"));

const _: () = assert!(
    MINOR < 100 && PATCH < 100,
    "version number encoding needs < 100"
);

/// Returns the version of the library as MAJOR * 10000 + MINOR * 100 + PATCH. Compare it with
/// OXCOW_VERSION_NUMBER to detect a header/library mismatch.
#[no_mangle]
pub extern "C" fn oxcow_version_number() -> u32 {
    super::error::boundary(None, || MAJOR * 10000 + MINOR * 100 + PATCH, |_| 0)
}

/// Returns the version of the library as a static NUL-terminated string, e.g. "0.1.0".
#[no_mangle]
pub extern "C" fn oxcow_version_string() -> *const c_char {
    const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    super::error::boundary(None, || VERSION.as_ptr().cast(), |_| c"".as_ptr())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    #[test]
    fn version_matches_cargo() {
        let n = oxcow_version_number();
        assert_eq!(n / 10000, MAJOR);
        assert_eq!(n / 100 % 100, MINOR);
        assert_eq!(n % 100, PATCH);
        // SAFETY: oxcow_version_string returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(oxcow_version_string()) };
        assert_eq!(s.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
    }
}
