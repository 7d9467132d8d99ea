#!/bin/bash
# Admin operations against a running CA holding 20,000 devices ($DEVICES) enrolled by the
# simulator (BENCHMARKS.md, "Operator surface"). Release binaries from $B (default: the
# workspace's target/release, after `cargo build --release --workspace`).
set -euo pipefail
DEVICES=${DEVICES:-20000}
SHOW=${SHOW:-12345}     # the device looked up, and the one revoked: serials of the run
REVOKE=${REVOKE:-777}
B=${B:-$(cd "$(dirname "$0")/../.." && pwd)/target/release}
W=$(mktemp -d /tmp/admin-measure.XXXX)
SRV=
cleanup() {
    if [ -n "$SRV" ]; then kill -TERM "$SRV" 2>/dev/null || true; fi
    rm -rf "$W"
}
trap cleanup EXIT
cd "$W"
"$B/ca-server" init --dir ca >/dev/null
"$B/line-station" keygen --out line --name line-m >/dev/null
"$B/ca-server" line add --dir ca --id line-m --public-key line/line-m.pub.pem --serials 1-100000 >/dev/null
"$B/ca-server" serve --dir ca --https 127.0.0.1:0 --coap 127.0.0.1:0 --mtls 127.0.0.1:0 --admin 127.0.0.1:0 > serve.out 2> serve.err &
SRV=$!
# Wait for the listening line (the store may take a moment to open), not a fixed time.
L=
for _ in $(seq 1 300); do
    L=$(grep -m1 '^ca-server: listening' serve.out || true)
    [ -n "$L" ] && break
    kill -0 "$SRV" 2>/dev/null || { echo "ca-server serve exited:" >&2; cat serve.err >&2; exit 1; }
    sleep 0.1
done
[ -n "$L" ] || { echo "no listening line from ca-server serve after 30 s" >&2; exit 1; }
COAP=$(echo "$L" | grep -o 'coap=[^ ]*' | cut -d= -f2)
MTLS=$(echo "$L" | grep -o 'mtls=[^ ]*' | cut -d= -f2)
ADMIN=$(echo "$L" | grep -o 'admin=[^ ]*' | cut -d= -f2)
# pipefail: a simulator run that fails stops the script here.
"$B/simulator" --ca "coap://$COAP" --mtls "https://$MTLS" --ca-cert ca/ca.pem --line-key line/line-m.key --line-id line-m --serials 1-100000 --devices "$DEVICES" --quiet --report rep | grep -E 'devices:|verification|result'
"$B/ca-server" operator add --dir ca ops >/dev/null
export IMPRINT_ADMIN=https://$ADMIN IMPRINT_OPERATOR_CERT=ca/operators/ops.pem IMPRINT_OPERATOR_KEY=ca/operators/ops.key.pem IMPRINT_CA_CERT=ca/ca.pem
t() { local s e; s=$(date +%s.%N); "$@" > "$W/out.txt"; e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) s: $*"; }
t "$B/ca-server" device show "$SHOW"
t "$B/ca-server" secrets rotate --all
t "$B/ca-server" audit verify
t "$B/ca-server" audit export
echo "audit lines: $(wc -l < "$W/out.txt")"
t "$B/ca-server" device revoke "$REVOKE"
t curl -sf --cacert ca/ca.pem --cert ca/operators/ops.pem --key ca/operators/ops.key.pem "https://$ADMIN/metrics"
kill -TERM "$SRV"
wait "$SRV"
SRV=
t "$B/ca-server" audit verify --dir ca
echo "store: $(du -sh ca/store | cut -f1)"
