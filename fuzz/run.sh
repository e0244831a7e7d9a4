#!/usr/bin/env bash
# Build every fuzz target, run each for a while on a scratch copy of its
# checked-in corpus, and print what each did. Exits non-zero on any crash,
# hang or leak of memory past the limit.
#
#   fuzz/run.sh                  20 seconds per target
#   fuzz/run.sh 60               60 seconds per target
#   fuzz/run.sh --minutes 10     10 minutes per target
#   fuzz/run.sh 60 circuit_relay vote      only these targets
#
# Targets run FUZZ_JOBS at a time (default: the number of cores); FUZZ_SEED
# fixes libFuzzer's seed (CI sets it, so that a run there mutates the same
# way each time; local runs explore from a fresh seed). Needs the
# nightly toolchain and cargo-fuzz (`cargo +nightly install cargo-fuzz`).
# A crash's input is kept in fuzz/artifacts/TARGET/; see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")"

secs=20
case "${1:-}" in
    --minutes) secs=$(( ${2:?--minutes needs a number} * 60 )); shift 2 ;;
    ''|*[!0-9]*) ;;
    *) secs=$1; shift ;;
esac

cargo +nightly fuzz build --sanitizer none
bin=target/x86_64-unknown-linux-gnu/release
if [ $# -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi
jobs=${FUZZ_JOBS:-$(nproc)}

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

run_one() {
    local t=$1
    mkdir -p "$scratch/corpus/$t" "artifacts/$t"
    if [ -d "corpus/$t" ]; then
        cp -r "corpus/$t/." "$scratch/corpus/$t/"
    fi
    local rc=0
    "$bin/$t" "$scratch/corpus/$t" \
        -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 \
        ${FUZZ_SEED:+-seed="$FUZZ_SEED"} \
        -print_final_stats=1 -artifact_prefix="artifacts/$t/" \
        >"$scratch/$t.log" 2>&1 || rc=$?
    echo "$rc" >"$scratch/$t.rc"
}

echo "fuzzing ${#targets[@]} targets, ${secs}s each, $jobs at a time"
for t in "${targets[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do
        wait -n || true
    done
    run_one "$t" &
done
wait

failed=0
printf '%-16s %12s %8s %8s %8s\n' target executions cov corpus crashes
for t in "${targets[@]}"; do
    log=$scratch/$t.log
    rc=$(cat "$scratch/$t.rc")
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o ' cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    corp=$(grep -o ' corp: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*' || true)
    crashes=0
    if [ "$rc" != 0 ]; then
        crashes=1
        failed=1
    fi
    printf '%-16s %12s %8s %8s %8s\n' "$t" "${execs:-?}" "${cov:-?}" "${corp:-?}" "$crashes"
done
if [ "$failed" != 0 ]; then
    for t in "${targets[@]}"; do
        if [ "$(cat "$scratch/$t.rc")" != 0 ]; then
            echo
            echo "== $t crashed; last lines of its log:"
            tail -40 "$scratch/$t.log"
            echo "reproduce: cd fuzz && cargo +nightly fuzz run -s none $t $(ls -t artifacts/$t/* 2>/dev/null | head -1)"
        fi
    done
    exit 1
fi
