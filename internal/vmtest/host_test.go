//go:build linux && !vmtest

package vmtest

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
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
	qemu, err := qemuBinary()
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
		Run: os.Getenv("CUBE_VMTEST_RUN"), Verbose: os.Getenv("CUBE_VMTEST_VERBOSE") == "1",
		Append: os.Getenv("CUBE_VMTEST_L1_APPEND")}
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

	stall := 90 * time.Second
	if s := os.Getenv("CUBE_VMTEST_STALL"); s != "" {
		if stall, err = time.ParseDuration(s); err != nil {
			t.Fatalf("CUBE_VMTEST_STALL: %v", err)
		}
	}
	retries := 6
	if s := os.Getenv("CUBE_VMTEST_RETRIES"); s != "" {
		if retries, err = strconv.Atoi(s); err != nil || retries < 0 {
			t.Fatalf("CUBE_VMTEST_RETRIES %q: want a whole number", s)
		}
	}
	var passed []string // top-level tests passed in earlier, wedged runs
	for attempt := 0; ; attempt++ {
		m.Skip = skipPattern(passed)
		rep, ended, wedged, werr := bootL1(t, m, timeout, stall, logw)
		switch ended {
		case "timeout":
			t.Fatalf("timed out after %v (CUBE_VMTEST_TIMEOUT): %v", timeout, rep.Err())
		case "stalled":
			if len(rep.Failed) > 0 {
				t.Fatalf("the console was silent for %v and the machine was stopped, after failures: %v", stall, rep.Err())
			}
			if !wedged || attempt >= retries {
				t.Fatalf("the console was silent for %v (CUBE_VMTEST_STALL), the machine was stopped (known emulator wedge: %v, attempt %d of %d): %v",
					stall, wedged, attempt+1, retries+1, rep.Err())
			}
			// QEMU's TCG sometimes leaves the emulated CPU unable to take
			// interrupts after running a nested guest (see docs/vmtest.md:
			// the vCPU halts with the LAPIC timer pending in IRR, forever).
			// That is the emulator, not the code under test: run the tests
			// that have not passed yet on a fresh machine.
			for _, n := range rep.Passed {
				if !strings.Contains(n, "/") {
					passed = append(passed, n)
				}
			}
			t.Logf("EMULATOR WEDGE (attempt %d of %d): the L1 vCPU holds a pending interrupt that it never takes; "+
				"booting a fresh machine for the tests not yet passed (skipping %v)", attempt+1, retries+1, passed)
			continue
		}
		if err := rep.Err(); err != nil {
			t.Fatalf("%v (qemu: %v)", err, werr)
		}
		if werr != nil {
			t.Fatalf("qemu: %v", werr)
		}
		if attempt > 0 {
			t.Logf("passed after %d emulator wedge(s); tests passed in the wedged runs: %v", attempt, passed)
		}
		return
	}
}

// skipPattern is a -test.skip pattern for the named top-level tests.
func skipPattern(names []string) string {
	if len(names) == 0 {
		return ""
	}
	return "^(" + strings.Join(names, "|") + ")$"
}

// wedgeSignature reports whether a QEMU monitor dump shows the emulator
// wedge: the local APIC holds a requested interrupt (IRR not empty) that
// the vCPU does not take. Seen with the vCPU halted in L1's idle loop
// (HLT=1, IF set) and with it running an L2 guest's loop at CPL 3 (the
// L1 timer never causes the #VMEXIT that would give L1 its CPU back).
// One sample can catch an interrupt in flight; the caller requires every
// one of several samples, taken after a long silence, to match.
func wedgeSignature(dump string) bool {
	i := strings.Index(dump, "dumping local APIC state")
	if i < 0 {
		return false
	}
	for _, line := range strings.Split(dump[i:], "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == "IRR" {
			return f[1] != "(none)"
		}
	}
	return false
}

