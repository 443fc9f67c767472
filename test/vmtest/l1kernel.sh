#!/usr/bin/env bash
# Fetches Debian's generic amd64 kernel (the one linux-image-amd64 points at)
# for the emulated L1 machine, without installing it on the host:
# `apt-get download` + `dpkg-deb -x` into $CACHE/vmtest/l1-kernel/<package>_<version>/.
# Prints that directory; it holds vmlinuz and lib/modules/<release>/.
set -euo pipefail
CACHE=${CACHE:-${CUBE_CACHE_DIR:-/var/cache/cube}}
pkg=${L1_KERNEL_PKG:-$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)}
[ -n "$pkg" ] || { echo "l1kernel: cannot resolve linux-image-amd64 (apt-get update?)" >&2; exit 1; }
ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "l1kernel: no candidate for $pkg" >&2; exit 1; }
out=$CACHE/vmtest/l1-kernel/${pkg}_$ver
if [ -s "$out/vmlinuz" ]; then echo "$out"; exit 0; fi
mkdir -p "$CACHE/vmtest/l1-kernel"
tmp=$(mktemp -d "$CACHE/vmtest/l1-kernel/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "l1kernel: downloading $pkg $ver" >&2
(cd "$tmp" && apt-get download -q "$pkg=$ver" >&2)
dpkg-deb -x "$tmp"/*.deb "$tmp/root"
rel=$(ls "$tmp/root/lib/modules")
mkdir -p "$tmp/out/lib/modules"
cp "$tmp/root/boot/vmlinuz-$rel" "$tmp/out/vmlinuz"
mv "$tmp/root/lib/modules/$rel" "$tmp/out/lib/modules/$rel"
echo "$rel" > "$tmp/out/release"
rm -rf "$out" && mv "$tmp/out" "$out"
echo "$out"
