#!/usr/bin/env bash
# Runs berth's tests on this machine, as root: installs what they need
# (runc, nats-server), builds every binary the end-to-end tests run (the
# shim statically linked, as it ships) and runs the whole suite. Exits with
# the suite's status.
set -euo pipefail
cd "$(dirname "$0")/.."

. deploy/install-deps.sh
cargo build --workspace --bins --locked
# The tests run the shim that ships: statically linked (berthd, berth-task
# and the test harness take it from BERTH_SHIM).
BERTH_SHIM=$(deploy/build-shim.sh debug)
export BERTH_SHIM
cargo test --workspace --locked "$@"
