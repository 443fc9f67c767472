#!/usr/bin/env bash
# Builds a small guest root disk (ext4, no mount needed: mkfs.ext4 -d):
# busybox-static with its applet links, cube-agent at /sbin/cube-agent, and a
# marker file /etc/cube-vmtest the tests read back through the guest.
#   test/vmtest/rootfs.sh <cube-agent binary> <output.ext4>
set -euo pipefail
agent=${1:?agent binary}; out=${2:?output image}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,home/user,mnt,var/tmp}
chmod 1777 "$dir/tmp" "$dir/var/tmp"
cp /bin/busybox "$dir/bin/busybox"
for a in $(/bin/busybox --list-full); do
  [ -e "$dir/$a" ] || ln -s /bin/busybox "$dir/$a"
done
install -m 0755 "$agent" "$dir/sbin/cube-agent"
cat > "$dir/etc/passwd" <<'P'
root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
P
cat > "$dir/etc/group" <<'G'
root:x:0:
user:x:1000:
G
echo cube > "$dir/etc/hostname"
printf '127.0.0.1 localhost\n' > "$dir/etc/hosts"
echo "cube-vmtest-rootfs-ok" > "$dir/etc/cube-vmtest"
chown -R 1000:1000 "$dir/home/user"
rm -f "$out"
# Room for the files plus 8 MiB (writes go to the copy-on-write overlay).
mib=$(( $(du -sm "$dir" | cut -f1) * 5 / 4 + 8 ))
truncate -s "${mib}M" "$out"
mkfs.ext4 -q -F -L cube-root -E root_owner=0:0 -d "$dir" "$out"
