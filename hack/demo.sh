#!/usr/bin/env bash
# `make demo`: two local Kubernetes control planes (host and member), the proxy
# and an agent, and kubectl reaching the MEMBER through the tunnel. Everything
# stays running; `make demo-down` stops it. State lives in .demo/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
# DEMO_DIR, PROXY_PORT and DEMO_CONFIG (where alpha's kubeconfig goes) let
# tests/demo.rs run it beside other tests.
DEMO=${DEMO_DIR:-$ROOT/.demo}
BIN=$ROOT/bin
PROXY_PORT=${PROXY_PORT:-18080}
CONFIG_ALPHA=${DEMO_CONFIG:-$ROOT/config_alpha}
KUBECTL=${KUBECTL:-$(command -v kubectl || echo "$BIN/kubectl")}
[[ -x $KUBECTL ]] || { echo "demo: kubectl not found: install it (or set KUBECTL=/path/to/kubectl)" >&2; exit 1; }
kubectl() { "$KUBECTL" "$@"; }

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
echo "proxy SSH host key: $FINGERPRINT (kept in Secret kubesphere-system/tower-proxy; join-command pins it)"

say "joining the member with one line: proxy join-command (docs/join.md)"
echo "\$ proxy join-command --cluster alpha --create | kubectl --context member apply -f -"
"$BIN/proxy" join-command --kubeconfig "$HOST_KC" --cluster alpha --create \
  --publish-service-address "127.0.0.1:$PROXY_PORT" >"$DEMO/join.yaml.tmp"
# The manifest holds alpha's token: only this user may read it.
chmod 600 "$DEMO/join.yaml.tmp" && mv "$DEMO/join.yaml.tmp" "$DEMO/join.yaml"
kubectl --kubeconfig "$MEMBER_KC" apply -f "$DEMO/join.yaml"

say "running the agent the way the member's kubelet would run Deployment tower-agent"
# The harness runs no kubelet, so the Deployment's own command line runs
# here, with the pod's files and the in-cluster apiserver address swapped for
# local ones and the member's kubeconfig standing in for the service account.
umask 077
kubectl --kubeconfig "$MEMBER_KC" -n kubesphere-system get secret tower-agent-token \
  -o jsonpath='{.data.token}' | base64 -d >"$DEMO/alpha.token"
MEMBER_ADDR=$(kubectl --kubeconfig "$MEMBER_KC" config view --minify -o jsonpath='{.clusters[0].cluster.server}')
MEMBER_ADDR=${MEMBER_ADDR#https://}
mapfile -t COMMAND < <(kubectl --kubeconfig "$MEMBER_KC" -n kubesphere-system get deploy tower-agent \
  -o jsonpath='{range .spec.template.spec.containers[0].command[*]}{@}{"\n"}{end}')
[[ ${COMMAND[0]:-} == /bin/agent ]] || { echo "demo: unexpected agent command: ${COMMAND[*]}" >&2; exit 1; }
ARGS=()
for a in "${COMMAND[@]:1}"; do
  case $a in
  /etc/tower/token) ARGS+=("$DEMO/alpha.token") ;;
  kubernetes.default.svc:443) ARGS+=("$MEMBER_ADDR") ;;
  *) ARGS+=("$a") ;;
  esac
done
echo "agent ${ARGS[*]}"
start agent "$DEMO/agent.log" "$BIN/agent" "${ARGS[@]}" --kubeconfig "$MEMBER_KC"
wait_for "$DEMO/agent.log" "connected to proxy" 30 "the agent to connect"
kubectl --kubeconfig "$HOST_KC" wait --for=jsonpath='{.status.conditions[?(@.type=="AgentAvailable")].status}'=True \
  cluster/alpha --timeout=60s
kubectl --kubeconfig "$HOST_KC" get clusters

say "the seed flow: the kubeconfig the proxy wrote into the Cluster reaches the MEMBER"
echo "\$ kubectl get cluster alpha -o jsonpath='{.spec.connection.kubeconfig}' | base64 -d > $CONFIG_ALPHA"
kubectl --kubeconfig "$HOST_KC" get cluster alpha -o jsonpath='{.spec.connection.kubeconfig}' | base64 -d >"$CONFIG_ALPHA"
echo "\$ kubectl --kubeconfig $CONFIG_ALPHA get ns"
kubectl --kubeconfig "$CONFIG_ALPHA" get ns

cat <<EOT

Everything is running (logs in $DEMO/). Try:
  kubectl --kubeconfig $CONFIG_ALPHA get ns -w               # a watch through the tunnel
  kubectl --kubeconfig $MEMBER_KC create ns hello           # ...and see it arrive
  kubectl --kubeconfig $HOST_KC get clusters              # AGENT column: is it connected?
  kill \$(cat $DEMO/agent.pid)                                # ...AGENT turns False
  curl -s http://127.0.0.1:$PROXY_PORT/metrics
Stop it all with: make demo-down
EOT
