#!/usr/bin/env bash
# `make vmtest`: builds the emulated L1 machine image (image.sh) and runs the
# host harness (internal/vmtest TestEmulatedMachine), which boots it under
# QEMU TCG and fails unless every guest-side test passes.
# Environment: VMTEST_RUN (a -test.run pattern for the guest-side tests),
# VMTEST_TIMEOUT (Go duration, default 12m), VMTEST_VERBOSE=1 (L1 kernel log).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
CACHE=${CACHE:-${CUBE_CACHE_DIR:-/var/cache/cube}}
GO=${GO:-go}
export CACHE GO
mkdir -p "$CACHE/vmtest"
work=$(mktemp -d "$CACHE/vmtest/run.XXXXXX")
# The console log is kept as $CACHE/vmtest/last-console.log (replaced at
# the end of each run, so that concurrent runs do not interleave in it).
keep_log() {
  if [ -s "$work/console.log" ]; then
    cp "$work/console.log" "$CACHE/vmtest/.console.$$" && mv -f "$CACHE/vmtest/.console.$$" "$CACHE/vmtest/last-console.log"
  fi
  rm -rf "$work"
}
trap keep_log EXIT
t0=$(date +%s)
vars=$(nice -n 10 "$here/image.sh" "$work")
eval "$vars"
echo "vmtest: image built in $(( $(date +%s) - t0 ))s: $L1_INITRD ($(( $(stat -c %s "$L1_INITRD") >> 20 )) MiB), guest kernel $GUEST_KERNEL"
cd "$repo"
CUBE_VMTEST_L1_KERNEL=$L1_KERNEL CUBE_VMTEST_L1_INITRD=$L1_INITRD \
CUBE_VMTEST_GUEST_KERNEL=$GUEST_KERNEL/bzImage CUBE_VMTEST_GUEST_ROOTFS=$GUEST_ROOTFS \
CUBE_VMTEST_RUN=${VMTEST_RUN:-} CUBE_VMTEST_TIMEOUT=${VMTEST_TIMEOUT:-12m} \
CUBE_VMTEST_VERBOSE=${VMTEST_VERBOSE:-} CUBE_VMTEST_LOG=$work/console.log \
  $GO test -count=1 -v -timeout 45m -run '^(TestGuestKernelTCG|TestEmulatedMachine)$' ./internal/vmtest
