#!/usr/bin/env bash
# Builds the Debian package of vhostbox with cargo-deb: target/debian/vhostbox_VERSION_ARCH.deb
# holds the release binaries (vhostbox-blk, vhostbox-net, vhostboxctl), their man pages
# (generated from the clap definitions by vhostbox-mangen), the systemd template units, the
# vhost-user.json descriptors for /usr/share/qemu/vhost-user/ and the main docs.
#
#   scripts/build-deb.sh                 build it (installs cargo-deb if missing)
#   dpkg -i target/debian/vhostbox_*.deb install it
#
# The package metadata is [package.metadata.deb] in backends/blk/Cargo.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v cargo-deb >/dev/null; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install cargo-deb --locked
fi
cargo build --release -p vhostbox-blk -p vhostbox-net -p vhostbox-common --bins
man=target/release/man
rm -rf "$man"
cargo run -q -p vhostbox-tests --bin vhostbox-mangen -- "$man" >/dev/null
gzip -9n "$man"/*.1
rm -f target/debian/vhostbox_*.deb
cargo deb -p vhostbox-blk --no-build -q
ls target/debian/vhostbox_*.deb
