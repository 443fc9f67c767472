#!/bin/busybox sh
# /init of the emulated L1 machine (make vmtest). Loads the KVM modules,
# runs the guest-side tests against the real /dev/kvm, prints markers for the
# host harness (internal/vmtest: Report), and reboots, which ends QEMU
# (reboot=t, -no-reboot). Every marker line starts with "@@cube-vmtest ".
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TMPDIR=/tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
# cgroup v1 hierarchies as on the build machines (the VMM's jail uses them).
mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
for c in cpu cpuacct cpuset memory devices freezer blkio pids; do
  mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c
done
ip link set lo up
echo "@@cube-vmtest l1-up uptime=$(cut -d' ' -f1 /proc/uptime)"

finish() {
  echo "@@cube-vmtest exit rc=$1"
  if [ "$1" != 0 ]; then
    echo "@@cube-vmtest-dmesg (last 60 kernel lines)"
    dmesg | tail -n 60
  fi
  sync
  reboot -f
  sleep 5
  echo b > /proc/sysrq-trigger
}

# modules.list: "<file> [params...]" in load order (test/vmtest/image.sh).
while read -r ko params; do
  name=${ko##*/}; name=${name%.ko}
  if insmod "/lib/modules/$ko" $params; then
    echo "@@cube-vmtest module $name ok"
  else
    echo "@@cube-vmtest module $name fail"
    finish 98
  fi
done < /lib/modules/modules.list

set -f  # the pattern may hold glob characters
run="" skip=""
for w in $(cat /proc/cmdline); do
  case "$w" in
    cube.run=*) run=${w#cube.run=} ;;
    cube.skip=*) skip=${w#cube.skip=} ;;  # tests passed before an emulator wedge
  esac
done
export CUBE_VMTEST_DIR=/vmtest
cd /vmtest
# Heartbeat: shows the host harness (and a reader of a stalled run) that
# L1 is alive, with its free memory and load, plus any kernel warnings
# (OOM, lockups, RCU stalls) that loglevel=3 keeps off the console.
(
  seen=0
  while sleep 20; do
    avail=$(awk '/^MemAvailable:/ {print $2}' /proc/meminfo)
    echo "@@cube-vmtest heartbeat uptime=$(cut -d' ' -f1 /proc/uptime) memavail_kib=$avail load=$(cut -d' ' -f1-3 /proc/loadavg)"
    dmesg | grep -E 'Out of memory|oom-kill|soft lockup|hung_task|blocked for more|rcu.*stall|BUG:|WARNING:|Call Trace' > /tmp/.kwarn 2>/dev/null
    n=$(wc -l < /tmp/.kwarn)
    if [ "$n" -gt "$seen" ]; then
      tail -n $((n - seen)) /tmp/.kwarn | head -n 20 | sed 's/^/@@cube-vmtest kernel /'
      seen=$n
    fi
  done
) &
echo "@@cube-vmtest begin"
./vmtest.test -test.v -test.timeout=10m ${run:+-test.run "$run"} ${skip:+-test.skip "$skip"}
finish $?
