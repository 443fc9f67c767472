//go:build linux && !vmtest

package vmtest

import (
	"bufio"
	"context"
	"io"
	"os"
	"os/exec"
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
		t.Fatalf("CUBE_VMTEST_RUN %q: spaces, quotes and shell characters cannot pass the kernel command line", m.Run)
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

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	args := m.Args()
	t.Logf("%q", args)
	cmd := exec.CommandContext(ctx, args[0], args[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.Stdin = nil
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var rep Report
	sc := bufio.NewScanner(out)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var firstUp time.Duration
	for sc.Scan() {
		line := sc.Text()
		el := time.Since(start)
		io.WriteString(logw, el.Truncate(time.Millisecond).String()+" "+line+"\n")
		t.Logf("%7.2fs | %s", el.Seconds(), line)
		wasUp := rep.L1Up
		rep.Feed(line)
		if !wasUp && rep.L1Up {
			firstUp = el
		}
	}
	werr := cmd.Wait()
	t.Logf("L1 /init reached after %.1fs; whole run %.1fs", firstUp.Seconds(), time.Since(start).Seconds())
	t.Logf("summary: %s", rep.Summary())
	if ctx.Err() != nil {
		t.Fatalf("timed out after %v (CUBE_VMTEST_TIMEOUT): %v", timeout, rep.Err())
	}
	if err := rep.Err(); err != nil {
		t.Fatalf("%v (qemu: %v)", err, werr)
	}
	if werr != nil {
		t.Fatalf("qemu: %v", werr)
	}
}
