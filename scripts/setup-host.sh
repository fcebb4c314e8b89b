#!/usr/bin/env bash
# Installs what the tests and the demo need on a Debian bookworm machine (run as root):
# QEMU 10.x from bookworm-backports, busybox-static and fio for the guest initramfs, and the
# Debian guest kernel (downloaded, never installed). Idempotent.
#
#   scripts/setup-host.sh           what the tests need
#   scripts/setup-host.sh --bench   also DPDK's testpmd with its vhost and virtio PMDs (the
#                                   peer of scripts/bench.sh --net; heavy, not for the tests)
set -euo pipefail
bench=0
[ "${1:-}" = --bench ] && bench=1

log() { echo "setup-host: $*" >&2; }

if [ "$(id -u)" != 0 ]; then
    log "must run as root (apt-get install)"; exit 1
fi

export DEBIAN_FRONTEND=noninteractive

# bookworm-backports from the machine's own Debian source: reuse its URI, add the suite.
src=/etc/apt/sources.list.d/debian.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    if [ -f "$src" ]; then
        uri=$(awk '/^URIs:/ {print $2; exit}' "$src")
    else
        uri=$(awk '$1=="deb" && $3=="bookworm" {print $2; exit}' /etc/apt/sources.list)
    fi
    [ -n "$uri" ] || { log "cannot find the Debian mirror URI in $src"; exit 1; }
    cat > /etc/apt/sources.list.d/vhostbox-backports.sources <<SRC
Types: deb
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

apt-get update -qq

need_qemu=1
if command -v qemu-system-x86_64 >/dev/null; then
    v=$(qemu-system-x86_64 --version | awk 'NR==1 {print $4}')
    case "$v" in 1[0-9].*) need_qemu=0 ;; esac
fi
if [ "$need_qemu" = 1 ]; then
    log "installing QEMU from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-system-common qemu-system-data qemu-utils >/dev/null
fi

# libvirt 11 from bookworm-backports, to match QEMU 10 (the libvirt VM test).
if ! command -v libvirtd >/dev/null || ! libvirtd --version | grep -q ' 1[1-9]\.'; then
    log "installing libvirt from bookworm-backports"
    apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        libvirt-daemon libvirt-clients libvirt-daemon-driver-qemu >/dev/null
fi

pkgs=()
# systemd: systemd-socket-activate and systemd-analyze for the service tests (not run as init).
# python3-prometheus-client: the OpenMetrics parser the metrics tests check the exposition with.
# libnbd0: what --nbd loads at run time; nbdkit: an NBD server the NBD tests use (with
# qemu-nbd, from qemu-utils).
for p in busybox-static fio cpio xz-utils e2fsprogs iproute2 kmod libaio1 systemd \
    python3-prometheus-client libnbd0 nbdkit; do
    dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
done
if [ "$bench" = 1 ]; then
    for p in dpdk-dev librte-net-vhost23 librte-net-virtio23 librte-mempool-ring23; do
        dpkg -s "$p" >/dev/null 2>&1 || pkgs+=("$p")
    done
fi
if [ "${#pkgs[@]}" -gt 0 ]; then
    log "installing ${pkgs[*]}"
    apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
fi
# cargo-deb: scripts/build-deb.sh packages the workspace with it (the package test unpacks it).
if ! command -v cargo-deb >/dev/null; then
    log "installing cargo-deb"
    cargo install cargo-deb --locked --version 3.8.0 >/dev/null 2>&1
fi
qemu-system-x86_64 --version | head -1 >&2
