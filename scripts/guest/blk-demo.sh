#!/bin/sh
# Demo of a virtio-blk disk, run inside the guest (busybox sh) as /demo.sh: shows what the guest
# sees of the disk (size, block size, virtio features, queues), runs a short verified fio, makes
# an ext4 file system and writes and reads a file on it.
#   scripts/mk-overlay.sh d.cpio.gz scripts/guest/blk-demo.sh:/demo.sh
#   scripts/run-guest.sh --overlay d.cpio.gz --blk /tmp/vub.sock --result summary.txt
# The summary goes to the console and to /dev/ttyS1 (lines "DEMO ..."; "DEMO done" is last).
# BLK_DEV (environment or kernel command line) picks the disk; default /dev/vda.
# shellcheck disable=SC3040 # busybox ash has pipefail
set -u -o pipefail

cmdline=$(cat /proc/cmdline 2>/dev/null || true)
DEV=${BLK_DEV:-}
if [ -z "$DEV" ]; then
    for w in $cmdline; do case "$w" in BLK_DEV=*) DEV=${w#*=} ;; esac; done
fi
DEV=${DEV:-/dev/vda}
NAME=${DEV##*/}
SYS=/sys/block/$NAME
MNT=/mnt/demo

say() {
    echo "  $*"
    if [ -c /dev/ttyS1 ]; then echo "DEMO $*" >/dev/ttyS1; fi
}
title() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
human() { # BYTES -> e.g. 64.0 MiB
    awk -v b="$1" 'BEGIN { split("B KiB MiB GiB TiB", u); i = 1
        while (b >= 1024 && i < 5) { b /= 1024; i++ } printf "%.1f %s", b, u[i] }'
}

# virtio-blk feature bits (virtio spec 5.2.3) and the transport ones (6).
feature_name() {
    case "$1" in
        1) echo SIZE_MAX ;; 2) echo SEG_MAX ;; 4) echo GEOMETRY ;; 5) echo RO ;;
        6) echo BLK_SIZE ;; 9) echo FLUSH ;; 10) echo TOPOLOGY ;; 11) echo CONFIG_WCE ;;
        12) echo MQ ;; 13) echo DISCARD ;; 14) echo WRITE_ZEROES ;; 15) echo LIFETIME ;;
        16) echo SECURE_ERASE ;; 17) echo ZONED ;;
        28) echo INDIRECT_DESC ;; 29) echo EVENT_IDX ;; 32) echo VERSION_1 ;;
        33) echo ACCESS_PLATFORM ;; 34) echo RING_PACKED ;; 35) echo IN_ORDER ;;
        36) echo ORDER_PLATFORM ;; 37) echo SR_IOV ;; 38) echo NOTIFICATION_DATA ;;
        *) echo "bit$1" ;;
    esac
}

i=0
while [ ! -b "$DEV" ] && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b "$DEV" ]; then
    title "no disk"
    say "no $DEV: start the guest with a vhost-user-blk disk (run-guest.sh --blk SOCKET)"
    say "done"
    exit 1
fi

title "the disk: $DEV"
sectors=$(cat "$SYS/size")
say "size: $(human $((sectors * 512))) ($sectors sectors of 512 bytes)"
say "block size: logical $(cat "$SYS/queue/logical_block_size"), physical $(cat "$SYS/queue/physical_block_size"), min I/O $(cat "$SYS/queue/minimum_io_size")"
say "read-only: $([ "$(cat "$SYS/ro")" = 1 ] && echo yes || echo no), write cache: $(cat "$SYS/queue/write_cache" 2>/dev/null || echo ?)"
serial=$(cat "$SYS/serial" 2>/dev/null || true)
[ -n "$serial" ] && say "serial: $serial"
dmax=$(cat "$SYS/queue/discard_max_bytes" 2>/dev/null || echo 0)
wzmax=$(cat "$SYS/queue/write_zeroes_max_bytes" 2>/dev/null || echo 0)
say "discard: $([ "$dmax" -gt 0 ] && echo "up to $(human "$dmax")" || echo no), write zeroes: $([ "$wzmax" -gt 0 ] && echo "up to $(human "$wzmax")" || echo no)"
queues=$(find "$SYS/mq" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l)
say "queues in use: $queues on $(nproc) vCPU(s) (the driver uses at most one per vCPU)"

