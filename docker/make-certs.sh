#!/usr/bin/env bash
# A private CA and the SuperLink's TLS certificate for the host names and IPs SuperNodes and
# `flwr` use to reach it, plus one SuperNode key pair per name given with --node.
#
#   docker/make-certs.sh [-o DIR] [--node NAME]... HOST_OR_IP...
#   docker/make-certs.sh -o docker/certs --node photo --node cartoon --node painting --node sketch superlink localhost 127.0.0.1
#
# DIR (default docker/certs) gets ca.crt/ca.key (keep ca.key offline), superlink.crt/superlink.key
# (the SuperLink's --ssl-* files) and, per node, supernode-NAME / supernode-NAME.pub (an ECDSA P-384
# key in OpenSSH format: the private key for `flower-supernode --auth-supernode-private-key`,
# the public one for `flwr supernode register`). Existing files are never overwritten.
set -euo pipefail

out=docker/certs nodes=() hosts=()
while (($#)); do
  case $1 in
    -o) out=$2; shift 2 ;;
    --node) nodes+=("$2"); shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    -*) echo "make-certs.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) hosts+=("$1"); shift ;;
  esac
done
if ((${#hosts[@]} == 0)); then
  echo "make-certs.sh: give the SuperLink's host names or IPs, e.g. superlink localhost 127.0.0.1 (see --help)" >&2
  exit 2
fi
mkdir -p "$out"
cd "$out"

san=""
for host in "${hosts[@]}"; do
  if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+="IP:$host,"; else san+="DNS:$host,"; fi
done
san=${san%,}

if [[ ! -f ca.crt ]]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 3650 -nodes -keyout ca.key -out ca.crt -subj "/CN=FedCLIP CA" 2>/dev/null
  echo "made CA: $out/ca.crt"
fi
if [[ ! -f superlink.crt ]]; then
  openssl req -newkey rsa:4096 -nodes -keyout superlink.key -out superlink.csr -subj "/CN=${hosts[0]}" 2>/dev/null
  openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out superlink.crt -days 825 -sha256 \
    -extfile <(printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$san") 2>/dev/null
  rm -f superlink.csr
  echo "made SuperLink certificate for $san: $out/superlink.crt"
else
  echo "kept the existing $out/superlink.crt (delete it to make one for other hosts)"
fi
for node in "${nodes[@]}"; do
  if [[ ! -f supernode-$node ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedclip-$node" -f "supernode-$node"
    echo "made SuperNode key pair: $out/supernode-$node(.pub)"
  fi
done
chmod 600 ./*.key supernode-* 2>/dev/null || true
chmod 644 ./*.crt ./*.pub 2>/dev/null || true
