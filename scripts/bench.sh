#!/usr/bin/env bash
# Side-by-side benchmark of vhost-user-blk backends with no VM (see docs/benchmarks.md):
# vhostbox-blk (io-uring and sync engines) against qemu-storage-daemon's vhost-user-blk export,
# all driven by libblkio, contenders alternating over several rounds; medians and ratios.
#
#   scripts/bench.sh [--rounds N] [--secs S] [--only SUBSTR] [--out DIR]
# Default: 3 rounds of 3 s per workload, results in build/bench/ (results.md, results.csv,
# iops.svg). Release builds; the backends run jailed as shipped. VHOSTBOX_BENCH_ARGS adds flags
# to the vhostbox-blk contenders (e.g. "--poll-max-us 0"). VHOSTBOX_BENCH_BASELINE=PATH adds
# another vhostbox-blk binary (an earlier build) as two more contenders, for before/after runs.
#
#   scripts/bench.sh --net [--rounds N] [--secs S] [--only tx64,rx1500,..] [--no-testpmd]
#                          [--out FILE.md]
# The packet benchmark of vhostbox-net against DPDK testpmd's vhost PMD (installed first if
# missing, with scripts/setup-host.sh --bench; needs root for the network namespace).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --net ]; then
    shift
    if ! command -v dpdk-testpmd >/dev/null && [[ " $* " != *" --no-testpmd "* ]]; then
        scripts/setup-host.sh --bench
    fi
    cargo build --release -q -p vhostbox-net -p vhostbox-bench --bins
    VHOSTBOX_BIN_DIR=target/release exec target/release/vhostbox-netbench "$@"
fi
cargo build --release -q -p vhostbox-blk -p vhostbox-bench --bins
exec target/release/vhostbox-bench "$@"
