#!/bin/bash
# How long a CA folder's store takes to open (BENCHMARKS.md, "Opening a large store"): the
# offline open of `line list --dir`, then `serve` from its start to its listening line.
# Usage: store-open.sh CA_DIR (the CA must be stopped). Release binaries from $B (default: the
# workspace's target/release).
set -euo pipefail
DIR=${1:?usage: store-open.sh CA_DIR}
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
W=$(mktemp -d /tmp/store-open.XXXX)
SRV=
cleanup() {
    if [ -n "$SRV" ]; then kill -TERM "$SRV" 2>/dev/null || true; fi
    rm -rf "$W"
}
trap cleanup EXIT
s=$(date +%s.%N)
"$B/ca-server" line list --dir "$DIR" >/dev/null
e=$(date +%s.%N)
echo "line list --dir (offline open): $(echo "$e - $s" | bc) s"
s=$(date +%s.%N)
"$B/ca-server" serve --dir "$DIR" --https 127.0.0.1:0 --no-admin > "$W/serve.out" 2> "$W/serve.err" &
SRV=$!
until grep -q '^ca-server: listening' "$W/serve.out"; do
    kill -0 "$SRV" 2>/dev/null || { echo "ca-server serve exited:" >&2; cat "$W/serve.err" >&2; exit 1; }
    sleep 0.01
done
e=$(date +%s.%N)
echo "serve to its listening line: $(echo "$e - $s" | bc) s"
kill -TERM "$SRV"
wait "$SRV"
SRV=
