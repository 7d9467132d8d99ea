#!/usr/bin/env bash
# Runs one built fuzz target for up to RUNS executions or SECS seconds, under nice, from its
# seeds and regressions, and prints the figures RELIABILITY.md records (start and end times,
# executions, executions per second). Build first:
#   cargo +nightly fuzz build --fuzz-dir fuzz -s none -a [--features server] [TARGET]
# Usage: fuzz/run-long.sh TARGET [RUNS] [SECS]   (env TARGET_DIR: cargo-fuzz's target dir)
set -euo pipefail
cd "$(dirname "$0")/.."
t=$1 runs=${2:-10000000} secs=${3:-3600}
bin=${TARGET_DIR:-fuzz/target}/x86_64-unknown-linux-gnu/release/$t
mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
dirs=("fuzz/corpus/$t" "fuzz/seeds/$t")
[ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
start=$(date -u +%FT%TZ); s0=$(date +%s)
set +e
nice -n 19 "$bin" "${dirs[@]}" -runs="$runs" -max_total_time="$secs" -print_final_stats=1 \
  -artifact_prefix="fuzz/artifacts/$t/" >"fuzz/artifacts/$t.log" 2>&1
rc=$?
set -e
end=$(date -u +%FT%TZ); s1=$(date +%s)
execs=$(grep -E '^stat::number_of_executed_units' "fuzz/artifacts/$t.log" | awk '{print $2}')
echo "$t: rc=$rc executions=${execs:-?} start=$start end=$end seconds=$((s1 - s0)) exec/s=$(( ${execs:-0} / (s1 - s0 > 0 ? s1 - s0 : 1) ))"
grep -E '^(==[0-9]+== ERROR|thread .* panicked|SUMMARY|artifact_prefix|Test unit written)' "fuzz/artifacts/$t.log" | head -5 || true
