#!/usr/bin/env bash
# `make bench`'s stronger peers (issue #15), built where the bench looks for them:
#   GOBIN/proxy-server, GOBIN/proxy-agent  apiserver-network-proxy (bench/konnectivity/go.mod)
#   GOBIN/frps, GOBIN/frpc                 frp (bench/frp/go.mod)
#   CARGO_ROOT/bin/rathole                 rathole from crates.io (RATHOLE_VERSION)
# A peer that fails to build leaves NAME.skipped with the reason (the bench reports it as
# skipped) and this script still exits 0: a missing peer never fails `make bench`.
# Usage: hack/bench-peers.sh GOBIN CARGO_ROOT
set -uo pipefail
gobin=$1 cargo_root=$2
GO=${GO:-go} CARGO=${CARGO:-cargo}
RATHOLE_VERSION=${RATHOLE_VERSION:-0.5.0}
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$gobin" "$cargo_root/bin"

# fresh OUT INPUT...: OUT exists and is newer than every INPUT
fresh() { local out=$1; shift; [[ -e $out ]] || return 1; for i in "$@"; do [[ $i -nt $out ]] && return 1; done; return 0; }

# build NAME SKIPFILE COMMAND...: run it, log to NAME.log; on failure write the reason
build() {
  local name=$1 skip=$2; shift 2
  echo ">> bench peers: building $name"
  rm -f "$skip"
  if ! "$@" >"$skip.log" 2>&1; then
    echo "the build of $name failed: $(grep -m3 -E 'error|cannot|denied|not found' "$skip.log" | tr '\n' ' ')(log: $skip.log)" >"$skip"
    echo "!! $name did not build (the bench will skip it): $(cat "$skip")" >&2
  fi
}

mods=("$root/bench/konnectivity/go.mod" "$root/bench/konnectivity/go.sum")
if ! fresh "$gobin/proxy-agent" "${mods[@]}" || ! fresh "$gobin/proxy-server" "${mods[@]}"; then
  build konnectivity "$gobin/proxy-server.skipped" bash -c "cd '$root/bench/konnectivity' && \
    GOFLAGS=-mod=mod $GO build -trimpath -o '$gobin/proxy-server' sigs.k8s.io/apiserver-network-proxy/cmd/server && \
    GOFLAGS=-mod=mod $GO build -trimpath -o '$gobin/proxy-agent' sigs.k8s.io/apiserver-network-proxy/cmd/agent"
  [[ -e $gobin/proxy-server.skipped ]] && cp "$gobin/proxy-server.skipped" "$gobin/proxy-agent.skipped"
fi

mods=("$root/bench/frp/go.mod" "$root/bench/frp/go.sum")
if ! fresh "$gobin/frps" "${mods[@]}" || ! fresh "$gobin/frpc" "${mods[@]}"; then
  build frp "$gobin/frps.skipped" bash -c "cd '$root/bench/frp' && \
    GOFLAGS=-mod=mod $GO build -trimpath -o '$gobin/frps' github.com/fatedier/frp/cmd/frps && \
    GOFLAGS=-mod=mod $GO build -trimpath -o '$gobin/frpc' github.com/fatedier/frp/cmd/frpc"
  [[ -e $gobin/frps.skipped ]] && cp "$gobin/frps.skipped" "$gobin/frpc.skipped"
fi

# rathole's own lock file pins a `time` that today's rustc rejects: resolve afresh.
if ! "$cargo_root/bin/rathole" --version 2>/dev/null | grep -qF "$RATHOLE_VERSION"; then
  build rathole "$cargo_root/bin/rathole.skipped" \
    env -u CARGO_TARGET_DIR "$CARGO" install --root "$cargo_root" "rathole@$RATHOLE_VERSION"
fi
exit 0
