#!/bin/sh
# VM test of a virtio-blk disk, run inside the guest (busybox sh) as /test.sh:
#   scripts/mk-overlay.sh t.cpio.gz scripts/guest/blk-test.sh:/test.sh
#   scripts/run-guest.sh --overlay t.cpio.gz --blk /tmp/vub.sock --result result.txt
#
# Steps (BLK_TESTS, default "fio fs"):
#   fio   fio random writes with crc32c verify over the disk (direct I/O)
#   fs    mkfs.ext4, mount, write a random file, sync, umount, e2fsck, mount again, compare the
#         sha256; the file stays on the disk as /vhostbox-test.bin for the host to check
#   ro    the disk is read-only: writes to it fail, reads work (only when asked for)
#   read  print the sha256 of the first BLK_READ_BYTES (default: all) of the disk
# Result lines on /dev/ttyS1 (and the console):
#   RESULT fio-verify ok|fail      RESULT fs ok|fail       RESULT ro ok|fail
#   RESULT fs-file /vhostbox-test.bin sha256 HEX   RESULT read sha256 HEX
#   RESULT time STEP SECONDS       RESULT done            (always last)
#
# Configuration: environment variables, or the same NAME=value on the kernel command line
# (run-guest.sh --append "BLK_DEV=/dev/vdb BLK_FIO_SIZE=16M BLK_TESTS=ro,read"; lists take commas
# or spaces, a value with spaces needs double quotes on the kernel command line):
#   BLK_DEV=/dev/vda  BLK_TESTS="fio fs"  BLK_FIO_SIZE=32M  BLK_FIO_BS=4k  BLK_FIO_RW=randwrite
#   BLK_FIO_ENGINE=psync  BLK_FIO_IODEPTH=1  BLK_FIO_JOBS=1  BLK_FS_MB=4  BLK_READ_BYTES=
# shellcheck disable=SC3040 # busybox ash has pipefail
set -eu -o pipefail

cmdline=$(cat /proc/cmdline 2>/dev/null || true)
cfg() { # NAME DEFAULT: the environment, else NAME=value on the kernel command line, else DEFAULT
    _v=$(eval "printf '%s' \"\${$1:-}\"")
    if [ -z "$_v" ]; then
        for _w in $cmdline; do
            case "$_w" in "$1="*) _v=${_w#*=} ;; esac
        done
    fi
    printf '%s' "${_v:-$2}"
}

DEV=$(cfg BLK_DEV /dev/vda)
TESTS=$(cfg BLK_TESTS "fio fs")
FIO_SIZE=$(cfg BLK_FIO_SIZE 32M)
FIO_BS=$(cfg BLK_FIO_BS 4k)
FIO_RW=$(cfg BLK_FIO_RW randwrite)
FIO_ENGINE=$(cfg BLK_FIO_ENGINE psync)
FIO_IODEPTH=$(cfg BLK_FIO_IODEPTH 1)
FIO_JOBS=$(cfg BLK_FIO_JOBS 1)
FS_MB=$(cfg BLK_FS_MB 4)
READ_BYTES=$(cfg BLK_READ_BYTES "")
MNT=/mnt/blk
FILE=vhostbox-test.bin

result() {
    echo "RESULT $*"
    if [ -c /dev/ttyS1 ]; then echo "RESULT $*" >/dev/ttyS1; fi
}
now() { read -r _up _ </proc/uptime && echo "$_up"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
step() { echo; echo "=== blk-test: $*"; }

wait_dev() {
    _i=0
    while [ ! -b "$DEV" ] && [ "$_i" -lt 100 ]; do sleep 0.1; _i=$((_i + 1)); done
    [ -b "$DEV" ]
}

test_fio() {
    cd /tmp || return 1
    fio --name=verify --filename="$DEV" --rw="$FIO_RW" --bs="$FIO_BS" --size="$FIO_SIZE" \
        --verify=crc32c --verify_fatal=1 --verify_state_save=0 --ioengine="$FIO_ENGINE" \
        --iodepth="$FIO_IODEPTH" --numjobs="$FIO_JOBS" --direct=1 --group_reporting || return 1
}

test_fs() {
    mkdir -p "$MNT"
    mkfs.ext4 -q -F "$DEV" || return 1
    mount -t ext4 "$DEV" "$MNT" || return 1
    dd if=/dev/urandom of="/tmp/$FILE" bs=1M count="$FS_MB" 2>/dev/null || return 1
    cp "/tmp/$FILE" "$MNT/$FILE" || return 1
    _sum=$(sha256sum "/tmp/$FILE" | cut -d' ' -f1)
    sync
    umount "$MNT" || return 1
    # Nothing cached: the second mount reads what the device holds.
    blockdev --flushbufs "$DEV" 2>/dev/null || true
    echo 3 >/proc/sys/vm/drop_caches
    if command -v e2fsck >/dev/null; then
        e2fsck -fn "$DEV" || { echo "blk-test: e2fsck found errors"; return 1; }
    fi
    mount -t ext4 "$DEV" "$MNT" || return 1
    _got=$(sha256sum "$MNT/$FILE" | cut -d' ' -f1)
    cmp "/tmp/$FILE" "$MNT/$FILE" || return 1
    umount "$MNT" || return 1
    rm -f "/tmp/$FILE"
    echo "blk-test: wrote and read back $FS_MB MiB, sha256 $_sum"
    [ "$_sum" = "$_got" ] || return 1
    result "fs-file /$FILE sha256 $_sum"
}

test_ro() {
    _ro=$(cat "/sys/block/${DEV##*/}/ro" 2>/dev/null || echo "?")
    echo "blk-test: /sys/block/${DEV##*/}/ro = $_ro"
    [ "$_ro" = 1 ] || return 1
    dd if="$DEV" of=/dev/null bs=4k count=16 2>/dev/null || return 1
    if dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct 2>/dev/null; then
        echo "blk-test: a write to the read-only disk succeeded"
        return 1
    fi
}

test_read() {
    if [ -n "$READ_BYTES" ]; then
        _sum=$(head -c "$READ_BYTES" "$DEV" | sha256sum | cut -d' ' -f1) || return 1
    else
        _sum=$(sha256sum "$DEV" | cut -d' ' -f1) || return 1
    fi
    result "read sha256 $_sum"
}

run() { # FUNCTION RESULT-NAME
    step "$2"
    _t0=$(now)
    if "$1"; then _r=ok; else _r=fail; fi
    result "$2 $_r"
    result "time $2 $(since "$_t0")"
}

if wait_dev; then
    echo "blk-test: $DEV, $(($(cat "/sys/block/${DEV##*/}/size") / 2048)) MiB, tests: $TESTS"
    for t in $(echo "$TESTS" | tr ',' ' '); do
        case "$t" in
            fio) run test_fio fio-verify ;;
            fs) run test_fs fs ;;
            ro) run test_ro ro ;;
            read) run test_read read ;;
            *) echo "blk-test: unknown test '$t'"; result "$t fail" ;;
        esac
    done
else
    echo "blk-test: no block device $DEV"
    result "device fail $DEV missing"
fi
result "done"
