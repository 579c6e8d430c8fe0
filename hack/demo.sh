#!/usr/bin/env bash
# `make demo`: two local Kubernetes control planes (host and member), the proxy
# and an agent, and kubectl reaching the MEMBER through the tunnel. Everything
# stays running; `make demo-down` stops it. State lives in .demo/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
DEMO=$ROOT/.demo
BIN=$ROOT/bin
PROXY_PORT=${PROXY_PORT:-18080}
FORWARD_PORT=${FORWARD_PORT:-16443}

say() { printf '\n==> %s\n' "$*"; }
wait_for() { # file pattern seconds what
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    grep -q -- "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "demo: timed out waiting for $4; last lines of $1:" >&2
  tail -n 20 "$1" >&2
  exit 1
}
start() { # name logfile command...
  local name=$1 log=$2
  shift 2
  nohup "$@" >"$log" 2>&1 &
  echo $! >"$DEMO/$name.pid"
}

if ls "$DEMO"/*.pid >/dev/null 2>&1; then
  echo "demo: already running (see $DEMO); run 'make demo-down' first" >&2
  exit 1
fi
mkdir -p "$DEMO"

say "starting two real kube-apiservers (with etcd): host and member"
for c in host member; do
  start "$c" "$DEMO/$c.log" "$BIN/kube-harness" --dir "$DEMO/$c"
done
wait_for "$DEMO/host.log" "^ready " 300 "the host cluster"
wait_for "$DEMO/member.log" "^ready " 300 "the member cluster"
HOST_KC=$DEMO/host/kubeconfig
MEMBER_KC=$DEMO/member/kubeconfig
kubectl --kubeconfig "$MEMBER_KC" create namespace only-in-member >/dev/null 2>&1 || true
echo "host:   kubectl --kubeconfig $HOST_KC get ns"
echo "member: kubectl --kubeconfig $MEMBER_KC get ns   (has namespace only-in-member)"

say "starting the proxy on 127.0.0.1:$PROXY_PORT with a token for cluster alpha"
TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
umask 077
printf '{"alpha": "%s"}\n' "$TOKEN" >"$DEMO/clusters.json"
printf '%s' "$TOKEN" >"$DEMO/alpha.token"
start proxy "$DEMO/proxy.log" "$BIN/proxy" --host 127.0.0.1 --port "$PROXY_PORT" \
  --data-dir "$DEMO/proxy" --clusters-file "$DEMO/clusters.json" \
  --forward "alpha=127.0.0.1:$FORWARD_PORT" --keepalive 10s
wait_for "$DEMO/proxy.log" "listening for agents" 30 "the proxy"
FINGERPRINT=$(grep -o 'fingerprint=SHA256:[^ ]*' "$DEMO/proxy.log" | head -n1 | cut -d= -f2)
echo "proxy SSH host key: $FINGERPRINT"

say "starting the agent for alpha (it dials out to the proxy, pinning its host key)"
start agent "$DEMO/agent.log" "$BIN/agent" --name alpha --token-file "$DEMO/alpha.token" \
  --proxy-server "http://127.0.0.1:$PROXY_PORT" --kubeconfig "$MEMBER_KC" \
  --kubesphere-service 127.0.0.1:9 --proxy-host-key-fingerprint "$FINGERPRINT" --keepalive 10s
wait_for "$DEMO/agent.log" "connected to proxy" 30 "the agent to connect"

say "kubectl through the tunnel: config_alpha points at the proxy's port for alpha"
kubectl --kubeconfig "$MEMBER_KC" config view --raw --minify \
  | sed "s#server: https://.*#server: https://127.0.0.1:$FORWARD_PORT#" >"$ROOT/config_alpha"
echo "\$ kubectl --kubeconfig config_alpha get ns"
kubectl --kubeconfig "$ROOT/config_alpha" get ns

cat <<EOT

Everything is running (logs in .demo/). Try:
  kubectl --kubeconfig config_alpha get ns -w          # a watch through the tunnel
  kubectl --kubeconfig $MEMBER_KC create ns hello      # ...and see it arrive
  curl -s http://127.0.0.1:$PROXY_PORT/metrics
Stop it all with: make demo-down
EOT
