#!/usr/bin/env bash
# Builds the Cube guest kernel from Debian's linux-source-6.1 with the config
# fragment kernel/guest.config merged on top of tinyconfig, and caches it in
# $CACHE/kernel/<key>/{bzImage,vmlinux,config}, where <key> hashes the source
# package version, the fragment and this script.
#   kernel/build.sh          build if needed, print the output directory
#   kernel/build.sh --dir    print the output directory only (no build)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
CACHE=${CACHE:-${CUBE_CACHE_DIR:-/var/cache/cube}}
pkg=linux-source-6.1
ver=$(dpkg-query -W -f='${Version}' "$pkg" 2>/dev/null) || { echo "kernel: $pkg is not installed" >&2; exit 1; }
key=$( { echo "$pkg $ver"; cat "$here/guest.config" "$here/build.sh"; } | sha256sum | cut -c1-16)
out=$CACHE/kernel/$key
if [ "${1:-}" = --dir ]; then echo "$out"; exit 0; fi
if [ -s "$out/bzImage" ] && [ -s "$out/vmlinux" ]; then echo "$out"; exit 0; fi

mkdir -p "$CACHE/kernel"
exec 9>"$CACHE/kernel/.lock"
flock 9
if [ -s "$out/bzImage" ] && [ -s "$out/vmlinux" ]; then echo "$out"; exit 0; fi

src=$CACHE/kernel/src-$ver
if [ ! -f "$src/.extracted" ]; then
  echo "kernel: extracting /usr/src/$pkg.tar.xz" >&2
  rm -rf "$src" && mkdir -p "$src"
  tar -xJf "/usr/src/$pkg.tar.xz" -C "$src" --strip-components=1
  touch "$src/.extracted"
fi
build=$CACHE/kernel/build-$key
mkdir -p "$build"
jobs=${KERNEL_JOBS:-$(nproc)}
mk() { nice -n 19 make -s -C "$src" O="$build" "$@"; }
echo "kernel: configuring in $build" >&2
mk tinyconfig >/dev/null
"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$here/guest.config" >/dev/null
mk olddefconfig >/dev/null
# Every option the fragment asks for must have survived olddefconfig.
bad=0
while IFS= read -r line; do
  case "$line" in
    CONFIG_*=*) want=$line ;;
    "# CONFIG_"*" is not set") want=$line ;;
    *) continue ;;
  esac
  name=${want#\# }; name=${name%%[= ]*}
  got=$(grep -E "^(# )?$name[= ]" "$build/.config" || echo "# $name is not set")
  if [ "$got" != "$want" ]; then echo "kernel: $name: want '$want', got '$got'" >&2; bad=1; fi
done < "$here/guest.config"
[ $bad = 0 ] || { echo "kernel: config fragment not satisfied (missing dependencies?)" >&2; exit 1; }
echo "kernel: building with -j$jobs (nice 19); this takes minutes" >&2
mk -j"$jobs" bzImage vmlinux
tmp=$out.tmp.$$
rm -rf "$tmp" && mkdir -p "$tmp"
cp "$build/arch/x86/boot/bzImage" "$build/vmlinux" "$tmp/"
cp "$build/.config" "$tmp/config"
echo "$pkg $ver" > "$tmp/source"
rm -rf "$out" && mv "$tmp" "$out"
rm -rf "$build"
echo "$out"
