#!/usr/bin/env bash
# Checks liboxcow as an installed package: builds the release library, installs it into a
# temporary staging prefix with scripts/install.sh, builds examples/consumer against it with
# CMake (find_package) and with plain cc + pkg-config (shared and static), runs the programs
# on fresh images and checks those with qemu-img; verifies the SONAME, the exported symbols,
# the version (Cargo.toml == header macros == oxcow_version_number() == pkg-config == CMake),
# CMake version compatibility, relocation of the installed tree and DESTDIR installs.
#
# Usage: bash scripts/check-package.sh        (KEEP=1 keeps the temporary directory)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export CARGO_TERM_COLOR=never

tmp=$(mktemp -d "${TMPDIR:-/tmp}/oxcow-check-package.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  trap 'echo "kept $tmp"' EXIT
else
  trap 'rm -rf "$tmp"' EXIT
fi

passed=()
failed=()
# step NAME COMMAND...: runs COMMAND with its output in a log; records pass/fail and shows the
# log on failure. Later steps still run.
step() {
  local name=$1
  shift
  local log="$tmp/logs/$(echo "$name" | tr -c 'A-Za-z0-9_.-' '_').log"
  mkdir -p "$tmp/logs"
  # A subshell with errexit re-enabled: inside `if` bash would ignore set -e in the checks.
  local rc
  set +e
  (
    set -e
    "$@"
  ) >"$log" 2>&1
  rc=$?
  set -e
  if [ "$rc" -eq 0 ]; then
    passed+=("$name")
    echo "  ok    $name"
  else
    failed+=("$name")
    echo "  FAIL  $name"
    sed 's/^/        | /' "$log" | tail -40
  fi
}
fatal() {
  echo "check-package.sh: $*" >&2
  exit 1
}

echo "== build (release)"
cargo build --release --lib
target=${CARGO_TARGET_DIR:-$repo/target}
native=$(cargo rustc --release --lib --crate-type staticlib -- --print native-static-libs 2>&1 |
  sed -n 's/.*native-static-libs: //p' | tail -n 1)
[ -n "$native" ] || fatal "cargo did not print the native static libraries"
echo "native-static-libs: $native"

version=$(awk '
  /^\[/ { in_pkg = ($0 == "[package]") }
  in_pkg && /^[[:space:]]*version[[:space:]]*=/ {
    v = $0; sub(/^[^"]*"/, "", v); sub(/".*$/, "", v); print v; exit
  }' Cargo.toml)
IFS=. read -r vmaj vmin vpat <<<"$version"
version_number=$((vmaj * 10000 + vmin * 100 + vpat))
echo "Cargo.toml version: $version ($version_number)"

prefix="$tmp/prefix"
echo "== install into $prefix"
OXCOW_BUILD_DIR="$target/release" OXCOW_NATIVE_STATIC_LIBS="$native" DESTDIR= LIBDIR=lib \
  bash scripts/install.sh "$prefix"
lib="$prefix/lib"
so="$lib/liboxcow.so.$version"

echo "== checks"
check_layout() {
  local f
  for f in "$so" "$lib/liboxcow.a" "$prefix/include/oxcow.h" "$lib/pkgconfig/oxcow.pc" \
           "$lib/cmake/oxcow/oxcowConfig.cmake" "$lib/cmake/oxcow/oxcowConfigVersion.cmake"; do
    [ -f "$f" ] || { echo "missing $f"; return 1; }
  done
  [ "$(readlink "$lib/liboxcow.so.$vmaj")" = "liboxcow.so.$version" ] || { echo "bad liboxcow.so.$vmaj link"; return 1; }
  [ "$(readlink "$lib/liboxcow.so")" = "liboxcow.so.$vmaj" ] || { echo "bad liboxcow.so link"; return 1; }
  cmp "$prefix/include/oxcow.h" include/oxcow.h
}
step "installed layout and symlinks" check_layout

check_soname() {
  local soname
  soname=$(readelf -d "$so" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
  echo "SONAME: $soname"
  [ "$soname" = "liboxcow.so.$vmaj" ]
}
step "SONAME is liboxcow.so.$vmaj" check_soname

check_exports() {
  nm -D --defined-only "$so" | awk '{print $NF}' | sed 's/@.*//' | sort -u >"$tmp/exported"
  echo "$(wc -l <"$tmp/exported") exported symbols"
  if grep -v '^oxcow_' "$tmp/exported"; then
    echo "^ exported symbols outside the oxcow_ namespace"
    return 1
  fi
  # Every function the header declares is exported.
  grep -o '\boxcow_[a-z0-9_]*(' "$prefix/include/oxcow.h" | tr -d '(' | sort -u >"$tmp/declared"
  comm -23 "$tmp/declared" "$tmp/exported" >"$tmp/missing"
  if [ -s "$tmp/missing" ]; then
    echo "declared in oxcow.h but not exported:"
    cat "$tmp/missing"
    return 1
  fi
}
step "exports only oxcow_* symbols (and all declared ones)" check_exports

check_header_version() {
  local h="$prefix/include/oxcow.h" a b c
  a=$(sed -n 's/^#define OXCOW_VERSION_MAJOR \([0-9]*\)$/\1/p' "$h")
  b=$(sed -n 's/^#define OXCOW_VERSION_MINOR \([0-9]*\)$/\1/p' "$h")
  c=$(sed -n 's/^#define OXCOW_VERSION_PATCH \([0-9]*\)$/\1/p' "$h")
  echo "header: $a.$b.$c, Cargo.toml: $version"
  [ "$a.$b.$c" = "$version" ]
}
step "header version macros == Cargo.toml" check_header_version

export PKG_CONFIG_PATH="$lib/pkgconfig"
check_pc() {
  local v priv flag
  v=$(pkg-config --modversion oxcow)
  echo "pkg-config --modversion: $v"
  [ "$v" = "$version" ]
  [ "$(pkg-config --variable=libdir oxcow)" = "$lib" ]
  pkg-config --libs oxcow | grep -q -- '-loxcow'
  priv=$(pkg-config --static --libs oxcow)
  echo "pkg-config --static --libs: $priv"
  for flag in $native -lpthread -ldl -lm; do
    [ "$flag" = "-lc" ] && continue
    case " $priv " in *" $flag "*) ;; *) echo "Libs.private lacks $flag"; return 1 ;; esac
  done
}
step "pkg-config metadata (version, libs, Libs.private)" check_pc

src="$repo/examples/consumer"

# run_consumer BINARY IMAGE NAME: runs the consumer, checks its output and the image.
run_consumer() {
  local bin=$1 image=$2 out
  out=$("$bin" "$image")
  echo "$out"
  grep -qx "status=ok" <<<"$out"
  grep -qx "readback=ok bytes=393216" <<<"$out"
  grep -qx "version_number=$version_number" <<<"$out"
  grep -qx "header_version_number=$version_number" <<<"$out"
  grep -qx "version_string=$version" <<<"$out"
  grep -qx "virtual_size=67108864" <<<"$out"
  qemu-img check "$image"
}

build_cmake() { # build_cmake BUILD_DIR PREFIX [cmake args...]
  local b=$1 p=$2
  shift 2
  cmake -S "$src" -B "$b" -DCMAKE_PREFIX_PATH="$p" -DCMAKE_BUILD_TYPE=Release "$@"
  cmake --build "$b"
}
step "CMake consumer builds (find_package, oxcow::oxcow)" build_cmake "$tmp/build-cmake" "$prefix"
check_needed() { # check_needed BINARY: the binary needs liboxcow.so.MAJOR
  readelf -d "$1" | grep NEEDED
  readelf -d "$1" | grep -q "Shared library: \[liboxcow.so.$vmaj\]"
}
step "CMake consumer needs liboxcow.so.$vmaj" check_needed "$tmp/build-cmake/consumer"
step "CMake consumer runs on a fresh image + qemu-img check" run_consumer "$tmp/build-cmake/consumer" "$tmp/cmake.qcow2"

build_pc() {
  # shellcheck disable=SC2046 # word splitting of pkg-config output is intended
  cc -std=c99 -Wall -Wextra -Werror -o "$tmp/consumer-pc" "$src/main.c" \
    $(pkg-config --cflags --libs oxcow) -Wl,-rpath,"$(pkg-config --variable=libdir oxcow)"
}
step "pkg-config consumer builds (cc \$(pkg-config --cflags --libs oxcow))" build_pc
step "pkg-config consumer needs liboxcow.so.$vmaj" check_needed "$tmp/consumer-pc"
step "pkg-config consumer runs on a fresh image + qemu-img check" run_consumer "$tmp/consumer-pc" "$tmp/pc.qcow2"

reopen_and_compare() {
  # The pkg-config build reopens the image the CMake build made and writes the same data
  # again: both images must then hold identical contents.
  run_consumer "$tmp/consumer-pc" "$tmp/cmake.qcow2"
  qemu-img compare "$tmp/cmake.qcow2" "$tmp/pc.qcow2"
}
step "consumer reopens an existing image; images compare identical" reopen_and_compare

build_static_pc() {
  local libs
  libs=$(pkg-config --static --libs oxcow | sed 's/-loxcow\b/-Wl,-Bstatic -loxcow -Wl,-Bdynamic/')
  echo "link flags: $libs"
  # shellcheck disable=SC2046,SC2086
  cc -std=c99 -Wall -Wextra -Werror -o "$tmp/consumer-static" "$src/main.c" \
    $(pkg-config --cflags oxcow) $libs
  if readelf -d "$tmp/consumer-static" | grep -q 'liboxcow'; then
    echo "static consumer still needs liboxcow"
    return 1
  fi
}
step "static consumer via pkg-config --static (Libs.private suffices)" build_static_pc
step "static pkg-config consumer runs + qemu-img check" run_consumer "$tmp/consumer-static" "$tmp/static-pc.qcow2"

build_static_cmake() {
  build_cmake "$tmp/build-cmake-static" "$prefix" -DOXCOW_CONSUMER_STATIC=ON
  if readelf -d "$tmp/build-cmake-static/consumer" | grep -q 'liboxcow'; then
    echo "static consumer still needs liboxcow"
    return 1
  fi
}
step "CMake consumer with oxcow::oxcow_static" build_static_cmake
step "static CMake consumer runs + qemu-img check" run_consumer "$tmp/build-cmake-static/consumer" "$tmp/static-cmake.qcow2"

# find_package version requests: which ones the installed package accepts.
check_cmake_versions() {
  local d="$tmp/cmake-version" req expect found
  mkdir -p "$d"
  cat >"$d/CMakeLists.txt" <<'EOF'
cmake_minimum_required(VERSION 3.13)
project(v LANGUAGES C)
find_package(oxcow ${REQ} QUIET)
file(WRITE "${CMAKE_BINARY_DIR}/result" "${oxcow_FOUND}:${oxcow_VERSION}")
EOF
  for req in "" "$vmaj" "$vmaj.$vmin" "$version" "$vmaj.$((vmin + 1))" "$((vmaj + 1))" "$version;EXACT" \
             "$vmaj.$vmin.$((vpat + 1))"; do
    case "$req" in
      "$vmaj.$((vmin + 1))" | "$((vmaj + 1))" | "$vmaj.$vmin.$((vpat + 1))") expect=0 ;;
      "$vmaj") if [ "$vmaj" = 0 ] && [ "$vmin" != 0 ]; then expect=0; else expect=1; fi ;;
      *) expect=1 ;;
    esac
    rm -rf "$d/b"
    cmake -S "$d" -B "$d/b" -DCMAKE_PREFIX_PATH="$prefix" "-DREQ=$req" >/dev/null
    found=$(cat "$d/b/result")
    echo "find_package(oxcow $req) -> $found (expected found=$expect)"
    case "$expect:$found" in
      1:1:"$version" | 1:TRUE:"$version") ;;
      0:0:* | 0:FALSE:* | 0::*) ;;
      *) return 1 ;;
    esac
  done
}
step "CMake version compatibility (0.x: same minor)" check_cmake_versions

