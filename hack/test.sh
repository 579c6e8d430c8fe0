#!/usr/bin/env bash
# `make test`: every test in the workspace, two at a time.
#
# Two tests wait most of their time: a watch held open 5 minutes through
# idle gaps longer than every timeout on the path (tests/streams.rs), and
# two 75 s windows counting the host apiserver's writes (tests/steady_writes.rs).
# Run in turn with the rest, each would hold a test slot for minutes while
# the machine idles; so they run one after the other beside all the suites.
# Both runs use the one build made first (the same features, so nothing is
# rebuilt); cluster ports are locked across processes (tests/testkit/ports.rs).
set -uo pipefail

CARGO=${CARGO:-cargo}
# target:test, each an exact test name.
SOAKS=(
  streams:watch_stays_open_5_minutes_through_idle_periods
  steady_writes:steady_state_writes_do_not_grow_with_the_clusters
)

"$CARGO" test --workspace --release --no-run || exit 1

log=$(mktemp)
run_soaks() {
  local rc=0 soak out
  for soak in "${SOAKS[@]}"; do
    echo "==> ${soak%%:*}: ${soak#*:}"
    out=$("$CARGO" test --workspace --release --test "${soak%%:*}" -- --exact "${soak#*:}" 2>&1)
    local status=$?
    printf '%s\n' "$out"
    if [ "$status" -ne 0 ] || ! grep -q "test result: ok. 1 passed" <<<"$out"; then
      echo "FAILED: $soak (exit $status; if it was renamed, rename it here too)"
      rc=1
    fi
  done
  return $rc
}
run_soaks >"$log" 2>&1 &
soaks=$!
# An interrupted `make test` stops them too.
trap 'kill "$soaks" 2>/dev/null; rm -f "$log"' EXIT

skips=()
for soak in "${SOAKS[@]}"; do skips+=(--skip "${soak#*:}"); done
"$CARGO" test --workspace --release --no-fail-fast -- --test-threads=2 "${skips[@]}"
rest=$?

wait "$soaks"
soaks_rc=$?
echo "==> the soaks, run beside the suites above:"
cat "$log"
[ "$rest" -eq 0 ] && [ "$soaks_rc" -eq 0 ]
