#!/bin/sh
# The identities and TLS material of a berth fleet, in one directory, as
# deploy/fleet-up.sh and docker-compose.yml use them:
#
#   deploy/fleet-auth.sh DIR NODES [SERVER_NAME...]
#
# DIR (mode 0700) gets the nkey seeds of `berthd gen-auth` for the control
# services, the admin, the observer and nodes node-1 .. node-NODES, with
# nats-auth.conf, the servers' authorization block; and DIR/tls the CA,
# server and client certificates of deploy/gen-tls.sh, the server's valid
# for each SERVER_NAME besides localhost and 127.0.0.1. A server's
# configuration beside DIR names both (deploy/cluster/nats-*.conf,
# deploy/compose/nats.conf). What exists is kept: running it again with
# more nodes adds their identities and changes nothing else.
set -eu

dir=${1:?usage: deploy/fleet-auth.sh DIR NODES [SERVER_NAME...]}
nodes=${2:?usage: deploy/fleet-auth.sh DIR NODES [SERVER_NAME...]}
shift 2
here=$(dirname "$0")
berthd=${BERTHD:-berthd}

names="$*"
set --
i=1
while [ "$i" -le "$nodes" ]; do
    set -- "$@" --node "node-$i"
    i=$((i + 1))
done
"$berthd" gen-auth --out "$dir" "$@" >/dev/null
# $names unquoted: one argument per server name.
"$here/gen-tls.sh" "$dir/tls" $names >/dev/null
echo "fleet identities in $dir, TLS material in $dir/tls"
