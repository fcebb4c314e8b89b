#!/usr/bin/env bash
# The main job, end to end: build vhostbox-blk and vhostbox-net, start them jailed (their
# default) on a fresh disk image and on a tap in a private network namespace, show the jail
# from the outside, boot a small Linux guest under QEMU whose stock virtio_blk and virtio_net
# drivers use them, and show what the guest did and what landed in the image. While the guest
# runs fio, the demo SIGKILLs the disk's jailed worker three times: the supervisor replaces it,
# QEMU reconnects, the requests that were in flight are resubmitted, and fio's verify passes.
#
#   scripts/demo.sh            (as root on Debian bookworm; installs QEMU 10 and the guest
#                               pieces with scripts/setup-host.sh on first use)
# Everything it makes is under build/demo/ (image, socket, backend log, guest console).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/build/demo

bold() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

have_host() {
    command -v qemu-system-x86_64 >/dev/null &&
        qemu-system-x86_64 --version | awk 'NR==1 {exit !($4 ~ /^1[0-9]\./)}' &&
        command -v busybox >/dev/null && command -v fio >/dev/null && command -v debugfs >/dev/null
}
if ! have_host; then
    bold "installing QEMU 10, busybox, fio (scripts/setup-host.sh)"
    scripts/setup-host.sh
fi

bold "building vhostbox-blk and vhostbox-net (release)"
cargo build --release --bins -q
bin=$root/target/release/vhostbox-blk

bold "building the guest (Debian kernel + busybox/fio initramfs)"
scripts/build-guest.sh build/guest

rm -rf "$out"
mkdir -p "$out"
img=$out/disk.img
sock=$out/blk.sock
truncate -s 256M "$img"

bold "starting vhostbox-blk, jailed"
echo "\$ vhostbox-blk --socket-path $sock --image $img --num-queues 2 --serial demo-disk0"
"$bin" --socket-path "$sock" --image "$img" --num-queues 2 --serial demo-disk0 \
    2>"$out/blk.log" &
sup=$!
cleanup() {
    if kill -TERM "$sup" 2>/dev/null; then wait "$sup" 2>/dev/null || true; fi
    if [ -n "${netsup:-}" ] && kill -TERM "$netsup" 2>/dev/null; then wait "$netsup" 2>/dev/null || true; fi
    ip netns del "$netns" 2>/dev/null || true
}
netns=vhostbox-demo-$$
trap cleanup EXIT
for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.05; done
[ -S "$sock" ] || { cat "$out/blk.log"; echo "demo: the backend did not start" >&2; exit 1; }
worker=""
for _ in $(seq 100); do worker=$(pgrep -P "$sup" | head -n 1 || true); [ -n "$worker" ] && break; sleep 0.05; done

echo "supervisor pid $sup (holds the socket and the image), jailed worker pid $worker"
if [ -n "$worker" ]; then
    echo "worker /proc/$worker/status:"
    grep -E '^(Uid|Gid|Groups|CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs|Seccomp):' \
        "/proc/$worker/status" | sed 's/^/    /'
    echo "worker namespaces that differ from this shell's:"
    for ns in user mnt pid net ipc uts cgroup; do
        a=$(readlink "/proc/$worker/ns/$ns"); b=$(readlink "/proc/self/ns/$ns")
        [ "$a" != "$b" ] && echo "    $ns: $a (host $b)"
    done
    echo "worker's root directory: [$(find "/proc/$worker/root/" -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null)] (empty)"
    echo "worker's open files:"
    for fd in /proc/"$worker"/fd/*; do
        echo "    ${fd##*/} -> $(readlink "$fd")"
    done
fi

bold "starting vhostbox-net, jailed, on a tap in a private network namespace"
netsock=$out/net.sock
ip netns add "$netns"
echo "\$ ip netns exec $netns vhostbox-net --socket-path $netsock --tap vbxdemo0 --queue-pairs 2"
ip netns exec "$netns" "$root/target/release/vhostbox-net" --socket-path "$netsock" --tap vbxdemo0 \
    --queue-pairs 2 2>"$out/net.log" &
netsup=$!
for _ in $(seq 200); do [ -S "$netsock" ] && ip netns exec "$netns" ip link show vbxdemo0 >/dev/null 2>&1 && break; sleep 0.05; done
ip netns exec "$netns" ip addr add 10.78.0.1/24 dev vbxdemo0
ip netns exec "$netns" ip link set vbxdemo0 up
echo "host end of the tap: $(ip netns exec "$netns" ip -brief addr show vbxdemo0)"

# During the guest's fio: kill the disk's worker three times, a second apart.
killer() {
    for _ in $(seq 600); do grep -q "== fio" "$out/console.txt" 2>/dev/null && break; sleep 0.1; done
    for k in 1 2 3; do
        sleep 1
        w=$(pgrep -P "$sup" | head -n 1 || true)
        [ -n "$w" ] || continue
        kill -KILL "$w" 2>/dev/null && echo "kill $k: worker $w SIGKILLed during the guest's fio" >>"$out/kills.txt"
    done
}

bold "booting the guest on them (QEMU, TCG, reconnect-ms=200); the guest's output follows"
scripts/mk-overlay.sh "$out/demo.cpio.gz" scripts/guest/blk-demo.sh:/demo.sh
killer &
killerpid=$!
scripts/run-guest.sh --overlay "$out/demo.cpio.gz" --blk "$sock" --blk-queues 2 --cpus 2 \
    --net "$netsock" --net-queues 2 --reconnect-ms 200 \
    --result "$out/summary.txt" --console "$out/console.txt" --timeout 300 || true
kill "$killerpid" 2>/dev/null || true
wait "$killerpid" 2>/dev/null || true
sed -n '/== the disk/,$p' "$out/console.txt" | grep -v -E '^\[ *[0-9]+\.[0-9]+\]' || true

bold "what the guest reported"
sed 's/^DEMO /    /' "$out/summary.txt"

bold "crash safety: the disk's worker was killed under the guest's fio"
if [ -s "$out/kills.txt" ]; then
    sed 's/^/    /' "$out/kills.txt"
    echo "    the supervisor replaced each one: $(grep -c 'replacing worker' "$out/blk.log") replacement(s);"
    echo "    requests resubmitted from the in-flight region: $(grep -o 'resubmitting [0-9]*' "$out/blk.log" | awk '{n += $2} END {print n + 0}')"
    echo "    the guest's fio verify: $(sed -n 's/^DEMO fio verify: //p' "$out/summary.txt" | head -n 1) (no I/O error reached the guest)"
else
    echo "    (no kill happened: the guest's fio was not reached)"
fi

bold "on the host: the guest's ext4 file system, read from the image"
debugfs -R "ls -l /" "$img" 2>/dev/null | sed 's/^/    /'
debugfs -R "cat /hello.txt" "$img" 2>/dev/null | sed 's/^/    hello.txt: /'

bold "the backends' logs"
cleanup
trap - EXIT
sed 's/^/    /' "$out/blk.log"
sed 's/^/    /' "$out/net.log"

if grep -q "DEMO done" "$out/summary.txt" && ! grep -q "fail" "$out/summary.txt"; then
    bold "demo ok: the guest used a disk and a NIC served by jailed vhostbox-blk and vhostbox-net"
else
    bold "demo FAILED: see $out/console.txt and $out/blk.log"
    exit 1
fi
