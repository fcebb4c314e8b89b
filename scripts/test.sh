#!/usr/bin/env bash
# The full test run: formatting, lints, unit tests, protocol tests against the real binaries
# (libblkio as the frontend), and VM tests (QEMU boots a Linux guest whose own virtio drivers
# use the backends). Run from anywhere; needs what scripts/setup-host.sh installs.
#
#   scripts/test.sh            everything
#   VHOSTBOX_SKIP_VM=1 scripts/test.sh    everything but the VM tests (they say so loudly)
#   VHOSTBOX_FUZZ_SECS=N scripts/test.sh  run each fuzz target N seconds (default 10; 0: skip)
set -euo pipefail
cd "$(dirname "$0")/.."

# A fresh machine: install what the tests need (idempotent; .ci/run has done it already).
if [ "${VHOSTBOX_SETUP_DONE:-0}" != 1 ] && [ "$(id -u)" = 0 ]; then
    echo "== host setup (scripts/setup-host.sh)"
    scripts/setup-host.sh
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy --workspace --all-targets \
    --features vhostbox-blk/jail-probe,vhostbox-net/jail-probe -- -D warnings
echo "== cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "== build"
cargo build --workspace --bins
echo "== test-only jail-probe build (never shipped: target/jail-probe)"
cargo build -p vhostbox-blk -p vhostbox-net --features vhostbox-blk/jail-probe,vhostbox-net/jail-probe \
    --target-dir target/jail-probe
echo "== Debian package (scripts/build-deb.sh; tests/tests/deb.rs unpacks it)"
scripts/build-deb.sh
if [ "${VHOSTBOX_SKIP_VM:-0}" != 1 ]; then
    echo "== guest image"
    scripts/build-guest.sh build/guest
fi
echo "== services the tests use (libvirtd)"
scripts/start-services.sh
echo "== cargo test"
cargo test --workspace --no-fail-fast -- --test-threads="${VHOSTBOX_TEST_THREADS:-2}"
fuzz_secs=${VHOSTBOX_FUZZ_SECS:-10}
if [ "$fuzz_secs" != 0 ]; then
    echo "== fuzz targets, ${fuzz_secs}s each (docs/fuzzing.md)"
    scripts/fuzz.sh --time "$fuzz_secs"
fi
