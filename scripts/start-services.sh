#!/usr/bin/env bash
# Starts the services the tests use, if they are not running yet: virtlogd and libvirtd (from
# scripts/setup-host.sh's libvirt packages). systemd is not PID 1 on the build machines, so
# nothing else starts them. Idempotent; needs root.
#
# The NBD servers (qemu-nbd, nbdkit) are started by the NBD tests themselves, one per test
# on its own socket or port, and killed with it (a server the tests kill and restart cannot
# be a shared daemon); here they are only checked to run.
set -euo pipefail
log() { echo "start-services: $*" >&2; }
for t in qemu-nbd nbdkit; do
    if command -v "$t" >/dev/null; then
        log "$("$t" --version 2>&1 | head -1) (the NBD tests start their own)"
    else
        log "$t not installed (scripts/setup-host.sh installs it): the NBD tests will fail"
    fi
done
if [ "$(id -u)" != 0 ]; then
    log "not root: not starting libvirtd (the libvirt VM test will say so)"
    exit 0
fi
if ! command -v libvirtd >/dev/null; then
    log "libvirtd not installed (scripts/setup-host.sh installs it)"
    exit 0
fi
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
for _ in $(seq 50); do
    virsh -c qemu:///system version >/dev/null 2>&1 && exit 0
    sleep 0.2
done
log "libvirtd did not answer"
virsh -c qemu:///system version
