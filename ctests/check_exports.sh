#!/bin/sh
# Checks the shared library's dynamic symbol table against the header:
#  - every exported (defined) symbol starts with oxcow_,
#  - the exported functions are exactly the functions the header declares,
#  - the SONAME is liboxcow.so.<major>, with <major> from the header's OXCOW_VERSION_MAJOR.
# Usage: check_exports.sh path/to/liboxcow.so path/to/oxcow.h
set -eu
lib=$1
header=$2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

nm -D --defined-only "$lib" | awk '{print $NF}' | sed 's/@.*//' | sort -u >"$tmp/exported"
grep -o '\boxcow_[a-z0-9_]*(' "$header" | tr -d '(' | sort -u >"$tmp/declared"

status=0
if grep -v '^oxcow_' "$tmp/exported" >"$tmp/foreign"; then
    echo "symbols outside the oxcow_ namespace are exported:"
    cat "$tmp/foreign"
    status=1
fi
if ! diff -u "$tmp/declared" "$tmp/exported"; then
    echo "exported functions differ from the header's declarations (- header, + library)"
    status=1
fi
major=$(sed -n 's/^#define OXCOW_VERSION_MAJOR \([0-9]*\).*/\1/p' "$header")
soname=$(readelf -d "$lib" | sed -n 's/.*Library soname: \[\(.*\)\].*/\1/p')
if [ "$soname" != "liboxcow.so.$major" ]; then
    echo "SONAME is '$soname', expected 'liboxcow.so.$major'"
    status=1
fi
echo "$(wc -l <"$tmp/exported") exported symbols, SONAME $soname"
exit $status
