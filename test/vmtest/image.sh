#!/usr/bin/env bash
# Builds the emulated L1 machine image for `make vmtest` and prints shell
# assignments for the host harness (L1_KERNEL=..., L1_INITRD=...).
#   test/vmtest/image.sh <work dir>
# Inputs: Debian's generic kernel (l1kernel.sh, cached by version), the guest
# kernel (kernel/build.sh, cached by source version + config), busybox-static,
# and, built here every run (seconds): static `cube` and `cube-agent`, the
# guest-side test binary, the guest root disk and the initramfs.
set -euo pipefail
exec 3>&1 1>&2  # only the final assignments go to stdout (fd 3)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=${1:?usage: image.sh <work dir>}
GO=${GO:-go}
mkdir -p "$work"
work=$(cd "$work" && pwd)

l1=$("$here/l1kernel.sh")
rel=$(cat "$l1/release")
guest=${GUEST_KERNEL_DIR:-$("$repo/kernel/build.sh")}

root=$work/initrd
rm -rf "$root" && mkdir -p "$root"/{bin,sbin,lib/modules,vmtest/guest,etc,root}

# Static Go binaries, without symbol tables (-s -w: a smaller initramfs
# unpacks faster under TCG; panics still name functions).
# VMTEST_CUBE: use this (static) cube binary instead, e.g. another branch's.
if [ -n "${VMTEST_CUBE:-}" ]; then cp "$VMTEST_CUBE" "$root/vmtest/cube"
else (cd "$repo" && CGO_ENABLED=0 $GO build -trimpath -ldflags="-s -w" -o "$root/vmtest/cube" ./cmd/cube); fi
(cd "$repo" && CGO_ENABLED=0 $GO build -trimpath -ldflags="-s -w" -o "$root/vmtest/cube-agent" ./cmd/cube-agent)
(cd "$repo" && CGO_ENABLED=0 $GO test -c -tags vmtest -trimpath -ldflags="-s -w" -o "$root/vmtest/vmtest.test" ./internal/vmtest)
# The VMM packages' own tests, run again inside L1 on real KVM
# (TestPackagesOnRealKVM): every ./internal/vmm/... package with tests but
# the virtio device models (driven in-process, no KVM involved).
# VMTEST_PKGS overrides the list ("none": no package).
mkdir -p "$root/vmtest/pkg"
pkgs=${VMTEST_PKGS:-$(cd "$repo" && $GO list -f '{{if or .TestGoFiles .XTestGoFiles}}{{.ImportPath}}{{end}}' ./internal/vmm/... | grep -v /devices/virtio || true)}
[ "$pkgs" = none ] && pkgs=""
# Known failures on real KVM (a -test.skip pattern), skipped and named on
# the console every run until fixed. None at the moment.
echo "${VMTEST_PKG_SKIP-}" > "$root/vmtest/pkg/skip"
for p in $pkgs; do
  (cd "$repo" && CGO_ENABLED=0 $GO test -c -trimpath -ldflags="-s -w" -o "$root/vmtest/pkg/$(echo "${p#*/internal/}" | tr / _).test" "$p")
done

# L1 userland: busybox, the kvm (and tun, for the guests' taps) modules in
# dependency order, resolved from each module's .modinfo "depends=".
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$here/init.sh" "$root/init"
# mkfs.ext4 (e2fsprogs, dynamically linked: with its libraries and the
# loader), for the template builder inside L1 (TestServerMicroVM: `cube tpl
# create-from-image` makes each template's ext4 image with mkfs.ext4 -d).
mke2fs=$(command -v mke2fs || echo /sbin/mke2fs)
cp "$mke2fs" "$root/sbin/mke2fs" && ln -s mke2fs "$root/sbin/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
for lib in $(ldd "$mke2fs" | grep -o '/[^ ]*'); do
  mkdir -p "$root$(dirname "$lib")" && cp -L "$lib" "$root$lib"
done
mods=$l1/lib/modules/$rel/kernel
declare -A seen=()
order=()
modpath() { find "$mods" -name "$1.ko" -o -name "${1//_/-}.ko" | head -1; }
add() {
  local name=${1//-/_} f dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  f=$(modpath "$1"); [ -n "$f" ] || f=$(modpath "${1//_/-}")
  [ -n "$f" ] || { echo "image: module $1 not found in $mods" >&2; exit 1; }
  for dep in $(readelf -p .modinfo "$f" | sed -n 's/.*depends=//p' | tr ',' ' '); do add "$dep"; done
  order+=("$f")
}
for m in kvm-amd tun; do add "$m"; done
: > "$root/lib/modules/modules.list"
for f in "${order[@]}"; do
  b=$(basename "$f")
  cp "$f" "$root/lib/modules/$b"
  params=""
  [ "$b" = kvm-amd.ko ] && params="nested=1 ${VMTEST_KVM_AMD_PARAMS:-}"
  echo "$b $params" >> "$root/lib/modules/modules.list"
done

# The guest: kernel and a small root disk (busybox + cube-agent).
cp "$guest/bzImage" "$root/vmtest/guest/"
strip -o "$root/vmtest/guest/vmlinux" "$guest/vmlinux"  # keeps the PVH note
"$here/rootfs.sh" "$root/vmtest/cube-agent" "$work/rootfs.ext4" >&2
cp "$work/rootfs.ext4" "$root/vmtest/guest/rootfs.ext4"
l2=$work/l2-initrd
mkdir -p "$l2/bin" "$l2/proc" "$l2/sys" "$l2/dev"
cp /bin/busybox "$l2/bin/busybox"
install -m 0755 "$here/l2init.sh" "$l2/init"
(cd "$l2" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible > "$root/vmtest/guest/initrd.cpio")
rm -rf "$l2"

(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible > "$work/l1-initrd.cpio")
rm -rf "$root"
cat >&3 <<OUT
L1_KERNEL=$l1/vmlinuz
L1_INITRD=$work/l1-initrd.cpio
GUEST_KERNEL=$guest
GUEST_ROOTFS=$work/rootfs.ext4
OUT
