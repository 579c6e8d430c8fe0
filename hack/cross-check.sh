#!/usr/bin/env bash
# `make cross`: the binaries hack/cross-build.sh made for ARCH are ELF
# executables for that machine, and, where qemu-user is installed, they run.
#
#   hack/cross-check.sh ARCH DIR
set -euo pipefail
arch=${1:?usage: hack/cross-check.sh amd64|arm64 DIR}
dir=${2:?usage: hack/cross-check.sh amd64|arm64 DIR}
case $arch in
amd64) machine=3e00 qemu=qemu-x86_64 sysroot=/usr/x86_64-linux-gnu ;;
arm64) machine=b700 qemu=qemu-aarch64 sysroot=/usr/aarch64-linux-gnu ;;
*)
  echo "cross-check: unknown architecture '$arch'" >&2
  exit 2
  ;;
esac
for b in proxy agent; do
  # e_machine: two bytes at offset 18 of the ELF header (little endian)
  got=$(od -An -tx1 -j18 -N2 "$dir/$b" | tr -d ' \n')
  if [[ $got != "$machine" ]]; then
    echo "cross-check: $dir/$b is not a linux/$arch executable (ELF machine $got)" >&2
    exit 1
  fi
  if [[ $arch == "$(dpkg --print-architecture 2>/dev/null || uname -m)" ]]; then
    "$dir/$b" --version
  elif command -v "$qemu" >/dev/null; then
    QEMU_LD_PREFIX=$sysroot "$qemu" "$dir/$b" --version
  else
    echo "cross-check: $dir/$b is linux/$arch ($qemu not installed: not run)"
  fi
done
