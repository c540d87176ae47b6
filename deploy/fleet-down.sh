#!/usr/bin/env bash
# Stops what deploy/fleet-up.sh started, node agents first, then the
# control services, then the three nats-servers; each by the pid in its
# pid file (SIGTERM, SIGKILL after 10 s). Containers keep running under
# their shims, as after any stop of berthd: `--purge` also kills the shims
# of FLEET_DIR's nodes and their containers, unmounts their rootfs and
# removes FLEET_DIR.
set -euo pipefail
dir="${FLEET_DIR:-/var/tmp/berth-fleet}"

stop() {
    local pidfile="$dir/$1.pid"
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
        echo "stopped $1"
    fi
    rm -f "$pidfile"
}

for pidfile in "$dir"/node-*.pid; do
    [ -e "$pidfile" ] || continue
    stop "$(basename "$pidfile" .pid)"
done
stop control
for i in 1 2 3; do
    stop "nats-$i"
done

if [ "${1:-}" = "--purge" ]; then
    # Shims of this fleet name its state directories on their command line.
    for proc in /proc/[0-9]*; do
        if tr '\0' ' ' <"$proc/cmdline" 2>/dev/null | grep -q -- "$dir/node-"; then
            kill -KILL "${proc#/proc/}" 2>/dev/null || true
        fi
    done
    # Then the containers: each task has runc's root in its state
    # directory (.../runc/<id>/state.json), and `delete --force` kills the
    # container's processes and removes its cgroup.
    find "$dir"/node-*/state -path '*/runc/*/state.json' 2>/dev/null |
        while read -r state; do
            container="$(dirname "$state")"
            runc --root "$(dirname "$container")" delete --force "$(basename "$container")" ||
                true
        done
    awk -v d="$dir/" 'index($5, d) == 1 { print $5 }' /proc/self/mountinfo |
        sort -r | while read -r point; do umount -l "$point" || true; done
    rm -rf "$dir"
    echo "removed $dir"
fi