// bootL1 runs the emulated machine once and parses its console. On a
// stall it samples the vCPU state through the monitor three times and
// reports whether every sample shows the emulator wedge.
func bootL1(t *testing.T, m Machine, timeout, stall time.Duration, logw io.Writer) (*Report, string, bool, error) {
	t.Helper()
	m.Monitor = filepath.Join(t.TempDir(), "monitor.sock")
	rep := &Report{}
	var firstUp time.Duration
	wedged := false
	start := time.Now()
	ended, werr := runQEMU(t, m.Args(), timeout, stall, logw, func(el time.Duration, line string) {
		wasUp := rep.L1Up
		rep.Feed(line)
		if !wasUp && rep.L1Up {
			firstUp = el
		}
	}, func() {
		// Where the emulated CPU is, sampled three times: a wedged L1
		// (or L2, when the CPU is in guest mode) shows the same state.
		wedged = true
		for i := 0; i < 3; i++ {
			out, err := monitor(m.Monitor, "info cpus", "info registers", "info lapic", "info pic")
			t.Logf("console silent for %v; QEMU monitor sample %d (err %v):\n%s", stall, i+1, err, out)
			io.WriteString(logw, out)
			wedged = wedged && err == nil && wedgeSignature(out)
			time.Sleep(time.Second)
		}
	})
	t.Logf("L1 /init reached after %.1fs; whole run %.1fs", firstUp.Seconds(), time.Since(start).Seconds())
	t.Logf("summary: %s", rep.Summary())
	return rep, ended, wedged, werr
}

// runQEMU runs a QEMU command line in its own process group, streams its
// console (stdout) line by line to the test log, logw and onLine, and kills
// it after timeout, or once the console has been silent for stall (0: no
// stall limit), after calling onStall. It returns why it ended early
// ("" if QEMU exited by itself) and Wait's error.
func runQEMU(t *testing.T, args []string, timeout, stall time.Duration, logw io.Writer, onLine func(time.Duration, string), onStall func()) (string, error) {
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
	var last atomic.Int64
	last.Store(time.Now().UnixNano())
	var stalled atomic.Bool
	watchDone := make(chan struct{})
	defer close(watchDone)
	if stall > 0 {
		go func() {
			tick := time.NewTicker(5 * time.Second)
			defer tick.Stop()
			for {
				select {
				case <-watchDone:
					return
				case <-ctx.Done():
					return
				case <-tick.C:
				}
				if time.Since(time.Unix(0, last.Load())) > stall {
					stalled.Store(true)
					if onStall != nil {
						onStall()
					}
					cancel()
					return
				}
			}
		}()
	}
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		last.Store(time.Now().UnixNano())
		line := sc.Text()
		el := time.Since(start)
		io.WriteString(logw, el.Truncate(time.Millisecond).String()+" "+line+"\n")
		t.Logf("%7.2fs | %s", el.Seconds(), line)
		onLine(el, line)
	}
	werr := cmd.Wait()
	switch {
	case stalled.Load():
		return "stalled", werr
	case ctx.Err() != nil:
		return "timeout", werr
	}
	return "", werr
}

// monitor sends human-monitor commands to a QEMU monitor socket and
// returns what it answered.
func monitor(sock string, cmds ...string) (string, error) {
	c, err := net.DialTimeout("unix", sock, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	var out strings.Builder
	rd := bufio.NewReader(c)
	readPrompt := func() error {
		// The monitor ends each answer with the "(qemu) " prompt.
		for {
			b, err := rd.ReadByte()
			if err != nil {
				return err
			}
			out.WriteByte(b)
			if strings.HasSuffix(out.String(), "(qemu) ") {
				return nil
			}
		}
	}
	if err := readPrompt(); err != nil {
		return out.String(), err
	}
	for _, cmd := range cmds {
		if _, err := io.WriteString(c, cmd+"\n"); err != nil {
			return out.String(), err
		}
		if err := readPrompt(); err != nil {
			return out.String(), err
		}
	}
	return out.String(), nil
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
	qemu, err := qemuBinary()
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
	ended, werr := runQEMU(t, args, 3*time.Minute, 0, io.Discard, func(_ time.Duration, line string) {
		// The kernel echoes its command line, which holds the unexpanded
		// marker command; only the guest shell's output counts.
		if i := strings.Index(line, "@@cube-guest cube-vmtest-rootfs-ok "); i >= 0 {
			got = line[i:]
		}
	}, nil)
	if ended != "" {
		t.Fatal(ended)
	}
	if !strings.HasPrefix(got, "@@cube-guest cube-vmtest-rootfs-ok 6.1") {
		t.Fatalf("no marker from the guest's init (got %q; qemu: %v)", got, werr)
	}
}

// qemuBinary is CUBE_VMTEST_QEMU if set, else qemu-system-x86_64 on PATH.
func qemuBinary() (string, error) {
	if p := os.Getenv("CUBE_VMTEST_QEMU"); p != "" {
		return p, nil
	}
	return exec.LookPath("qemu-system-x86_64")
}
