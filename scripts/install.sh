#!/usr/bin/env bash
# Installs liboxcow from an existing release build (it does not build anything):
#
#   PREFIX/LIBDIR/liboxcow.so.X.Y.Z        the shared library (SONAME liboxcow.so.X)
#   PREFIX/LIBDIR/liboxcow.so.X -> liboxcow.so.X.Y.Z
#   PREFIX/LIBDIR/liboxcow.so   -> liboxcow.so.X
#   PREFIX/LIBDIR/liboxcow.a               the static library
#   PREFIX/include/oxcow.h
#   PREFIX/LIBDIR/pkgconfig/oxcow.pc
#   PREFIX/LIBDIR/cmake/oxcow/oxcowConfig.cmake, oxcowConfigVersion.cmake
#
# Usage: scripts/install.sh [PREFIX]          (default /usr/local)
# Environment:
#   DESTDIR                    staging root prepended to every installed path (packaging);
#                              the generated files still refer to PREFIX
#   LIBDIR                     library directory relative to PREFIX (default lib), e.g.
#                              lib/x86_64-linux-gnu
#   OXCOW_BUILD_DIR            where the built libraries are (default
#                              ${CARGO_TARGET_DIR:-<repo>/target}/release)
#   OXCOW_NATIVE_STATIC_LIBS   the link flags the static library needs, as printed by
#                              `cargo rustc --release --lib --crate-type staticlib --
#                              --print native-static-libs`; defaults to the Linux/glibc list
#
# Build first with: cargo build --release --lib
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

