#!/bin/bash
# Admin operations against a running CA holding 20,000 devices enrolled by the simulator.
set -e
B=/work/main/target/release
W=$(mktemp -d /tmp/admin-measure.XXXX)
cd $W
$B/ca-server init --dir ca >/dev/null
$B/line-station keygen --out line --name line-m >/dev/null
$B/ca-server line add --dir ca --id line-m --public-key line/line-m.pub.pem --serials 1-100000 >/dev/null
$B/ca-server serve --dir ca --https 127.0.0.1:0 --coap 127.0.0.1:0 --mtls 127.0.0.1:0 --admin 127.0.0.1:0 > serve.out 2> serve.err &
SRV=$!
sleep 1
L=$(head -1 serve.out)
COAP=$(echo "$L" | grep -o 'coap=[^ ]*' | cut -d= -f2)
MTLS=$(echo "$L" | grep -o 'mtls=[^ ]*' | cut -d= -f2)
ADMIN=$(echo "$L" | grep -o 'admin=[^ ]*' | cut -d= -f2)
$B/simulator --ca coap://$COAP --mtls https://$MTLS --ca-cert ca/ca.pem --line-key line/line-m.key --line-id line-m --serials 1-100000 --devices 20000 --quiet --report rep | grep -E 'devices:|verification'
$B/ca-server operator add --dir ca ops >/dev/null
export IMPRINT_ADMIN=https://$ADMIN IMPRINT_OPERATOR_CERT=ca/operators/ops.pem IMPRINT_OPERATOR_KEY=ca/operators/ops.key.pem IMPRINT_CA_CERT=ca/ca.pem
t() { local s=$(date +%s.%N); "$@" > /tmp/admin-out.txt; local e=$(date +%s.%N); echo "$(echo "$e - $s" | bc) s: $*"; }
t $B/ca-server device show 12345
t $B/ca-server secrets rotate --all
t $B/ca-server audit verify
t $B/ca-server audit export
echo "audit lines: $(wc -l < /tmp/admin-out.txt)"
t $B/ca-server device revoke 777
t curl -s --cacert ca/ca.pem --cert ca/operators/ops.pem --key ca/operators/ops.key.pem https://$ADMIN/metrics
kill -TERM $SRV; wait $SRV || true
t $B/ca-server audit verify --dir ca
echo "store: $(du -sh ca/store | cut -f1)"
rm -rf $W
