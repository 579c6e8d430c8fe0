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

say "installing the Cluster CRD on the host (kubectl kustomize config/crd | kubectl create -f -)"
kubectl kustomize "$ROOT/config/crd" | kubectl --kubeconfig "$HOST_KC" apply -f - >/dev/null
kubectl --kubeconfig "$HOST_KC" wait --for condition=established crd/clusters.cluster.kubesphere.io --timeout=60s >/dev/null
kubectl --kubeconfig "$HOST_KC" create namespace kubesphere-system >/dev/null 2>&1 || true

say "starting the proxy on 127.0.0.1:$PROXY_PORT against the host cluster"
start proxy "$DEMO/proxy.log" "$BIN/proxy" --host 127.0.0.1 --port "$PROXY_PORT" \
  --kubeconfig "$HOST_KC" --advertise-address 127.0.0.1 --keepalive 10s
wait_for "$DEMO/proxy.log" "listening for agents" 30 "the proxy"
FINGERPRINT=$(grep -o 'fingerprint=SHA256:[^ ]*' "$DEMO/proxy.log" | head -n1 | cut -d= -f2)
echo "proxy SSH host key: $FINGERPRINT (kept in Secret kubesphere-system/tower-proxy)"

say "creating Cluster alpha on the host; the proxy gives it a token, ports and a Service"
kubectl --kubeconfig "$HOST_KC" apply -f - <<EOC
apiVersion: cluster.kubesphere.io/v1alpha1
kind: Cluster
metadata:
  name: alpha
spec:
  joinFederation: true
  connection:
    type: proxy
EOC
TOKEN=
for _ in $(seq 300); do
  TOKEN=$(kubectl --kubeconfig "$HOST_KC" get cluster alpha -o jsonpath='{.spec.connection.token}')
  [[ -n $TOKEN ]] && break
  sleep 0.1
done
[[ -n $TOKEN ]] || { echo "demo: the proxy did not give alpha a token; see $DEMO/proxy.log" >&2; exit 1; }
umask 077
printf '%s' "$TOKEN" >"$DEMO/alpha.token"
echo "token: kubectl get cluster alpha -o jsonpath='{.spec.connection.token}'"

say "starting the agent for alpha with the member's credentials (it dials out, pinning the proxy's host key)"
start agent "$DEMO/agent.log" "$BIN/agent" --name alpha --token-file "$DEMO/alpha.token" \
  --proxy-server "http://127.0.0.1:$PROXY_PORT" --kubeconfig "$MEMBER_KC" \
  --kubesphere-service 127.0.0.1:9 --proxy-host-key-fingerprint "$FINGERPRINT" --keepalive 10s
wait_for "$DEMO/agent.log" "connected to proxy" 30 "the agent to connect"
kubectl --kubeconfig "$HOST_KC" wait --for=jsonpath='{.status.conditions[?(@.type=="AgentAvailable")].status}'=True \
  cluster/alpha --timeout=60s
kubectl --kubeconfig "$HOST_KC" get clusters

say "the seed flow: the kubeconfig the proxy wrote into the Cluster reaches the MEMBER"
echo "\$ kubectl get cluster alpha -o jsonpath='{.spec.connection.kubeconfig}' | base64 -d > config_alpha"
kubectl --kubeconfig "$HOST_KC" get cluster alpha -o jsonpath='{.spec.connection.kubeconfig}' | base64 -d >"$ROOT/config_alpha"
echo "\$ kubectl --kubeconfig config_alpha get ns"
kubectl --kubeconfig "$ROOT/config_alpha" get ns

cat <<EOT

Everything is running (logs in .demo/). Try:
  kubectl --kubeconfig config_alpha get ns -w               # a watch through the tunnel
  kubectl --kubeconfig $MEMBER_KC create ns hello           # ...and see it arrive
  kubectl --kubeconfig $HOST_KC get clusters              # AGENT column: is it connected?
  kill \$(cat .demo/agent.pid)                                # ...AGENT turns False
  curl -s http://127.0.0.1:$PROXY_PORT/metrics
Stop it all with: make demo-down
EOT
