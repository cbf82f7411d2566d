#!/usr/bin/env bash
# TLS certificates for a Flower SuperLink and SuperNode authentication keys.
#
#   scripts/gen_certs.sh OUT_DIR [NUM_NODES] [HOSTS]
#
# OUT_DIR/ca.crt, ca.key            self-signed CA (give ca.crt to every SuperNode and to `flwr`)
# OUT_DIR/server.pem, server.key    SuperLink certificate signed by the CA, valid for HOSTS
#                                   (comma separated; default "localhost,127.0.0.1,::1")
# OUT_DIR/node-N, node-N.pub        ECDSA P-384 SuperNode keys (OpenSSH format), N = 1..NUM_NODES
#                                   (default 2); register each .pub with
#                                   `flwr supernode register OUT_DIR/node-N.pub <connection>`
#
# Existing files are kept (re-running adds missing nodes only), so keys registered
# once stay valid. Private keys are written 0600.
set -euo pipefail

out=${1:?usage: gen_certs.sh OUT_DIR [NUM_NODES] [HOSTS]}
nodes=${2:-2}
hosts=${3:-localhost,127.0.0.1,::1}
days=${CERT_DAYS:-365}

command -v openssl >/dev/null || { echo "gen_certs.sh: openssl not found" >&2; exit 1; }
command -v ssh-keygen >/dev/null || { echo "gen_certs.sh: ssh-keygen not found" >&2; exit 1; }
mkdir -p "$out"
umask 077

san=""
IFS=',' read -ra parts <<< "$hosts"
for h in "${parts[@]}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+="IP:$h,"; else san+="DNS:$h,"; fi
done
san=${san%,}

if [[ ! -f $out/ca.crt ]]; then
  openssl req -x509 -newkey rsa:3072 -sha256 -nodes -days "$days" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/CN=posettp-flower-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
fi

if [[ ! -f $out/server.pem ]]; then
  openssl req -newkey rsa:3072 -sha256 -nodes -keyout "$out/server.key" -out "$out/server.csr" \
    -subj "/CN=${parts[0]}" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$out/server.ext"
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -out "$out/server.pem" -days "$days" -sha256 -extfile "$out/server.ext" 2>/dev/null
  rm -f "$out/server.csr" "$out/server.ext" "$out/ca.srl"
fi

for ((i = 1; i <= nodes; i++)); do
  if [[ ! -f $out/node-$i ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "posettp-node-$i" -f "$out/node-$i"
  fi
done
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/node-*.pub
echo "certificates and $nodes node key(s) in $out (server valid for $hosts)"
