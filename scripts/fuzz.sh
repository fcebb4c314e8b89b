#!/usr/bin/env bash
# Builds every fuzz target (fuzz, cargo-fuzz + libFuzzer with AddressSanitizer) and runs
# each for a while. CI runs it briefly; docs/fuzzing.md says how to run for hours.
#
#   scripts/fuzz.sh [--time SECS] [--jobs N] [TARGET ...]
#     --time SECS   how long each target runs (default 10)
#     --jobs N      parallel fuzzing processes per target (default 1)
#     TARGET        only these targets (default: all; `cargo fuzz list --fuzz-dir fuzz`)
#
# A crash, a timeout (a hang: 10 s on one input) or a leak fails the run; libFuzzer writes the
# input to fuzz/artifacts/TARGET/ and this script prints how to replay it. Corpora grow
# in fuzz/corpus/TARGET/ (not in git). The vhost_user_net target needs root (it creates
# its tap in a network namespace of its own).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
secs=10
jobs=1
targets=()
while [ $# -gt 0 ]; do
    case "$1" in
        --time) secs=$2; shift 2 ;;
        --jobs) jobs=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) targets+=("$1"); shift ;;
    esac
done

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
# cargo-fuzz builds with -Z flags (the sanitizer); a stable toolchain accepts them with this.
export RUSTC_BOOTSTRAP=1
# The workspace's release profile uses fat LTO, which drops the sanitizer-coverage symbols
# libFuzzer links against ("undefined symbol: __sancov_gen_"): fuzz builds go without it.
export CARGO_PROFILE_RELEASE_LTO=false CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16
cd "$root/fuzz"
export LSAN_OPTIONS="suppressions=$root/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
if [ "${#targets[@]}" -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir .)
fi
echo "== building ${#targets[@]} fuzz targets"
cargo fuzz build --fuzz-dir . -O
par=()
[ "$jobs" -le 1 ] || par=(-jobs="$jobs" -workers="$jobs")
fail=0
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${secs}s"
    mkdir -p "corpus/$t" "artifacts/$t"
    if ! cargo fuzz run --fuzz-dir . -O "$t" -- \
        -max_total_time="$secs" -timeout=10 -max_len=8192 -rss_limit_mb=4096 \
        "${par[@]}" -print_final_stats=1 >"artifacts/$t.log" 2>&1; then
        fail=1
        grep -E "ERROR|SUMMARY|Test unit written" "artifacts/$t.log" || tail -20 "artifacts/$t.log"
        echo "fuzz.sh: $t failed; replay: (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . -O $t artifacts/$t/<file>)" >&2
    else
        grep -E "^stat::number_of_executed_units|^stat::peak_rss_mb" "artifacts/$t.log" | tr '\n' ' '
        echo "corpus $(find "corpus/$t" -type f | wc -l) inputs"
    fi
done
exit "$fail"
