#!/usr/bin/env bash
# Starts a berth fleet on this machine, as root: three nats-servers in one
# cluster (deploy/cluster/nats-*.conf, JetStream R3), the control services
# in one `berthd --services control`, and node agents `berthd --services
# node` for nodes node-1 .. node-N, each with its own root and state
# directory. Everything lives under FLEET_DIR (default /var/tmp/berth-fleet):
# logs, stores, roots, the identities and TLS material (auth/, made by
# deploy/fleet-auth.sh), the client settings (fleet.env) and the pid files
# deploy/fleet-down.sh reads.
#
#   deploy/fleet-up.sh [NODES]          # default 2 nodes
#   . /var/tmp/berth-fleet/fleet.env    # servers, TLS and the admin's seed
#   target/release/berth nodes          # node-1 and node-2, ready
#   target/release/berth --node node-2 image import busybox.oci.tar
#   target/release/berth --node node-2 run --rm busybox echo hi
#   deploy/fleet-down.sh                # stops the services (--purge: the
#                                       # containers and FLEET_DIR too)
#
# The servers take only TLS with a certificate of the fleet's CA, on client
# connections and routes alike, and only berth's identities, each service
# as its own. BERTH_BIN names the directory of the binaries (default
# target/release, or $CARGO_TARGET_DIR/release; built when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
nodes="${1:-2}"
dir="${FLEET_DIR:-/var/tmp/berth-fleet}"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
bin="${BERTH_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release}"
auth="$dir/auth"
. deploy/cluster/fleet.env
# Each service connects as its own identity from $auth, never as one the
# caller's environment names (a shell that sourced fleet.env has the
# admin's).
unset BERTH_NATS_NKEY BERTH_NATS_CREDS BERTH_NATS_USER BERTH_NATS_PASSWORD
export BERTH_TLS_CA="$auth/tls/ca.pem"
export BERTH_TLS_CERT="$auth/tls/client-cert.pem"
export BERTH_TLS_KEY="$auth/tls/client-key.pem"

if [ ! -x "$bin/berthd" ]; then
    cargo build --release --bins --locked
fi
# The shim statically linked, as installs run it; BERTH_SHIM overrides.
shim="${BERTH_SHIM:-$(deploy/build-shim.sh release)}"
BERTHD="$bin/berthd" deploy/fleet-auth.sh "$auth" "$nodes"
# What a client of this fleet needs, for `. $dir/fleet.env`.
{
    echo "# The client settings of the fleet in $dir, written by"
    echo "# deploy/fleet-up.sh: . $dir/fleet.env"
    grep -v '^#' deploy/cluster/fleet.env
    echo
    echo "# The admin's identity and the fleet's TLS material."
    echo "BERTH_NATS_NKEY=$auth/admin.nk"
    echo "BERTH_TLS_CA=$BERTH_TLS_CA"
    echo "BERTH_TLS_CERT=$BERTH_TLS_CERT"
    echo "BERTH_TLS_KEY=$BERTH_TLS_KEY"
    echo "export BERTH_NATS_NKEY BERTH_TLS_CA BERTH_TLS_CERT BERTH_TLS_KEY"
} >"$dir/fleet.env"

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
    # Beside auth/, and run from $dir: the server reads its include beside
    # the file and its TLS files from its working directory.
    cp "deploy/cluster/nats-$i.conf" "$dir/nats-$i.conf"
    if [ -f "$dir/nats-$i.pid" ] && kill -0 "$(cat "$dir/nats-$i.pid")" 2>/dev/null; then
        # Running already: have it read the identities again, in case
        # this run added nodes.
        kill -HUP "$(cat "$dir/nats-$i.pid")"
    fi
    (cd "$dir" && NATS_STORE="$dir/nats-$i" start "nats-$i" nats-server -c "nats-$i.conf")
done
for i in 1 2 3; do
    wait_for "$dir/nats-$i.log" 30 "Server is ready"
done
wait_for "$dir/nats-1.log" 30 "metadata leader" ||
    wait_for "$dir/nats-2.log" 5 "metadata leader" ||
    wait_for "$dir/nats-3.log" 5 "metadata leader"

start control "$bin/berthd" --services control --nats "$BERTH_NATS_URL" \
    --root "$dir/control/root" --auth-dir "$auth"
wait_for "$dir/control.log" 60 "berthd ready"

for i in $(seq "$nodes"); do
    node="node-$i"
    start "$node" "$bin/berthd" --services node --node "$node" --nats "$BERTH_NATS_URL" \
        --root "$dir/$node/root" --state "$dir/$node/state" --shim "$shim" --auth-dir "$auth"
done
for i in $(seq "$nodes"); do
    wait_for "$dir/node-$i.log" 60 "berthd ready"
done
echo "fleet ready: . $dir/fleet.env; $bin/berth nodes"
