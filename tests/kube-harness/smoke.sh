#!/usr/bin/env bash
# Smoke test of bin/kube-harness (needs kubectl): start, use, stop, restart
# with the same dir, two harnesses at once. Prints timings and RSS.
#   tests/kube-harness/smoke.sh [path/to/kube-harness]
set -euo pipefail

BIN=${1:-$(cd "$(dirname "$0")/../.." && pwd)/bin/kube-harness}
WORK=$(mktemp -d /tmp/kube-harness-smoke.XXXXXX)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
fail() { echo "FAIL: $*" >&2; exit 1; }

# start NAME: runs the harness on $WORK/NAME, waits for its line on stdout.
start() {
	local name=$1 dir=$WORK/$1 out=$WORK/$1.out t0
	rm -f "$out"
	: >"$out"
	t0=$(now)
	"$BIN" --dir "$dir" >"$out" 2>"$WORK/$name.err" &
	local pid=$!
	PIDS+=("$pid")
	eval "PID_$name=$pid"
	local deadline=$((SECONDS + 200))
	until [[ -s $out ]]; do
		kill -0 "$pid" 2>/dev/null || { cat "$WORK/$name.err" >&2; fail "$name exited before ready"; }
		((SECONDS < deadline)) || fail "$name not ready"
		sleep 0.05
	done
	local line
	line=$(cat "$out")
	[[ $line == "ready $dir/kubeconfig" ]] || fail "$name printed: $line"
	echo "$name: ready in $(since "$t0")s, RSS $(ps -o rss= -p "$pid") KiB"
}

# stop NAME: SIGTERM, expects exit 0 within 10 s and no process left.
stop() {
	local name=$1 pid t0
	pid=$(eval "echo \$PID_$name")
	t0=$(now)
	kill -TERM "$pid"
	local rc=0
	timeout 10 tail --pid="$pid" -f /dev/null || fail "$name still running 10 s after SIGTERM"
	wait "$pid" || rc=$?
	[[ $rc == 0 ]] || fail "$name exited $rc"
	pgrep -f -- "--dir $WORK/$name\$" >/dev/null && fail "$name left a process"
	[[ $(wc -l <"$WORK/$name.out") == 1 ]] || fail "$name printed more than one line on stdout"
	echo "$name: stopped in $(since "$t0")s, exit 0"
}

k() { kubectl --kubeconfig "$WORK/$1/kubeconfig" "${@:2}"; }

start h1
[[ $(k h1 get --raw /readyz) == ok ]] || fail "/readyz"
k h1 version | grep -q '^Server Version: v1\.' || fail "server version"
[[ $(k h1 auth can-i '*' '*') == yes ]] || fail "can-i"
k h1 create ns foo >/dev/null
k h1 get ns foo >/dev/null
stop h1

start h1
k h1 get ns foo >/dev/null || fail "namespace foo lost across restart"

start h2
k h2 get ns foo >/dev/null 2>&1 && fail "h2 sees h1's data"
k h2 create ns bar >/dev/null
k h1 get ns bar >/dev/null 2>&1 && fail "h1 sees h2's data"
stop h1
stop h2
echo "kube-harness smoke: 1 passed, 0 failed"
