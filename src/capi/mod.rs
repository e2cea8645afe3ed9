//! The C ABI (see include/oxcow.h).
