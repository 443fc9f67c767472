//go:build linux && !vmtest

package vmtest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestGuestSuite stands for the guest-side tests (files tagged vmtest):
// they need the real /dev/kvm of the emulated machine and run there.
func TestGuestSuite(t *testing.T) {
	t.Skip("guest-side tests (build tag vmtest) run inside the emulated real-KVM machine: make vmtest")
}

// TestEmulatedMachine boots the L1 image built by `make vmtest` under QEMU
// TCG, streams its serial console, and fails unless the guest-side tests
// all pass. Inputs come from the environment (set by test/vmtest/run.sh):
//
//	CUBE_VMTEST_L1_KERNEL, CUBE_VMTEST_L1_INITRD  the image (required)
//	CUBE_VMTEST_RUN      -test.run pattern for the guest-side tests
//	CUBE_VMTEST_TIMEOUT  overall limit (Go duration, default 12m)
//	CUBE_VMTEST_LOG      file to write the whole console to
//	CUBE_VMTEST_VERBOSE  1: show the L1 kernel log
func TestEmulatedMachine(t *testing.T) {
	kernel, initrd := os.Getenv("CUBE_VMTEST_L1_KERNEL"), os.Getenv("CUBE_VMTEST_L1_INITRD")
	if kernel == "" || initrd == "" {
		t.Skip("needs the L1 image: run `make vmtest` (sets CUBE_VMTEST_L1_KERNEL and CUBE_VMTEST_L1_INITRD)")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("qemu-system-x86_64 not found (apt package qemu-system-x86): %v", err)
	}
	khz, err := HostTSCkHz()
	if err != nil {
		t.Fatal(err)
	}
	timeout := 12 * time.Minute
	if s := os.Getenv("CUBE_VMTEST_TIMEOUT"); s != "" {
		if timeout, err = time.ParseDuration(s); err != nil {
			t.Fatalf("CUBE_VMTEST_TIMEOUT: %v", err)
		}
	}
	m := Machine{QEMU: qemu, Kernel: kernel, Initrd: initrd, TSCkHz: khz,
		Run: os.Getenv("CUBE_VMTEST_RUN"), Verbose: os.Getenv("CUBE_VMTEST_VERBOSE") == "1"}
	if !ValidRun(m.Run) {
		t.Fatalf("CUBE_VMTEST_RUN %q: spaces and quotes cannot pass the kernel command line", m.Run)
	}
	var logw io.Writer = io.Discard
	if p := os.Getenv("CUBE_VMTEST_LOG"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		logw = f
	}

	var rep Report
	var firstUp time.Duration
	start := time.Now()
	timedOut, werr := runQEMU(t, m.Args(), timeout, logw, func(el time.Duration, line string) {
		wasUp := rep.L1Up
		rep.Feed(line)
		if !wasUp && rep.L1Up {
			firstUp = el
		}
	})
	t.Logf("L1 /init reached after %.1fs; whole run %.1fs", firstUp.Seconds(), time.Since(start).Seconds())
	t.Logf("summary: %s", rep.Summary())
	if timedOut {
		t.Fatalf("timed out after %v (CUBE_VMTEST_TIMEOUT): %v", timeout, rep.Err())
	}
	if err := rep.Err(); err != nil {
		t.Fatalf("%v (qemu: %v)", err, werr)
	}
	if werr != nil {
		t.Fatalf("qemu: %v", werr)
	}
}

// runQEMU runs a QEMU command line in its own process group, streams its
// console (stdout) line by line to the test log, logw and onLine, and kills
// it after timeout. It returns whether the timeout hit and Wait's error.
func runQEMU(t *testing.T, args []string, timeout time.Duration, logw io.Writer, onLine func(time.Duration, string)) (bool, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	t.Logf("%q", args)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		el := time.Since(start)
		io.WriteString(logw, el.Truncate(time.Millisecond).String()+" "+line+"\n")
		t.Logf("%7.2fs | %s", el.Seconds(), line)
		onLine(el, line)
	}
	werr := cmd.Wait()
	return ctx.Err() != nil, werr
}

// TestGuestKernelTCG boots the guest kernel built by `make kernel` directly
// under QEMU TCG (no KVM at all) with the guest root disk on virtio-blk, as
// a check of the kernel and the disk independent of our VMM: the console
// comes up, the ext4 root mounts and init runs. `make vmtest` sets
// CUBE_VMTEST_GUEST_KERNEL and CUBE_VMTEST_GUEST_ROOTFS.
func TestGuestKernelTCG(t *testing.T) {
	kernel, rootfs := os.Getenv("CUBE_VMTEST_GUEST_KERNEL"), os.Getenv("CUBE_VMTEST_GUEST_ROOTFS")
	if kernel == "" || rootfs == "" {
		t.Skip("needs the guest kernel and root disk: run `make vmtest` (sets CUBE_VMTEST_GUEST_KERNEL and CUBE_VMTEST_GUEST_ROOTFS)")
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatalf("qemu-system-x86_64 not found (apt package qemu-system-x86): %v", err)
	}
	khz, err := HostTSCkHz()
	if err != nil {
		t.Fatal(err)
	}
	// acpi=off makes microvm describe its virtio-mmio slots on the command
	// line; auto-kernel-cmdline=off lets us put that before init's "--".
	args := []string{qemu, "-accel", "tcg", "-M", "microvm,acpi=off,auto-kernel-cmdline=off",
		"-cpu", "max", "-m", "256", "-smp", "1", "-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", kernel,
		"-drive", "file=" + rootfs + ",if=none,id=d0,format=raw,snapshot=on", "-device", "virtio-blk-device,drive=d0",
		"-append", fmt.Sprintf("console=ttyS0 reboot=t panic=-1 tsc_early_khz=%d tsc=reliable "+
			"virtio_mmio.device=512@0xfeb00e00:12 root=/dev/vda ro init=/bin/sh -- "+
			`-c "echo @@cube-guest $(cat /etc/cube-vmtest) $(uname -r); reboot -f"`, khz),
	}
	var got string
	timedOut, werr := runQEMU(t, args, 3*time.Minute, io.Discard, func(_ time.Duration, line string) {
		// The kernel echoes its command line, which holds the unexpanded
		// marker command; only the guest shell's output counts.
		if i := strings.Index(line, "@@cube-guest cube-vmtest-rootfs-ok "); i >= 0 {
			got = line[i:]
		}
	})
	if timedOut {
		t.Fatal("timed out")
	}
	if !strings.HasPrefix(got, "@@cube-guest cube-vmtest-rootfs-ok 6.1") {
		t.Fatalf("no marker from the guest's init (got %q; qemu: %v)", got, werr)
	}
}
