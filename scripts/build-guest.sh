#!/usr/bin/env bash
# Builds the small Linux guest the VM tests and the demo boot under QEMU.
#
#   scripts/build-guest.sh [OUTDIR]        OUTDIR defaults to build/guest (under the repo root)
#   VHOSTBOX_GUEST_REBUILD=1 scripts/build-guest.sh     rebuild even when the outputs are fresh
#   VHOSTBOX_GUEST_KERNEL_PKG=linux-image-6.1.0-NN-amd64 ...   use that kernel package
#
# Outputs:
#   OUTDIR/vmlinux             uncompressed ELF kernel (QEMU boots it through PVH: fast); if the
#                              extraction from the bzImage fails it is a copy of the bzImage
#   OUTDIR/bzImage             Debian's compressed kernel, as shipped
#   OUTDIR/initramfs.cpio.gz   busybox, fio + its libraries, mke2fs/e2fsck, the virtio and ext4 modules
#                              (load order in /etc/modules.order) and /init (scripts/guest/init)
#   OUTDIR/kernel.release      the kernel version, e.g. 6.1.0-NN-amd64
#   OUTDIR/cache/              the downloaded kernel .deb
#
# The kernel comes from Debian's linux-image-amd64 (its real linux-image-6.1.0-NN-amd64 package),
# fetched with `apt-get download` and unpacked with `dpkg-deb -x`: never installed. Needs
# busybox-static, fio, e2fsprogs, kmod, cpio, xz-utils (scripts/setup-host.sh installs them).
# Nothing is redone when the outputs are newer than this script and scripts/guest/init.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
out=${1:-$root/build/guest}
init_src=$here/guest/init

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

# The modules the guest loads; their dependencies are added. crc32c_generic provides the
# "crypto-crc32c" that ext4 and jbd2 softdep on (metadata checksums).
MODULES=(
    virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
    virtio_blk failover net_failover virtio_net
    crc16 crc32c_generic libcrc32c mbcache jbd2 ext4
)

mkdir -p "$out"
out=$(cd "$out" && pwd)

fresh() {
    local f
    [ "${VHOSTBOX_GUEST_REBUILD:-0}" = 1 ] && return 1
    for f in vmlinux initramfs.cpio.gz kernel.release; do
        [ -s "$out/$f" ] || return 1
        [ "$out/$f" -nt "$here/build-guest.sh" ] && [ "$out/$f" -nt "$init_src" ] || return 1
    done
}
if fresh; then
    log "up to date: $out (VHOSTBOX_GUEST_REBUILD=1 to redo)"
    exit 0
fi
# One build at a time per OUTDIR (tests may start several); the one that waited may find it done.
exec 9>"$out/.lock"
if command -v flock >/dev/null; then
    flock 9
    if fresh; then
        log "up to date: $out (built meanwhile)"
        exit 0
    fi
fi

for tool in apt-get apt-cache dpkg-deb modinfo cpio gzip xz file ldd; do
    command -v "$tool" >/dev/null || die "$tool not found (run scripts/setup-host.sh)"
done
[ -x /bin/busybox ] || die "/bin/busybox not found (busybox-static; run scripts/setup-host.sh)"
busybox_bin=/bin/busybox
file -L "$busybox_bin" | grep -q 'statically linked' || die "$busybox_bin is not static (install busybox-static)"
fio_bin=$(command -v fio) || die "fio not found (run scripts/setup-host.sh)"
mke2fs_bin=$(PATH=/usr/sbin:/sbin:$PATH command -v mke2fs) || die "mke2fs not found (e2fsprogs)"
e2fsck_bin=$(PATH=/usr/sbin:/sbin:$PATH command -v e2fsck) || die "e2fsck not found (e2fsprogs)"