check_relocation() {
  local moved="$tmp/moved/somewhere/else"
  mkdir -p "$(dirname "$moved")"
  cp -a "$prefix" "$moved"
  mv "$prefix" "$tmp/prefix.hidden"
  local rc=0
  build_cmake "$tmp/build-moved" "$moved" && run_consumer "$tmp/build-moved/consumer" "$tmp/moved.qcow2" &&
    readelf -d "$tmp/build-moved/consumer" | grep -q "$moved/lib" || rc=1
  mv "$tmp/prefix.hidden" "$prefix"
  return $rc
}
step "CMake package is relocatable (prefix moved)" check_relocation

check_destdir() {
  local dd="$tmp/destdir"
  DESTDIR="$dd" OXCOW_BUILD_DIR="$target/release" OXCOW_NATIVE_STATIC_LIBS="$native" LIBDIR=lib/x86_64-linux-gnu \
    bash scripts/install.sh /usr
  [ -f "$dd/usr/lib/x86_64-linux-gnu/liboxcow.so.$version" ]
  [ -L "$dd/usr/lib/x86_64-linux-gnu/liboxcow.so" ]
  [ -f "$dd/usr/include/oxcow.h" ]
  grep -qx 'prefix=/usr' "$dd/usr/lib/x86_64-linux-gnu/pkgconfig/oxcow.pc"
  grep -qx 'libdir=${prefix}/lib/x86_64-linux-gnu' "$dd/usr/lib/x86_64-linux-gnu/pkgconfig/oxcow.pc"
  # The CMake package found through the DESTDIR tree resolves paths inside it.
  build_cmake "$tmp/build-destdir" "$dd/usr"
  run_consumer "$tmp/build-destdir/consumer" "$tmp/destdir.qcow2"
}
step "DESTDIR install with a multiarch LIBDIR" check_destdir

echo
echo "== summary: ${#passed[@]} passed, ${#failed[@]} failed"
for n in "${failed[@]+"${failed[@]}"}"; do
  echo "  FAILED: $n"
done
[ "${#failed[@]}" -eq 0 ]
