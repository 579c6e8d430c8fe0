#!/usr/bin/env bash
# `make test`: every test in the workspace, two at a time.
#
# One test is a soak that sleeps most of its 5 minutes (tests/streams.rs: a
# watch held open through two idle gaps longer than every timeout on the
# path). After the rest of its suite it would run alone, one test slot idle,
# for about four minutes; so it runs beside all the suites instead.
# Both runs use the one build made first (the same features, so nothing is
# rebuilt); cluster ports are locked across processes (tests/testkit/ports.rs).
set -uo pipefail

CARGO=${CARGO:-cargo}
SOAK=watch_stays_open_5_minutes_through_idle_periods

"$CARGO" test --workspace --release --no-run || exit 1

log=$(mktemp)
"$CARGO" test --workspace --release --test streams -- --exact "$SOAK" >"$log" 2>&1 &
soak=$!
# An interrupted `make test` stops the soak too.
trap 'kill "$soak" 2>/dev/null; rm -f "$log"' EXIT

"$CARGO" test --workspace --release --no-fail-fast -- --test-threads=2 --skip "$SOAK"
rest=$?

wait "$soak"
soak_rc=$?
echo "==> $SOAK (tests/streams.rs), run beside the suites above:"
cat "$log"
if [ "$soak_rc" -eq 0 ] && ! grep -q "test result: ok. 1 passed" "$log"; then
  echo "FAILED: no test named $SOAK ran (renamed? then rename it here too)"
  soak_rc=1
elif [ "$soak_rc" -ne 0 ]; then
  echo "FAILED: $SOAK (exit $soak_rc)"
fi
[ "$rest" -eq 0 ] && [ "$soak_rc" -eq 0 ]
