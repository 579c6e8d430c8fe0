#!/usr/bin/env bash
# Creates a development CA for Tower: OUTDIR/ca.crt and OUTDIR/ca.key
# (ECDSA P-256, CA:TRUE, keyCertSign + cRLSign, 10 years, CN tower-dev-ca).
# Refuses to overwrite an existing key. Usage: certs/gen-ca.sh OUTDIR
set -euo pipefail

if [[ $# -ne 1 || -z "$1" ]]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
out=$1
command -v openssl >/dev/null || { echo "$0: openssl not found (apt-get install -y openssl)" >&2; exit 1; }

mkdir -p "$out"
key="$out/ca.key"
crt="$out/ca.crt"
if [[ -e "$key" ]]; then
  echo "$0: $key already exists; refusing to overwrite it (remove it first to make a new CA)" >&2
  exit 1
fi

umask 077
tmp=$(mktemp "$out/.ca.key.XXXXXX")
trap 'rm -f "$tmp"' EXIT
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve -out "$tmp"
openssl req -x509 -new -key "$tmp" -sha256 -days 3650 \
  -subj "/CN=tower-dev-ca" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -addext "subjectKeyIdentifier=hash" \
  -out "$crt"
chmod 600 "$tmp"
mv "$tmp" "$key"
trap - EXIT
chmod 644 "$crt"
echo "wrote $crt and $key"
