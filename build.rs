//! Build script: generates include/oxcow.h from src/capi/ with cbindgen (rewriting the file
//! only when its content changes) and sets the shared library's SONAME to
//! `liboxcow.so.<major>`.

use std::env;
use std::fs;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/capi");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-changed=build.rs");

    let major = env::var("CARGO_PKG_VERSION_MAJOR").expect("cargo sets CARGO_PKG_VERSION_MAJOR");
    let minor = env::var("CARGO_PKG_VERSION_MINOR").expect("cargo sets CARGO_PKG_VERSION_MINOR");
    let patch = env::var("CARGO_PKG_VERSION_PATCH").expect("cargo sets CARGO_PKG_VERSION_PATCH");

    // SONAME and exported symbols only matter on ELF platforms.
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,liboxcow.so.{major}");
    }

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets the manifest dir"));
    let mut config = cbindgen::Config::from_file(root.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("cannot read cbindgen.toml: {e}"));
    config.after_includes = Some(format!(
        "\n/** Major version of the oxcow library this header belongs to. */\n\
         #define OXCOW_VERSION_MAJOR {major}\n\
         /** Minor version of the oxcow library this header belongs to. */\n\
         #define OXCOW_VERSION_MINOR {minor}\n\
         /** Patch version of the oxcow library this header belongs to. */\n\
         #define OXCOW_VERSION_PATCH {patch}\n\
         /** The version as one number: MAJOR * 10000 + MINOR * 100 + PATCH. */\n\
         #define OXCOW_VERSION_NUMBER \
         (OXCOW_VERSION_MAJOR * 10000 + OXCOW_VERSION_MINOR * 100 + OXCOW_VERSION_PATCH)"
    ));

    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi/mod.rs"))
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen failed on src/capi: {e}"));
    let mut text = Vec::new();
    bindings.write(&mut text);

    let out = root.join("include/oxcow.h");
    if fs::read(&out).ok().as_deref() != Some(text.as_slice()) {
        fs::create_dir_all(root.join("include")).expect("cannot create include/");
        fs::write(&out, &text).unwrap_or_else(|e| panic!("cannot write {}: {e}", out.display()));
    }
}