work=$(mktemp -d "${TMPDIR:-/tmp}/vhostbox-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# ---------------------------------------------------------------------------------------------
# Kernel package: resolve linux-image-amd64 to the real package, download it into the cache.
cache=$out/cache
mkdir -p "$cache"
apt_opts=()
[ "$(id -u)" = 0 ] && apt_opts+=(-o APT::Sandbox::User=root)

kpkg=${VHOSTBOX_GUEST_KERNEL_PKG:-}
if [ -z "$kpkg" ]; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^<?linux-image-[0-9]/ { gsub(/[<>]/, "", $2); print $2; exit }') || true
fi
deb=""
if [ -n "$kpkg" ]; then
    for cand in "$kpkg" "${kpkg%-unsigned}-unsigned"; do
        deb=$(find "$cache" -maxdepth 1 -name "${cand}_*.deb" | sort | tail -n 1)
        [ -n "$deb" ] && break
        log "downloading $cand"
        if (cd "$cache" && apt-get download "${apt_opts[@]}" "$cand" >&2); then
            deb=$(find "$cache" -maxdepth 1 -name "${cand}_*.deb" | sort | tail -n 1)
            [ -n "$deb" ] && break
        fi
    done
fi
if [ -z "$deb" ]; then
    # Offline or apt-cache lost the package: any kernel cached earlier will do.
    deb=$(find "$cache" -maxdepth 1 -name 'linux-image-*.deb' | sort | tail -n 1)
    [ -n "$deb" ] || die "cannot resolve/download the kernel package (linux-image-amd64 -> '${kpkg:-?}')"
    log "using the cached $deb"
fi
log "kernel package: ${deb##*/}"
dpkg-deb -x "$deb" "$work/kpkg"

vmlinuz=$(find "$work/kpkg/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
[ -n "$vmlinuz" ] || die "no /boot/vmlinuz-* in ${deb##*/}"
kver=${vmlinuz##*/vmlinuz-}
kmods=$work/kpkg/lib/modules/$kver
[ -d "$kmods" ] || die "no lib/modules/$kver in ${deb##*/}"
log "kernel $kver"

# ---------------------------------------------------------------------------------------------
# vmlinux: the ELF inside the bzImage. The setup header gives the payload's place (boot protocol
# >= 2.08: payload_offset at 0x248, payload_length at 0x24c, relative to the protected-mode code
# at (setup_sects + 1) * 512); failing that, scan for compressor magics like the kernel's
# scripts/extract-vmlinux. The payload ends with the 4-byte uncompressed size, so decompressors
# may complain about trailing data: the ELF magic of the output is what counts.
u32() { od -An -tu4 -j "$2" -N 4 "$1" | tr -d ' '; }
u8() { od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' '; }
is_elf() { [ -s "$1" ] && [ "$(head -c 4 "$1" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; }

decompress_at() { # FILE OFFSET LENGTH(0 = to the end) OUT; decompressor picked from the magic
    local f=$1 off=$2 len=$3 dst=$4 magic
    magic=$(od -An -tx1 -j "$off" -N 6 "$f" | tr -d ' \n')
    local -a dec
    case "$magic" in
        fd377a585a00) dec=(xz -dc --single-stream) ;;
        28b52ffd*) dec=(zstd -dcq) ;;
        1f8b08*) dec=(gzip -dc) ;;
        5d0000*) dec=(xz -dc --format=lzma) ;;
        425a68*) dec=(bzip2 -dc) ;;
        02214c18*) dec=(lz4 -dc) ;;
        *) return 1 ;;
    esac
    command -v "${dec[0]}" >/dev/null || return 1
    if [ "$len" -gt 0 ]; then
        tail -c +$((off + 1)) "$f" | head -c "$len" | "${dec[@]}" >"$dst" 2>/dev/null || true
    else
        tail -c +$((off + 1)) "$f" | "${dec[@]}" >"$dst" 2>/dev/null || true
    fi
    is_elf "$dst"
}

extract_vmlinux() { # BZIMAGE OUT
    local bz=$1 dst=$2 setup_sects pm_off poff plen magic off
    if [ "$(head -c 4 <(tail -c +$((0x202 + 1)) "$bz"))" = HdrS ]; then
        setup_sects=$(u8 "$bz" $((0x1f1)))
        [ "$setup_sects" = 0 ] && setup_sects=4
        pm_off=$(((setup_sects + 1) * 512))
        poff=$(u32 "$bz" $((0x248)))
        plen=$(u32 "$bz" $((0x24c)))
        if [ "$poff" -gt 0 ] && [ "$plen" -gt 0 ] && decompress_at "$bz" $((pm_off + poff)) "$plen" "$dst"; then
            log "vmlinux: payload at $((pm_off + poff)), $plen bytes (setup header)"
            return 0
        fi
    fi
    for magic in '\xfd7zXZ\x00' '\x28\xb5\x2f\xfd' '\x1f\x8b\x08' '\x02\x21\x4c\x18' 'BZh' '\x5d\x00\x00\x00'; do
        while IFS=: read -r off _; do
            if decompress_at "$bz" "$off" 0 "$dst"; then
                log "vmlinux: payload found by scanning at $off"
                return 0
            fi
        done < <(LC_ALL=C grep -aboP "$magic" "$bz" 2>/dev/null | head -n 20)
    done
    return 1
}

