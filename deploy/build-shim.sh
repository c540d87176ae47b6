#!/usr/bin/env bash
# Builds berth-shim statically linked (glibc's libc.a, libgcc_eh) and prints
# its path: deploy/build-shim.sh [release|debug] (default release).
#
# A shim runs beside every container, so its resident pages count once per
# container. Dynamically linked, fault-around maps about 1.3 MB of libc.so
# and ld.so into each shim; linked statically, only the libc code the shim
# uses is there. The build has a target of its own (--target) so that the
# static flag reaches the shim and its few dependencies but not the build
# scripts and proc macros, which rustc cannot link statically.
set -euo pipefail
cd "$(dirname "$0")/.."

profile="${1:-release}"
case "$profile" in
release) flags=(--release) ;;
debug) flags=() ;;
*)
    echo "usage: deploy/build-shim.sh [release|debug]" >&2
    exit 2
    ;;
esac
host=$(rustc -vV | sed -n 's/^host: //p')
var="CARGO_TARGET_$(echo "$host" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
export "$var=-C target-feature=+crt-static"
cargo build "${flags[@]}" --locked -p berth-shim --bin berth-shim --target "$host" >&2
shim="${CARGO_TARGET_DIR:-$PWD/target}/$host/$profile/berth-shim"
if readelf -d "$shim" | grep -q NEEDED; then
    echo "build-shim: $shim is dynamically linked" >&2
    exit 1
fi
echo "$shim"
