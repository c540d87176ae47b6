#!/usr/bin/env bash
# Starts a berth fleet on this machine, as root: three nats-servers in one
# cluster (deploy/cluster/nats-*.conf, JetStream R3), the control services
# in one `berthd --services control`, and node agents `berthd --services
# node` for nodes node-1 .. node-N, each with its own root and state
# directory. Everything lives under FLEET_DIR (default /var/tmp/berth-fleet):
# logs, stores, roots and the pid files deploy/fleet-down.sh reads.
#
#   deploy/fleet-up.sh [NODES]          # default 2 nodes
#   . deploy/cluster/fleet.env
#   target/release/berth nodes          # node-1 and node-2, ready
#   target/release/berth --node node-2 image import busybox.oci.tar
#   target/release/berth --node node-2 run --rm busybox echo hi
#   deploy/fleet-down.sh                # stops it all; containers stop too
#
# BERTH_BIN names the directory of the binaries (default target/release,
# built when missing). The servers are open to local clients: a fleet on
# more than one machine adds identities and TLS (README, "Access").
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
nodes="${1:-2}"
dir="${FLEET_DIR:-/var/tmp/berth-fleet}"
bin="${BERTH_BIN:-$repo/target/release}"
. deploy/cluster/fleet.env

if [ ! -x "$bin/berthd" ]; then
    cargo build --release --bins --locked
fi
# The shim statically linked, as installs run it; BERTH_SHIM overrides.
shim="${BERTH_SHIM:-$(deploy/build-shim.sh release)}"
mkdir -p "$dir"

# Waits up to $2 seconds for the pattern $3 in log $1.
wait_for() {
    for _ in $(seq $(($2 * 10))); do
        grep -q "$3" "$1" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "no \"$3\" in $1 within $2 s:" >&2
    tail -n 40 "$1" >&2
    return 1
}

# Starts a command in the background with its log and pid file.
start() {
    local name="$1"
    shift
    if [ -f "$dir/$name.pid" ] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null; then
        echo "$name runs already (pid $(cat "$dir/$name.pid"))"
        return 0
    fi
    : >"$dir/$name.log"
    setsid "$@" >>"$dir/$name.log" 2>&1 </dev/null &
    echo $! >"$dir/$name.pid"
    echo "started $name (pid $!, log $dir/$name.log)"
}

for i in 1 2 3; do
    mkdir -p "$dir/nats-$i"
    NATS_STORE="$dir/nats-$i" start "nats-$i" nats-server -c "$repo/deploy/cluster/nats-$i.conf"
done
for i in 1 2 3; do
    wait_for "$dir/nats-$i.log" 30 "Server is ready"
done
wait_for "$dir/nats-1.log" 30 "metadata leader" ||
    wait_for "$dir/nats-2.log" 5 "metadata leader" ||
    wait_for "$dir/nats-3.log" 5 "metadata leader"

start control "$bin/berthd" --services control --nats "$BERTH_NATS_URL" \
    --root "$dir/control/root"
wait_for "$dir/control.log" 60 "berthd ready"

for i in $(seq "$nodes"); do
    node="node-$i"
    start "$node" "$bin/berthd" --services node --node "$node" --nats "$BERTH_NATS_URL" \
        --root "$dir/$node/root" --state "$dir/$node/state" --shim "$shim"
done
for i in $(seq "$nodes"); do
    wait_for "$dir/node-$i.log" 60 "berthd ready"
done
echo "fleet ready: . deploy/cluster/fleet.env; $bin/berth nodes"