cp "$vmlinuz" "$work/bzImage"
if extract_vmlinux "$vmlinuz" "$work/vmlinux" && file "$work/vmlinux" | grep -q 'ELF 64-bit'; then
    log "vmlinux: $(file -b "$work/vmlinux" | cut -d, -f1-2), $(du -h --apparent-size "$work/vmlinux" | cut -f1)"
else
    log "warning: could not extract an ELF vmlinux; OUTDIR/vmlinux is the bzImage (slower boot)"
    cp "$vmlinuz" "$work/vmlinux"
fi

# ---------------------------------------------------------------------------------------------
# Initramfs tree.
rootfs=$work/rootfs
mkdir -p "$rootfs"
for d in bin sbin usr/bin usr/sbin lib lib64 usr/lib etc root proc sys dev tmp run mnt "lib/modules/$kver"; do
    mkdir -p "$rootfs/$d"
done
chmod 0755 "$rootfs"
chmod 1777 "$rootfs/tmp"
chmod 0700 "$rootfs/root"

# busybox and its applets as symlinks (made here, so the guest needs no --install at boot).
install -m 0755 "$busybox_bin" "$rootfs/bin/busybox"
while read -r applet; do
    [ -n "$applet" ] || continue
    [ -e "$rootfs/$applet" ] || ln -s /bin/busybox "$rootfs/$applet"
done < <("$busybox_bin" --list-full)
[ -e "$rootfs/bin/sh" ] || ln -s busybox "$rootfs/bin/sh"

