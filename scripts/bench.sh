#!/usr/bin/env bash
# Side-by-side benchmark of vhost-user-blk backends with no VM (see docs/benchmarks.md):
# vhostbox-blk (io-uring and sync engines) against qemu-storage-daemon's vhost-user-blk export,
# all driven by libblkio, contenders alternating over several rounds; medians and ratios.
#
#   scripts/bench.sh [--rounds N] [--secs S] [--only SUBSTR] [--out DIR]
# Default: 3 rounds of 3 s per workload, results in build/bench/ (results.md, results.csv,
# iops.svg). Release builds; the backends run jailed as shipped.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p vhostbox-blk -p vhostbox-tests --bins
exec target/release/vhostbox-bench "$@"
