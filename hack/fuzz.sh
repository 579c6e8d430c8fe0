#!/usr/bin/env bash
# `make fuzz`: libFuzzer (libfuzzer-sys) on the stable toolchain. cargo-fuzz
# needs nightly only for its sanitizers; the coverage instrumentation libFuzzer
# steers by is stable codegen flags, given here. --target keeps them off build
# scripts. Each target in fuzz/fuzz_targets runs FUZZ_SECS seconds from the
# corpus in target/fuzz/corpus/NAME; a failing input is kept in
# target/fuzz/artifacts/NAME/ and fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECS:-60}
triple=$(rustc -vV | awk '$1 == "host:" { print $2 }')
out=${CARGO_TARGET_DIR:-$PWD/target}/fuzz
export CARGO_TARGET_DIR=$out/build
RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
  cargo build --manifest-path fuzz/Cargo.toml --release --target "$triple" --bins
for src in fuzz/fuzz_targets/*.rs; do
  name=$(basename "$src" .rs)
  mkdir -p "$out/corpus/$name" "$out/artifacts/$name"
  echo ">> fuzzing $name for ${secs}s"
  "$CARGO_TARGET_DIR/$triple/release/$name" -max_total_time="$secs" -print_final_stats=1 \
    -artifact_prefix="$out/artifacts/$name/" "$out/corpus/$name" 2>&1 |
    grep -E '^(stat::number_of_executed_units|stat::new_units_added|==|SUMMARY|panicked|thread)' || true
  if compgen -G "$out/artifacts/$name/*" > /dev/null; then
    echo "fuzz: $name found failing inputs in $out/artifacts/$name/" >&2
    exit 1
  fi
done
