#!/usr/bin/env bash
# Runs simulator builds one after the other on one store and prints, per run, the UTC times,
# devices/s, the CA's CPU and (PostgreSQL) the cluster's CPU: the A/B of BENCHMARKS.md's
# PostgreSQL section. With the environment of `eval "$(ca-server/scripts/test-postgres.sh start)"`:
#   simulator/scripts/store-ab.sh 10000 pg|sled SIMULATOR_BINARY...
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
n=${1:?usage: store-ab.sh DEVICES pg|sled BIN...}; st=${2:?}; shift 2
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
cpu() { if [ "$st" = pg ]; then "$here/ca-server/scripts/pg-cpu.sh" "$IMPRINT_TEST_PG_DIR"; else echo 0; fi; }
for b in "$@"; do
  args=()
  [ "$st" = pg ] && args=(--store "$IMPRINT_TEST_PG_URL" --store-ca-file "$IMPRINT_TEST_PG_CA")
  c0=$(cpu); t0=$(date -u +%H:%M:%S)
  "$b" --devices "$n" --quiet "${args[@]}" --report "$out/report" > "$out/run.out" 2>&1 || true
  c1=$(cpu); t1=$(date -u +%H:%M:%S)
  rate=$(grep -o "= [0-9]* devices/s" "$out/run.out" || true)
  ca=$(grep -o "CA: peak memory [0-9.]* MiB, CPU [0-9.]* s" "$out/run.out" || true)
  res=$(grep -o "^result: [A-Z]*" "$out/run.out" || true)
  echo "$t0-$t1 $(basename "$b") $st $rate | $ca | pg cpu $(echo "$c1-$c0" | bc) s | $res"
done
