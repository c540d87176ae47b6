#!/bin/sh
# TLS material for a berth fleet's NATS servers and clients, made with
# openssl (Debian's `openssl` package):
#
#   deploy/gen-tls.sh DIR [NAME...]
#
# writes to DIR (mode 0700, keys 0600):
#   ca.pem, ca-key.pem            a CA that signs the rest (keep its key offline)
#   server-cert.pem, server-key.pem
#                                 for nats-server; valid for localhost,
#                                 127.0.0.1, ::1 and each NAME (a host name
#                                 or an IP address of a NATS server)
#   client-cert.pem, client-key.pem
#                                 for berth's services and CLI when the
#                                 server verifies clients (`verify: true`)
#
# Existing files are kept, so running it again adds nothing and breaks
# nothing; delete DIR to start over. The server's configuration then reads:
#
#   tls {
#     cert_file: "DIR/server-cert.pem"
#     key_file:  "DIR/server-key.pem"
#     ca_file:   "DIR/ca.pem"
#     verify:    true
#   }
#
# and berthd, the service binaries and the CLI take --tls-ca DIR/ca.pem
# --tls-cert DIR/client-cert.pem --tls-key DIR/client-key.pem (or the
# BERTH_TLS_CA, BERTH_TLS_CERT and BERTH_TLS_KEY variables).
#
# Every client shares one certificate here: TLS proves that a client belongs
# to the fleet, and the nkey identities of `berthd gen-auth` say which one
# it is and what it may do.
set -eu

dir=${1:?usage: deploy/gen-tls.sh DIR [SERVER_NAME...]}
shift
days=825

mkdir -p "$dir"
chmod 0700 "$dir"
umask 077
cd "$dir"

# A P-256 key and a certificate request for CN $2, written as $1-key.pem
# and $1.csr.
request() {
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -subj "/CN=$2" -keyout "$1-key.pem" -out "$1.csr" 2>/dev/null
}

# Signs $1.csr with the CA and the extensions in $1.ext into $1-cert.pem.
sign() {
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca-key.pem \
        -CAcreateserial -days "$days" -extfile "$1.ext" -out "$1-cert.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}

if [ ! -f ca.pem ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -days "$days" -subj "/CN=berth CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout ca-key.pem -out ca.pem 2>/dev/null
fi

if [ ! -f server-cert.pem ]; then
    san="DNS:localhost,IP:127.0.0.1,IP:::1"
    for name in "$@"; do
        case "$name" in
            *:*) san="$san,IP:$name" ;;
            *[!0-9.]*) san="$san,DNS:$name" ;;
            *) san="$san,IP:$name" ;;
        esac
    done
    request server "berth nats"
    # clientAuth too: the servers of a cluster show it to each other on
    # their routes, where each side verifies the other.
    cat >server.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san
EOF
    sign server
fi

if [ ! -f client-cert.pem ]; then
    request client "berth client"
    cat >client.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
    sign client
fi

chmod 0644 ca.pem server-cert.pem client-cert.pem
echo "TLS material in $dir: ca.pem, server-cert.pem/server-key.pem, client-cert.pem/client-key.pem"