vdev=$(readlink -f "$SYS/device")
if [ -r "$vdev/features" ]; then
    bits=$(cat "$vdev/features")
    names=""
    n=0
    while [ -n "$bits" ]; do
        b=${bits%"${bits#?}"}
        bits=${bits#?}
        [ "$b" = 1 ] && names="$names $(feature_name "$n")"
        n=$((n + 1))
    done
    say "negotiated virtio features:$names"
fi

title "fio: 8 MiB of random 4k writes at queue depth 8 with crc32c verify, then 5 s of random reads"
cd /tmp || exit 1
ok_fio=fail
common="--filename=$DEV --bs=4k --size=8M --ioengine=libaio --iodepth=8 --direct=1 --eta=never"
# shellcheck disable=SC2086 # $common is a list of options
if fio --name=demo-write --rw=randwrite $common --verify=crc32c --verify_fatal=1 \
    --verify_state_save=0 --output=/tmp/fio-w.txt &&
    fio --name=demo-read --rw=randread $common --runtime=5 --time_based --output=/tmp/fio-r.txt; then
    ok_fio=ok
fi
iops() { # FILE KIND -> "IOPS=..., BW=..." of fio's "  KIND: IOPS=9752, BW=38.1MiB/s (...)" line
    sed -n "s/^ *$2: \(IOPS=[^,]*\), \(BW=[^ ]*\).*/\1, \2/p" "$1" 2>/dev/null | head -n 1
}
say "fio random write:  $(iops /tmp/fio-w.txt write)"
say "fio verify (read): $(iops /tmp/fio-w.txt read)"
say "fio random read:   $(iops /tmp/fio-r.txt read)"
say "fio verify: $ok_fio"

title "ext4: make, mount, write a file, remount, read it back"
ok_fs=fail
mkdir -p "$MNT"
if mkfs.ext4 -q -F "$DEV" && mount -t ext4 "$DEV" "$MNT"; then
    df -h "$MNT" | tail -n 1 | while read -r _ size used avail _; do
        say "file system: $size, $used used, $avail free"
    done
    dd if=/dev/urandom of="$MNT/hello.bin" bs=1M count=4 2>/dev/null
    echo "hello from the guest, $(date)" >"$MNT/hello.txt"
    want=$(sha256sum "$MNT/hello.bin" | cut -d' ' -f1)
    sync
    umount "$MNT"
    echo 3 >/proc/sys/vm/drop_caches
    if mount -t ext4 "$DEV" "$MNT"; then
        got=$(sha256sum "$MNT/hello.bin" | cut -d' ' -f1)
        say "wrote 4 MiB, sha256 ${want%"${want#????????????????}"}...; read back ${got%"${got#????????????????}"}..."
        say "$MNT/hello.txt: $(cat "$MNT/hello.txt")"
        [ "$want" = "$got" ] && ok_fs=ok
        umount "$MNT"
    fi
fi
say "file system: $ok_fs"

ok_net=none
if [ -d /sys/class/net/eth0 ]; then
    title "the NIC: eth0 (virtio_net on vhostbox-net)"
    ok_net=fail
    ip link set eth0 up && ip addr add 10.78.0.2/24 dev eth0
    say "mac $(cat /sys/class/net/eth0/address), mtu $(cat /sys/class/net/eth0/mtu), $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l) queue pair(s)"
    f=$(cat /sys/class/net/eth0/device/features)
    bit() { [ "$(echo "$f" | cut -c$(($1 + 1)))" = 1 ] && printf ' %s' "$2"; }
    say "negotiated:$(bit 0 CSUM)$(bit 1 GUEST_CSUM)$(bit 7 GUEST_TSO4)$(bit 11 HOST_TSO4)$(bit 15 MRG_RXBUF)$(bit 22 MQ)$(bit 29 EVENT_IDX)$(bit 32 VERSION_1)"
    if out=$(ping -c 3 -W 5 10.78.0.1 2>&1); then
        ok_net=ok
        say "ping 10.78.0.1 (the tap's host end): $(echo "$out" | tail -n 1)"
    fi
    say "network: $ok_net"
fi

title "summary"
say "disk $(human $((sectors * 512))), $queues queue(s), fio verify $ok_fio, ext4 $ok_fs, network $ok_net"
say "done"
[ "$ok_fio" = ok ] && [ "$ok_fs" = ok ] && [ "$ok_net" != fail ]