prefix=${1:-/usr/local}
case "$prefix" in
  /*) ;;
  *) prefix="$(pwd)/$prefix" ;;
esac
prefix=${prefix%/}
[ -n "$prefix" ] || prefix=/
libdir=${LIBDIR:-lib}
libdir=${libdir#/}
libdir=${libdir%/}
includedir=include
destdir=${DESTDIR:-}
build_dir=${OXCOW_BUILD_DIR:-${CARGO_TARGET_DIR:-$repo/target}/release}

die() { echo "install.sh: $*" >&2; exit 1; }

# The version comes from the [package] section of Cargo.toml.
version=$(awk '
  /^\[/ { in_pkg = ($0 == "[package]") }
  in_pkg && /^[[:space:]]*version[[:space:]]*=/ {
    v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); print v; exit
  }' "$repo/Cargo.toml")
[[ "$version" =~ ^([0-9]+)\.([0-9]+)\.([0-9]+)$ ]] || die "cannot parse the version in Cargo.toml (got '$version')"
major=${BASH_REMATCH[1]}
minor=${BASH_REMATCH[2]}
patch=${BASH_REMATCH[3]}

so_src="$build_dir/liboxcow.so"
a_src="$build_dir/liboxcow.a"
header_src="$repo/include/oxcow.h"
for f in "$so_src" "$a_src" "$header_src"; do
  [ -f "$f" ] || die "missing $f (run: cargo build --release --lib)"
done
# The header and the library must describe the same version.
grep -q "^#define OXCOW_VERSION_MAJOR $major\$" "$header_src" &&
  grep -q "^#define OXCOW_VERSION_MINOR $minor\$" "$header_src" &&
  grep -q "^#define OXCOW_VERSION_PATCH $patch\$" "$header_src" ||
  die "include/oxcow.h does not carry version $version from Cargo.toml"

native_libs=${OXCOW_NATIVE_STATIC_LIBS:--lgcc_s -lutil -lrt -lpthread -lm -ldl -lc}
# Libs.private: the native libraries, always including -lpthread -ldl -lm, without duplicates
# (first occurrence wins) and without -lc, which every C link already has.
libs_private=""
cmake_static_libs=""
for flag in $native_libs -lpthread -ldl -lm; do
  [ "$flag" = "-lc" ] && continue
  case " $libs_private " in *" $flag "*) continue ;; esac
  libs_private="${libs_private:+$libs_private }$flag"
  case "$flag" in
    -l*) cmake_static_libs="${cmake_static_libs:+$cmake_static_libs;}${flag#-l}" ;;
    *) cmake_static_libs="${cmake_static_libs:+$cmake_static_libs;}$flag" ;;
  esac
done

# Relative path from PREFIX/LIBDIR/cmake/oxcow back to PREFIX.
config_to_prefix=".."
IFS=/ read -r -a libdir_parts <<<"$libdir"
for part in "${libdir_parts[@]}" cmake; do
  [ -n "$part" ] && config_to_prefix="$config_to_prefix/.."
done

sizeof_void_p=$(getconf LONG_BIT 2>/dev/null || echo 64)
sizeof_void_p=$((sizeof_void_p / 8))

root="$destdir$prefix"
[ "$root" = "/" ] && root=""
lib_dest="$root/$libdir"
inc_dest="$root/$includedir"
pc_dest="$lib_dest/pkgconfig"
cmake_dest="$lib_dest/cmake/oxcow"
real_so="liboxcow.so.$version"

if [ "$prefix" = "/" ]; then prefix_abs=""; else prefix_abs="$prefix"; fi

subst() {
  # subst TEMPLATE OUTPUT: replaces @NAME@ placeholders.
  sed -e "s|@PREFIX@|${prefix_abs:-/}|g" \
      -e "s|@LIBDIR_ABS@|\${prefix}/$libdir|g" \
      -e "s|@INCLUDEDIR_ABS@|\${prefix}/$includedir|g" \
      -e "s|@LIBDIR@|$libdir|g" \
      -e "s|@INCLUDEDIR@|$includedir|g" \
      -e "s|@CONFIG_TO_PREFIX@|$config_to_prefix|g" \
      -e "s|@VERSION@|$version|g" \
      -e "s|@VERSION_MAJOR@|$major|g" \
      -e "s|@VERSION_MINOR@|$minor|g" \
      -e "s|@VERSION_PATCH@|$patch|g" \
      -e "s|@LIBS_PRIVATE@|$libs_private|g" \
      -e "s|@STATIC_LINK_LIBS@|$cmake_static_libs|g" \
      -e "s|@SIZEOF_VOID_P@|$sizeof_void_p|g" \
      "$1" >"$2.tmp"
  if grep -n '@[A-Z_]*@' "$2.tmp"; then
    rm -f "$2.tmp"
    die "unsubstituted placeholder in $2"
  fi
  chmod 0644 "$2.tmp"
  mv -f "$2.tmp" "$2"
}

install -d "$lib_dest" "$inc_dest" "$pc_dest" "$cmake_dest"
install -m 0755 "$so_src" "$lib_dest/$real_so"
ln -sfn "$real_so" "$lib_dest/liboxcow.so.$major"
ln -sfn "liboxcow.so.$major" "$lib_dest/liboxcow.so"
install -m 0644 "$a_src" "$lib_dest/liboxcow.a"
install -m 0644 "$header_src" "$inc_dest/oxcow.h"
subst "$repo/cmake/oxcow.pc.in" "$pc_dest/oxcow.pc"
subst "$repo/cmake/oxcowConfig.cmake.in" "$cmake_dest/oxcowConfig.cmake"
subst "$repo/cmake/oxcowConfigVersion.cmake.in" "$cmake_dest/oxcowConfigVersion.cmake"

echo "installed oxcow $version into ${destdir}${prefix}:"
for f in "$libdir/$real_so" "$libdir/liboxcow.so.$major" "$libdir/liboxcow.so" "$libdir/liboxcow.a" \
         "$includedir/oxcow.h" "$libdir/pkgconfig/oxcow.pc" \
         "$libdir/cmake/oxcow/oxcowConfig.cmake" "$libdir/cmake/oxcow/oxcowConfigVersion.cmake"; do
  echo "  $f"
done
