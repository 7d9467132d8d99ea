#!/usr/bin/env bash
# A simulator run through a database failover: a PostgreSQL primary with a synchronous
# standby (test-postgres.sh), the embedded CA nodes on a multi-host URL that asks for the
# read-write server; KILL_AFTER seconds into the run the primary is killed with SIGKILL and,
# PROMOTE_AFTER seconds later, the standby promoted. The report's verification pass then reads
# the promoted database. Prints the report's summary and the longest time without a device
# finishing (from the report's throughput samples, taken every second).
#
#   simulator/scripts/failover-bench.sh DEVICES NODES [simulator flags...]
#
# KILL_AFTER (default 10) and PROMOTE_AFTER (default 1) in seconds. Needs
# target/release/simulator. Makes and removes its own two clusters.
set -euo pipefail
devices=${1:?usage: failover-bench.sh DEVICES NODES [flags...]}
nodes=${2:?usage: failover-bench.sh DEVICES NODES [flags...]}
shift 2
sim=${SIMULATOR:-target/release/simulator}
here=$(cd "$(dirname "$0")/../.." && pwd)
pg=$here/ca-server/scripts/test-postgres.sh
eval "$("$pg" start)"
primary=$IMPRINT_TEST_PG_DIR
eval "$("$pg" standby "$primary")"
standby=$IMPRINT_TEST_PG_STANDBY_DIR
trap '"$pg" stop "$primary"; "$pg" stop "$standby"' EXIT
url=${IMPRINT_TEST_PG_URL/\/imprint\?/,127.0.0.1:$IMPRINT_TEST_PG_STANDBY_PORT\/imprint?}
url="$url&target_session_attrs=read-write"
out=$(mktemp -d)
"$sim" --devices "$devices" --nodes "$nodes" --quiet --store "$url" \
  --store-ca-file "$IMPRINT_TEST_PG_CA" --report "$out" "$@" > "$out/summary.txt" 2>&1 &
simpid=$!
sleep "${KILL_AFTER:-10}"
"$pg" kill "$primary"
echo "primary killed at $(date +%T.%N | cut -c1-12)"
sleep "${PROMOTE_AFTER:-1}"
"$pg" promote "$standby"
echo "standby promoted at $(date +%T.%N | cut -c1-12)"
status=0
wait "$simpid" || status=$?
cat "$out/summary.txt"
python3 - "$out/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
t = r["throughput"]
gap, at, last_t, last_n = 0.0, 0.0, 0.0, 0
for (s, n) in t:
    if n > last_n:
        last_t, last_n = s, n
    elif s - last_t > gap:
        gap, at = s - last_t, last_t
print(f"longest time without a device finishing: {gap:.1f} s (from {at:.1f} s into the run)")
PY
rm -rf "$out"
exit "$status"
