#!/usr/bin/env bash
# `make demo-down`: stop what `make demo` started (keeps .demo/ data for the next run).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DEMO=${DEMO_DIR:-.demo}
for f in "$DEMO"/agent.pid "$DEMO"/proxy.pid "$DEMO"/member.pid "$DEMO"/host.pid; do
  [[ -f $f ]] || continue
  pid=$(cat "$f")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null
    echo "stopped $(basename "$f" .pid)"
  fi
  rm -f "$f"
done
rm -f "${DEMO_CONFIG:-config_alpha}"