# A dynamically linked program and every library ldd lists, each at the path ldd names
# (the dynamic loader included), so the loader finds them by its default paths and RUNPATHs.
add_dynamic() { # HOSTPATH GUESTPATH
    local src=$1 dst=$2 lib
    rm -f "$rootfs/$dst"
    install -D -m 0755 "$src" "$rootfs/$dst"
    while read -r lib; do
        [ -n "$lib" ] || continue
        [ -e "$rootfs/$lib" ] && continue
        mkdir -p "$rootfs/$(dirname "$lib")"
        cp -L "$lib" "$rootfs/$lib"
    done < <(ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
}
add_dynamic "$fio_bin" /usr/bin/fio
add_dynamic "$mke2fs_bin" /sbin/mke2fs
ln -sf mke2fs "$rootfs/sbin/mkfs.ext4"
ln -sf mke2fs "$rootfs/sbin/mkfs.ext2"
add_dynamic "$e2fsck_bin" /sbin/e2fsck
ln -sf e2fsck "$rootfs/sbin/fsck.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$rootfs/etc/mke2fs.conf"

# Modules: plain .ko in the initramfs (decompressed when Debian ships .ko.xz/.ko.zst/.ko.gz),
# dependencies from `modinfo -F depends` (6.1 packages ship no modules.dep), softdep "pre:"
# resolved by module name or alias among the modules taken, built-in ones skipped.
declare -A kopath=() builtin=() state=() taken=()
order=()
while IFS= read -r -d '' f; do
    n=${f##*/}
    n=${n%%.ko*}
    kopath[${n//-/_}]=$f
done < <(find "$kmods/kernel" -name '*.ko*' -print0)
if [ -f "$kmods/modules.builtin" ]; then
    while read -r f; do
        n=${f##*/}
        n=${n%.ko}
        builtin[${n//-/_}]=1
    done <"$kmods/modules.builtin"
fi

modstage=$work/ko
mkdir -p "$modstage"
ko_of() { # NAME -> prints the decompressed .ko path
    local n=$1 src=${kopath[$1]} dst=$modstage/$1.ko
    if [ ! -f "$dst" ]; then
        case "$src" in
            *.ko.xz) xz -dc "$src" >"$dst" ;;
            *.ko.zst) zstd -dcq "$src" >"$dst" ;;
            *.ko.gz) gzip -dc "$src" >"$dst" ;;
            *) cp "$src" "$dst" ;;
        esac
    fi
    echo "$dst"
}

skipped_builtin=()
collect() { # NAME: take it and its depends=, recursively
    local n=${1//-/_} dep
    [ -n "${taken[$n]:-}" ] && return 0
    if [ -n "${builtin[$n]:-}" ]; then
        case " ${skipped_builtin[*]} " in *" $n "*) ;; *) skipped_builtin+=("$n") ;; esac
        return 0
    fi
    [ -n "${kopath[$n]:-}" ] || die "module $n not found in $kver"
    taken[$n]=1
    for dep in $(modinfo -F depends "$(ko_of "$n")" | tr ',' ' '); do
        collect "$dep"
    done
}
for m in "${MODULES[@]}"; do collect "$m"; done

# name/alias -> module among the taken ones, for softdeps
declare -A provider=()
for n in "${!taken[@]}"; do
    provider[$n]=$n
    while read -r a; do
        [ -n "$a" ] && [ -z "${provider[$a]:-}" ] && provider[$a]=$n
    done < <(modinfo -F alias "$modstage/$n.ko")
done
deps_of() { # NAME -> hard deps and softdep pre: that are taken
    local ko=$modstage/$1.ko d pre=0
    for d in $(modinfo -F depends "$ko" | tr ',' ' '); do
        d=${d//-/_}
        [ -n "${taken[$d]:-}" ] && echo "$d"
    done
    for d in $(modinfo -F softdep "$ko"); do
        case "$d" in
            pre:) pre=1 ;;
            post:) pre=0 ;;
            *)
                if [ "$pre" = 1 ]; then
                    if [ -n "${provider[$d]:-}" ]; then
                        echo "${provider[$d]}"
                    elif [ -z "${builtin[${d//-/_}]:-}" ]; then
                        log "note: softdep $d of $1 not among the modules taken"
                    fi
                fi
                ;;
        esac
    done
}
visit() { # depth-first: dependencies first
    local n=$1 d
    case "${state[$n]:-}" in
        finished) return 0 ;;
        active) die "module dependency cycle at $n" ;;
    esac
    state[$n]=active
    for d in $(deps_of "$n"); do visit "$d"; done
    state[$n]=finished
    order+=("$n")
}
for m in "${MODULES[@]}"; do
    m=${m//-/_}
    [ -n "${taken[$m]:-}" ] && visit "$m"
done
for n in $(printf '%s\n' "${!taken[@]}" | sort); do visit "$n"; done

: >"$rootfs/etc/modules.order"
for n in "${order[@]}"; do
    install -m 0644 "$modstage/$n.ko" "$rootfs/lib/modules/$kver/$n.ko"
    echo "/lib/modules/$kver/$n.ko" >>"$rootfs/etc/modules.order"
done
log "modules (load order): ${order[*]}"
[ "${#skipped_builtin[@]}" -eq 0 ] || log "built into the kernel (skipped): ${skipped_builtin[*]}"

# /etc and /init
install -m 0755 "$init_src" "$rootfs/init"
cat >"$rootfs/etc/profile" <<'EOF'
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PS1='guest# '
EOF
echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
echo 'root:x:0:' >"$rootfs/etc/group"
echo "$kver" >"$rootfs/etc/kernel.release"
: >"$rootfs/etc/fstab"
: >"$rootfs/etc/mtab"
if [ "$(id -u)" = 0 ]; then
    mknod -m 0600 "$rootfs/dev/console" c 5 1
    mknod -m 0666 "$rootfs/dev/null" c 1 3
else
    log "note: not root: no /dev/console node in the initramfs (/init reopens it after devtmpfs)"
fi

# Sanity: the copied programs start inside the tree (needs root for chroot).
if [ "$(id -u)" = 0 ]; then
    chroot "$rootfs" /usr/bin/fio --version >/dev/null || die "fio does not start inside the initramfs tree"
    chroot "$rootfs" /sbin/mke2fs -V >/dev/null 2>&1 || die "mke2fs does not start inside the initramfs tree"
    chroot "$rootfs" /sbin/e2fsck -V >/dev/null 2>&1 || die "e2fsck does not start inside the initramfs tree"
    chroot "$rootfs" /bin/sh -c 'sha256sum /init >/dev/null && cmp /init /init' || die "busybox applets broken"
fi

# newc cpio, owned by root, "." left out (its mode would be applied to the guest's /).
(cd "$rootfs" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"$work/initramfs.cpio.gz"

# Publish (each file replaced atomically).
for f in vmlinux bzImage initramfs.cpio.gz; do
    mv -f "$work/$f" "$out/$f.tmp"
    mv -f "$out/$f.tmp" "$out/$f"
done
echo "$kver" >"$out/kernel.release"
log "done: $out/vmlinux ($(du -h --apparent-size "$out/vmlinux" | cut -f1)), $out/initramfs.cpio.gz ($(du -h --apparent-size "$out/initramfs.cpio.gz" | cut -f1))"
