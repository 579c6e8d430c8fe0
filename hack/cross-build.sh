#!/usr/bin/env bash
# Build bin/proxy and bin/agent for a Linux architecture, on any Linux build
# machine, without emulation: the Dockerfile's build stage runs this once per
# platform of `docker buildx build --platform linux/amd64,linux/arm64`, and
# `make cross` runs it here.
#
#   hack/cross-build.sh ARCH OUT_DIR      # ARCH: amd64 or arm64 (Docker's TARGETARCH)
#
# Needs the target's C cross compiler (ring has C parts): Debian packages
# gcc-aarch64-linux-gnu (for arm64) or gcc-x86-64-linux-gnu (for amd64 on arm64).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

arch=${1:-}
out=${2:-}
if [[ -z $arch || -z $out ]]; then
  echo "usage: hack/cross-build.sh amd64|arm64 OUT_DIR" >&2
  exit 2
fi
case $arch in
amd64) triple=x86_64-unknown-linux-gnu gcc=x86_64-linux-gnu-gcc pkg=gcc-x86-64-linux-gnu ;;
arm64) triple=aarch64-unknown-linux-gnu gcc=aarch64-linux-gnu-gcc pkg=gcc-aarch64-linux-gnu ;;
*)
  echo "cross-build: no build for architecture '$arch': use amd64 or arm64" >&2
  exit 2
  ;;
esac

host=$(rustc -vV | sed -n 's/^host: //p')
if [[ $triple != "$host" ]]; then
  if ! command -v "$gcc" >/dev/null; then
    echo "cross-build: $gcc not found: install it (Debian: apt-get install $pkg)" >&2
    exit 1
  fi
  if ! rustup target list --installed | grep -qx "$triple"; then
    rustup target add "$triple"
  fi
  env_triple=${triple//-/_}
  export "CARGO_TARGET_${env_triple^^}_LINKER=$gcc" "CC_${env_triple}=$gcc" "AR_${env_triple}=${gcc%gcc}ar"
fi

cargo build --release --locked --target "$triple" --bin proxy --bin agent
built=${CARGO_TARGET_DIR:-target}/$triple/release
mkdir -p "$out"
cp "$built/proxy" "$built/agent" "$out/"
echo "cross-build: $out/proxy and $out/agent for linux/$arch"
