#!/usr/bin/env bash
# berth's main job on a fresh Debian 12 machine, as root: installs what is
# missing, builds berth, starts a single-node berthd (with its own
# nats-server) in the background, imports the bundled busybox image and runs
# a container from it. Run it again at will: a running berthd is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

. deploy/install-deps.sh
cargo build --release --bins --locked
# The shim statically linked, as installs run it (deploy/build-shim.sh).
shim=$(deploy/build-shim.sh release)
bin="${CARGO_TARGET_DIR:-$PWD/target}/release"
log="${BERTH_LOG_FILE:-/var/log/berthd.log}"

if ! "$bin/berth" image ls >/dev/null 2>&1; then
    echo "starting berthd (log: $log)"
    # The log is appended to, so an earlier run's lines stay; only what
    # this berthd writes counts.
    echo "--- berthd started by quickstart.sh at $(date -u +%FT%TZ)" >>"$log"
    first=$(($(wc -l <"$log") + 1))
    setsid "$bin/berthd" --shim "$shim" >>"$log" 2>&1 </dev/null &
    for _ in $(seq 300); do
        tail -n "+$first" "$log" | grep -q "berthd ready" && break
        sleep 0.1
    done
    if ! tail -n "+$first" "$log" | grep -q "berthd ready"; then
        echo "berthd did not get ready:" >&2
        tail -n "+$first" "$log" >&2
        exit 1
    fi
fi

"$bin/berth" image import tests/fixtures/images/busybox/busybox.oci.tar
"$bin/berth" run --rm busybox
echo
echo "berthd is running; try: $bin/berth run --rm busybox echo hello"
