#!/usr/bin/env bash
# Boots the guest from scripts/build-guest.sh under QEMU (TCG), optionally with vhost-user disks
# and NICs. The guest's /init runs /test.sh or /demo.sh (from an --overlay, see
# scripts/mk-overlay.sh) or else gives a shell on the console, then powers off.
#
#   scripts/run-guest.sh [options] [-- extra QEMU arguments]
#     --guest-dir DIR      kernel + initramfs (default: build/guest under the repo root)
#     --overlay FILE       cpio.gz appended to the initramfs (repeatable)
#     --blk SOCKET         a vhost-user-blk-pci disk on that socket (repeatable: vda, vdb, ...)
#     --blk-queues Q       queues per disk (default 2)
#     --net SOCKET         a virtio-net-pci NIC on a vhost-user netdev at that socket (repeatable)
#     --net-queues Q       queue pairs per NIC (default 1)
#     --net-mtu N          MTU the NICs offer the guest (host_mtu=; the backend must offer
#                          VIRTIO_NET_F_MTU too, e.g. vhostbox-net --mtu N)
#     --reconnect-ms N     QEMU reconnects to a backend socket N ms after losing it (vhost-user
#                          blk and net then survive a backend restart; default: no reconnect)
#     --mem MB             guest RAM, a shared memfd (default 512; at least 320: the initramfs
#                          unpacks to ~90 MB into a tmpfs capped at half the RAM)
#     --cpus N             vCPUs (default 1)
#     --tcg-threads single|multi
#                          one TCG thread for all vCPUs (default) or one per vCPU. QEMU 10.0's
#                          multi-threaded TCG can abort in iotlb_to_section() ("Assertion
#                          `section_index < d->map.sections_nb' failed") when one vCPU changes
#                          the memory map (SeaBIOS programming BARs) while another is in an MMIO
#                          access; seen once in CI, so the tests use one thread
#     --console FILE       console (ttyS0) to FILE instead of stdout
#     --result FILE        result channel (ttyS1) to FILE (default: discarded)
#     --timeout SECS       kill QEMU after SECS and exit 124 (default 300; 0: none)
#     --bios FILE          firmware (default QEMU's SeaBIOS; "qboot.rom" boots as fast and prints
#                          nothing on the console)
#     --append ARGS        extra kernel command line (e.g. "vbshell=1", or VAR=value: it lands in
#                          the environment of /init and so of /test.sh)
#     --dry-run            print the QEMU command and exit
#
# Exit status: QEMU's (0 after the guest powered off), 124 on timeout. A kernel panic also ends
# in exit 0 (panic=-1 + -no-reboot): tests judge by their result lines (e.g. "RESULT done"); /init
# itself writes "RESULT init fail ..." there when a module or the initramfs failed to load.
# On a terminal the console is multiplexed with the QEMU monitor (Ctrl-A X quits, Ctrl-A C: the
# monitor); otherwise QEMU's stdin is /dev/null and /init powers off rather than wait at a shell.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
die() { echo "run-guest: $*" >&2; exit 2; }

guest_dir=$root/build/guest
overlays=()
blks=()
nets=()
blk_queues=2
net_queues=1
net_mtu=""
reconnect=""
mem=512
cpus=1
tcg_threads=single
console=""
result=""
timeout_s=300
append=""
bios=""
dry_run=0
extra=()

need() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
    case "$1" in
        --guest-dir) need "$@"; guest_dir=$2; shift 2 ;;
        --overlay) need "$@"; overlays+=("$2"); shift 2 ;;
        --blk) need "$@"; blks+=("$2"); shift 2 ;;
        --blk-queues) need "$@"; blk_queues=$2; shift 2 ;;
        --net) need "$@"; nets+=("$2"); shift 2 ;;
        --net-queues) need "$@"; net_queues=$2; shift 2 ;;
        --net-mtu) need "$@"; net_mtu=$2; shift 2 ;;
        --reconnect-ms) need "$@"; reconnect=$2; shift 2 ;;
        --mem) need "$@"; mem=$2; shift 2 ;;
        --cpus) need "$@"; cpus=$2; shift 2 ;;
        --tcg-threads) need "$@"; tcg_threads=$2; shift 2 ;;
        --console) need "$@"; console=$2; shift 2 ;;
        --result) need "$@"; result=$2; shift 2 ;;
        --timeout) need "$@"; timeout_s=$2; shift 2 ;;
        --append) [ $# -ge 2 ] || die "--append needs a value"; append=$2; shift 2 ;;
        --bios) need "$@"; bios=$2; shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage 0 ;;
        --) shift; extra=("$@"); break ;;
        *) echo "run-guest: unknown argument: $1" >&2; usage 2 ;;
    esac
done

