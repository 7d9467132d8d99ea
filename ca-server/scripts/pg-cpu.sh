#!/usr/bin/env bash
# CPU seconds used so far by the PostgreSQL cluster of a test-postgres.sh folder: the
# postmaster's own time, its reaped children's (finished backends) and its live children's.
#   ca-server/scripts/pg-cpu.sh "$IMPRINT_TEST_PG_DIR"
set -euo pipefail
dir=${1:?usage: pg-cpu.sh CLUSTER_DIR}
pm=$(head -1 "$dir/data/postmaster.pid"); tck=$(getconf CLK_TCK)
tot=$(awk '{print $14+$15+$16+$17}' "/proc/$pm/stat")
for c in $(pgrep -P "$pm"); do
  t=$(awk '{print $14+$15}' "/proc/$c/stat" 2>/dev/null || echo 0); tot=$((tot + t))
done
echo "scale=2; $tot/$tck" | bc
