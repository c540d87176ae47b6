#!/usr/bin/env bash
# Runs berth's tests on this machine, as root: installs what they need
# (runc, nats-server), builds every binary the end-to-end tests run, and
# runs the whole suite. Exits with the suite's status.
set -euo pipefail
cd "$(dirname "$0")/.."

. deploy/install-deps.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
