#!/usr/bin/env bash
# The simulator's full path on sled, then on PostgreSQL, round after round, for the
# same-sitting comparison of BENCHMARKS.md ("The simulator's full path on both stores"). With
# the environment of `eval "$(ca-server/scripts/test-postgres.sh start)"`:
#   simulator/scripts/full-path-ab.sh SIMULATOR DEVICES ROUND...
#   simulator/scripts/full-path-ab.sh target/release/simulator 100000 a b
# Each run: `/usr/bin/time -v SIMULATOR --devices N --quiet [--store URL --store-ca-file CA]
# --report OUT/report-STORE-ROUND`, its output kept as OUT/run-STORE-ROUND.out (OUT: a new
# temporary folder, printed first). Prints per run the UTC times, the cluster's CPU
# (ca-server/scripts/pg-cpu.sh), devices/s, the CA's peak memory and CPU, and the verdict.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
sim=${1:?usage: full-path-ab.sh SIMULATOR DEVICES ROUND...}
n=${2:?usage: full-path-ab.sh SIMULATOR DEVICES ROUND...}
shift 2
out=$(mktemp -d)
echo "output: $out"
for round in "$@"; do
  for st in sled pg; do
    args=()
    [ "$st" = pg ] && args=(--store "$IMPRINT_TEST_PG_URL" --store-ca-file "$IMPRINT_TEST_PG_CA")
    c0=$("$here/ca-server/scripts/pg-cpu.sh" "$IMPRINT_TEST_PG_DIR")
    t0=$(date -u +%H:%M:%S)
    /usr/bin/time -v "$sim" --devices "$n" --quiet "${args[@]}" --report "$out/report-$st-$round" \
      > "$out/run-$st-$round.out" 2>&1 || true
    c1=$("$here/ca-server/scripts/pg-cpu.sh" "$IMPRINT_TEST_PG_DIR")
    t1=$(date -u +%H:%M:%S)
    f="$out/run-$st-$round.out"
    echo "$round $st $t0-$t1 pgcpu $(echo "$c1-$c0" | bc) | $(grep -o '= [0-9]* devices/s' "$f" || true) | $(grep -o 'CA: peak memory [0-9.]* MiB, CPU [0-9.]* s' "$f" || true) | $(grep -o '^result: [A-Z]*' "$f" || true)"
  done
done
