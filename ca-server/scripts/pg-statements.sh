#!/usr/bin/env bash
# What a simulator run makes PostgreSQL execute, read from pg_stat_statements: starts a cluster
# of its own (test-postgres.sh, with pg_stat_statements loaded), runs
#   SIMULATOR --devices N --quiet --store URL --store-ca-file CA --report REPORT_DIR
# against it, then prints the statements with the most execution time (calls, mean and total
# milliseconds, rows, the statement's first 110 characters), then those with the most planning
# time (how many times each was planned), and stops the cluster.
#   ca-server/scripts/pg-statements.sh target/release/simulator 20000 /tmp/pgstat-report
set -euo pipefail
sim=${1:?usage: pg-statements.sh SIMULATOR DEVICES REPORT_DIR}
devices=${2:?usage: pg-statements.sh SIMULATOR DEVICES REPORT_DIR}
report=${3:?usage: pg-statements.sh SIMULATOR DEVICES REPORT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
bin=/usr/lib/postgresql/15/bin
eval "$(IMPRINT_TEST_PG_OPTIONS='-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track_planning=on' "$here/test-postgres.sh" start)"
trap '"$here/test-postgres.sh" stop "$IMPRINT_TEST_PG_DIR" >/dev/null' EXIT
port=${IMPRINT_TEST_PG_URL##*:}; port=${port%%/*}
sql() {
  PGPASSWORD=$(cat "$IMPRINT_TEST_PG_DIR/superpw") "$bin/psql" -q -h 127.0.0.1 -p "$port" \
    -U postgres -d imprint -v ON_ERROR_STOP=1 "$@"
}
sql -c "CREATE EXTENSION pg_stat_statements"
echo "run: $(date -u +%H:%M:%S) UTC, $sim --devices $devices --quiet --store <cluster> --report $report"
out=$(mktemp)
rc=0
"$sim" --devices "$devices" --quiet --store "$IMPRINT_TEST_PG_URL" \
  --store-ca-file "$IMPRINT_TEST_PG_CA" --report "$report" >"$out" 2>&1 || rc=$?
grep -E '^(devices|CA:|verification|result)' "$out" || cat "$out"
rm -f "$out"
echo "end: $(date -u +%H:%M:%S) UTC"
[ "$rc" = 0 ] || { echo "pg-statements: the simulator exited with $rc" >&2; exit "$rc"; }
sql -P pager=off -c "SELECT calls, round(mean_exec_time::numeric, 3) AS mean_ms,
    round(total_exec_time::numeric) AS total_ms, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS statement
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'imprint')
  ORDER BY total_exec_time DESC LIMIT 12"
sql -P pager=off -c "SELECT plans, calls, round(total_plan_time::numeric) AS plan_ms,
    left(regexp_replace(query, '\s+', ' ', 'g'), 110) AS statement
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'imprint')
  ORDER BY total_plan_time DESC LIMIT 8"
