#!/usr/bin/env bash
# Makes an initramfs overlay: a gzip'd newc cpio with the given host files at the given guest
# paths, to append to the base initramfs (scripts/run-guest.sh --overlay OUT.cpio.gz does). The
# kernel unpacks concatenated archives in turn, so these files add to or replace the base's.
#
#   scripts/mk-overlay.sh OUT.cpio.gz FILE:GUESTPATH [FILE:GUESTPATH ...]
#   e.g. scripts/mk-overlay.sh /tmp/t.cpio.gz scripts/guest/blk-test.sh:/test.sh
#
# Files keep their mode (scripts need not be executable: /init runs /test.sh with sh).
set -euo pipefail

if [ $# -lt 2 ]; then
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
fi
out=$1
shift

stage=$(mktemp -d "${TMPDIR:-/tmp}/vhostbox-overlay.XXXXXX")
trap 'rm -rf "$stage"' EXIT

for spec in "$@"; do
    case "$spec" in
        *:*) ;;
        *) echo "mk-overlay: expected FILE:GUESTPATH, got '$spec'" >&2; exit 2 ;;
    esac
    src=${spec%:*}
    dst=${spec##*:}
    dst=/${dst#/}
    [ -f "$src" ] || { echo "mk-overlay: $src is not a file" >&2; exit 2; }
    case "$dst" in */ | *'/../'* | */..) echo "mk-overlay: bad guest path '$dst'" >&2; exit 2 ;; esac
    mkdir -p "$stage$(dirname "$dst")"
    cp -L "$src" "$stage$dst"
    chmod u+r,go+r "$stage$dst"
done
# Directories that already exist in the base get this mode: keep it the usual one.
find "$stage" -mindepth 1 -type d -exec chmod 0755 {} +

mkdir -p "$(dirname "$out")"
(cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc --owner=0:0 --quiet) | gzip -6 >"$out.tmp"
mv -f "$out.tmp" "$out"
