#!/usr/bin/env bash
# A short fuzzing pass: each protocol-spec / device-agent target for a few seconds
# (IMPRINT_CI_FUZZ_SECS, default 5) from its committed seeds and regressions; a crash fails.
# Not yet called by .ci/run (RELIABILITY.md, "Not done yet", says why). Run from the repository's
# top folder: fuzz/ci-smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# Fuzzing, briefly: each protocol-spec / device-agent target for a few seconds from its committed
# seeds and regressions (RELIABILITY.md, "Fuzzing", says what this covers and what was run by
# hand). The CA server's targets are left out here: building ca-server with libFuzzer's
# instrumentation would add more than the time CI has to spare; the seeds and regressions of
# every target, theirs included, are replayed on stable by ca-server/tests/fuzz_corpus.rs in
# the test command above.
echo "ci: fuzz targets (cargo-fuzz, nightly), ${IMPRINT_CI_FUZZ_SECS:-5} s each"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
fuzz_work=$(mktemp -d)
for t in enroll_request_cbor enroll_request_json factory_token csr compact_response secret_ack; do
  mkdir -p "$fuzz_work/$t"
  dirs=("$fuzz_work/$t" "fuzz/seeds/$t")
  [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
  if ! cargo +nightly fuzz run --fuzz-dir fuzz -s none -a "$t" "${dirs[@]}" -- \
      -max_total_time="${IMPRINT_CI_FUZZ_SECS:-5}" -print_final_stats=1 >"$fuzz_work/$t.log" 2>&1; then
    tail -n 60 "$fuzz_work/$t.log" >&2
    echo "ci: fuzz target $t failed (its input is in fuzz/artifacts/$t)" >&2
    exit 1
  fi
  grep -E '^stat::number_of_executed_units' "$fuzz_work/$t.log" | sed "s/^/ci: $t /" || true
done
rm -rf "$fuzz_work"
