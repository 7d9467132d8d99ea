#!/usr/bin/env bash
# 1, 2 and 3 embedded CA nodes on one PostgreSQL, alternated, in one sitting: devices/s from the
# simulator's report, each node's CPU per device (the report), and the database's CPU per
# device, read from /proc: every server process's user + system time plus what the postmaster
# collected from the backends that exited (cutime + cstime), before and after each run.
#
#   eval "$(ca-server/scripts/test-postgres.sh start)"
#   simulator/scripts/nodes-bench.sh DEVICES ROUNDS [TRANSPORT] [simulator flags...]
#
# Needs target/release/simulator (cargo build --release -p simulator) and the
# IMPRINT_TEST_PG_* environment of test-postgres.sh. Prints one line per run.
set -euo pipefail
devices=${1:?usage: nodes-bench.sh DEVICES ROUNDS [TRANSPORT] [flags...]}
rounds=${2:?usage: nodes-bench.sh DEVICES ROUNDS [TRANSPORT] [flags...]}
transport=${3:-coap}
shift 3 || shift $#
sim=${SIMULATOR:-target/release/simulator}
: "${IMPRINT_TEST_PG_DIR:?run eval \"\$(ca-server/scripts/test-postgres.sh start)\" first}"
ticks=$(getconf CLK_TCK)

pg_cpu() {
  local pm
  pm=$(head -1 "$IMPRINT_TEST_PG_DIR/data/postmaster.pid")
  {
    # The postmaster: its own time and its reaped children's (fields 14-17 of stat).
    awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$pm/stat"
    for p in $(pgrep -P "$pm"); do
      awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat" 2>/dev/null || true
    done
  } | awk -v t="$ticks" '{ s += $1 } END { printf "%.2f", s / t }'
}

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
echo "nodes devices/s db_cpu_us_per_device node_cpu_us_per_device(each) verdict"
for r in $(seq "$rounds"); do
  for n in 1 2 3; do
    before=$(pg_cpu)
    "$sim" --devices "$devices" --transport "$transport" --nodes "$n" --quiet \
      --store "$IMPRINT_TEST_PG_URL" --store-ca-file "$IMPRINT_TEST_PG_CA" \
      --report "$out/r$r-n$n" "$@" > "$out/r$r-n$n.txt" 2>&1 || true
    after=$(pg_cpu)
    python3 - "$out/r$r-n$n/report.json" "$before" "$after" "$n" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
ok = max(r["devices_ok"], 1)
db = (float(sys.argv[3]) - float(sys.argv[2])) * 1e6 / ok
nodes = " ".join(f'{n["cpu_seconds"] * 1e6 / ok:.0f}' for n in r["ca_nodes"])
print(f'{sys.argv[4]} {r["devices_per_second"]:.0f} {db:.0f} {nodes} {"PASSED" if r["verdict"]["passed"] else "FAILED"}')
PY
  done
done