for v in blk_queues net_queues mem cpus timeout_s ${reconnect:+reconnect}; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "${v//_/-} must be a number, not '${!v}'"
done
if [ "$blk_queues" -lt 1 ] || [ "$net_queues" -lt 1 ] || [ "$mem" -lt 320 ] || [ "$cpus" -lt 1 ]; then
    die "queues and cpus must be >= 1, mem >= 320 (MB)"
fi
case $tcg_threads in single|multi) ;; *) die "--tcg-threads: single or multi, not '$tcg_threads'" ;; esac

kernel=$guest_dir/vmlinux
initrd=$guest_dir/initramfs.cpio.gz
if [ ! -f "$kernel" ] || [ ! -f "$initrd" ]; then
    die "no guest in $guest_dir: run scripts/build-guest.sh (or pass --guest-dir)"
fi
for o in "${overlays[@]}"; do [ -f "$o" ] || die "overlay $o not found"; done
for s in "${blks[@]}" "${nets[@]}"; do [ -S "$s" ] || die "$s is not a socket (is the backend running?)"; done
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (run scripts/setup-host.sh)"

tmp=""
trap '[ -z "$tmp" ] || rm -rf "$tmp"' EXIT
if [ "${#overlays[@]}" -gt 0 ]; then
    # Concatenated compressed cpio archives: the kernel unpacks each in turn over the last.
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/vhostbox-run.XXXXXX")
    cat "$initrd" "${overlays[@]}" >"$tmp/initrd"
    initrd=$tmp/initrd
fi

cmd=(qemu-system-x86_64
    -nodefaults -nographic -no-reboot
    -accel "tcg,thread=$tcg_threads" -cpu max -smp "$cpus"
    -m "${mem}M"
    -object "memory-backend-memfd,id=mem,size=${mem}M,share=on"
    -machine "q35,memory-backend=mem"
    -kernel "$kernel" -initrd "$initrd")
[ -z "$bios" ] || cmd+=(-bios "$bios")

# ttyS0: the console; ttyS1: the result channel. The order of -serial is the order of ttyS*.
interactive=0
if [ -n "$console" ]; then
    cmd+=(-chardev "file,id=con,path=$console" -serial chardev:con)
elif [ -t 0 ] && [ -t 1 ]; then
    interactive=1
    cmd+=(-serial mon:stdio)
else
    cmd+=(-chardev "stdio,id=con,signal=off" -serial chardev:con)
fi
# No one can type into the console: /init powers off instead of waiting at a shell.
kargs="console=ttyS0 quiet panic=-1"
[ "$interactive" = 1 ] || kargs="$kargs vbnoshell=1"
cmd+=(-append "$kargs${append:+ $append}")
if [ -n "$result" ]; then
    cmd+=(-chardev "file,id=res,path=$result" -serial chardev:res)
else
    cmd+=(-serial null)
fi

i=0
for s in "${blks[@]}"; do
    cmd+=(-chardev "socket,id=blk$i,path=$s${reconnect:+,reconnect-ms=$reconnect}"
        -device "vhost-user-blk-pci,chardev=blk$i,num-queues=$blk_queues")
    i=$((i + 1))
done
i=0
for s in "${nets[@]}"; do
    cmd+=(-chardev "socket,id=net$i,path=$s${reconnect:+,reconnect-ms=$reconnect}"
        -netdev "vhost-user,id=net$i,chardev=net$i,queues=$net_queues"
        -device "virtio-net-pci,netdev=net$i,mq=on,vectors=$((2 * net_queues + 2)),mac=$(printf '52:54:00:76:62:%02x' "$i")${net_mtu:+,host_mtu=$net_mtu}")
    i=$((i + 1))
done
cmd+=("${extra[@]}")

if [ "$dry_run" = 1 ]; then
    for a in "${cmd[@]}"; do
        if [[ $a =~ ^[A-Za-z0-9_,.:=/+@%-]+$ ]]; then printf '%s ' "$a"; else printf '%q ' "$a"; fi
    done
    echo
    exit 0
fi

rc=0
if [ "$interactive" = 1 ]; then
    to=()
    [ "$timeout_s" -gt 0 ] && to=(timeout --foreground --kill-after=10 "$timeout_s")
    "${to[@]}" "${cmd[@]}" || rc=$?
else
    # Not on a terminal: QEMU must not read it (a background job would stop on SIGTTIN).
    to=()
    [ "$timeout_s" -gt 0 ] && to=(timeout --kill-after=10 "$timeout_s")
    "${to[@]}" "${cmd[@]}" </dev/null || rc=$?
fi
if [ "$timeout_s" -gt 0 ] && { [ "$rc" = 124 ] || [ "$rc" = 137 ]; }; then
    echo "run-guest: timed out after ${timeout_s}s" >&2
    rc=124
fi
exit "$rc"
