#!/usr/bin/env bash
# CI's short fuzzing pass over every target (the CA server's included), in two steps so that the
# build can run beside the test suite:
#   fuzz/ci-smoke.sh build   installs cargo-fuzz and the nightly toolchain if missing, and builds
#                            every target (release, debug assertions, no sanitizer), at nice 19
#   fuzz/ci-smoke.sh run     runs each target IMPRINT_CI_FUZZ_SECS seconds (default 5) from its
#                            committed seeds and regressions; a crash or a broken harness rule
#                            fails it, and its input is left in fuzz/artifacts/TARGET/
# Target folder: IMPRINT_FUZZ_TARGET_DIR (default fuzz/target). Run from anywhere in the
# repository. RELIABILITY.md, "Fuzzing", has what the targets check and the long runs.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${IMPRINT_FUZZ_TARGET_DIR:-fuzz/target}
targets=(coap_datagram admin_body enroll_request_cbor enroll_request_json factory_token csr compact_response secret_ack)
case "${1:-}" in
  build)
    # Lowest CPU and idle I/O priority: beside the tests, it takes only what they leave.
    low=(nice -n 19 ionice -c 3)
    start=$(date +%s)
    command -v cargo-fuzz >/dev/null 2>&1 || "${low[@]}" cargo install cargo-fuzz --locked --quiet
    rustup toolchain list | grep -q '^nightly' || rustup toolchain install nightly --profile minimal
    "${low[@]}" cargo +nightly fuzz build --fuzz-dir fuzz -s none -a --features server \
      --target-dir "$dir"
    echo "ci: fuzz targets built in $(($(date +%s) - start)) s"
    ;;
  run)
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    for t in "${targets[@]}"; do
      mkdir -p "$work/$t" "fuzz/artifacts/$t"
      dirs=("$work/$t" "fuzz/seeds/$t")
      [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
      if ! "$dir/x86_64-unknown-linux-gnu/release/$t" "${dirs[@]}" \
          -max_total_time="${IMPRINT_CI_FUZZ_SECS:-5}" -print_final_stats=1 \
          -artifact_prefix="fuzz/artifacts/$t/" >"$work/$t.log" 2>&1; then
        tail -n 60 "$work/$t.log" >&2
        echo "ci: fuzz target $t failed (its input is in fuzz/artifacts/$t/)" >&2
        exit 1
      fi
      execs=$(grep -E '^stat::number_of_executed_units' "$work/$t.log" | awk '{print $2}')
      echo "ci: fuzz $t: ${execs:-?} executions in ${IMPRINT_CI_FUZZ_SECS:-5} s, no crash"
    done
    ;;
  *)
    echo "usage: fuzz/ci-smoke.sh build|run" >&2
    exit 2
    ;;
esac
