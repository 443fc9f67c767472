//go:build linux && vmtest

package vmtest

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

// console collects a guest's serial output.
type console struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (c *console) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.b.Len() < 1<<20 {
		c.b.Write(p)
	}
	return len(p), nil
}

func (c *console) String() string { c.mu.Lock(); defer c.mu.Unlock(); return c.b.String() }

// TestLinuxBootInProcess boots the built guest kernel on the VMM core
// (package machine, in this process) with a busybox initramfs: both entry
// paths, the bzImage 64-bit boot protocol and the vmlinux PVH entry. The
// guest's /init prints a marker on the 8250 console and resets through the
// i8042, which must end the VM as a guest shutdown.
func TestLinuxBootInProcess(t *testing.T) {
	d := dir(t)
	initrd, err := os.ReadFile(filepath.Join(d, "guest", "initrd.cpio"))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, file string
		vcpus      int
	}{
		{"bzImage", "bzImage", 1},
		{"PVH", "vmlinux", 1},
		{"bzImage-2vcpu", "bzImage", 2},
	} {
		t.Run(c.name, func(t *testing.T) {
			kernel, err := os.ReadFile(filepath.Join(d, "guest", c.file))
			if err != nil {
				t.Fatal(err)
			}
			out := &console{}
			m, err := machine.New(machine.Spec{
				Kernel: kernel, KernelFormat: boot.FormatAuto, Initrd: initrd,
				Cmdline: "console=ttyS0 reboot=k panic=-1 quiet",
				MemSize: 256 << 20, VCPUs: c.vcpus, Serial: out,
			})
			if err != nil {
				t.Fatal(err)
			}
			defer m.VM.Close()
			start := time.Now()
			if err := m.VM.Start(); err != nil {
				t.Fatal(err)
			}
			var res vm.Result
			select {
			case <-m.VM.Done():
				res = m.VM.Wait()
			case <-time.After(3 * time.Minute):
				res = m.VM.Stop()
				t.Errorf("guest did not stop within 3 minutes (stopped: %+v)", res)
			}
			el := time.Since(start)
			con := out.String()
			t.Logf("console:\n%s", indent(con))
			if !strings.Contains(con, "@@l2 init-ok kernel=6.1") {
				t.Fatalf("the guest's /init did not report (result %+v)", res)
			}
			if !strings.Contains(con, "cpus="+string(rune('0'+c.vcpus))) {
				t.Errorf("guest saw the wrong number of CPUs (want %d)", c.vcpus)
			}
			if res.Outcome != vm.OutcomeShutdown {
				t.Fatalf("outcome %+v, want %s (guest reset)", res, vm.OutcomeShutdown)
			}
			t.Logf("start to guest reset: %.2fs", el.Seconds())
		})
	}
}

// indent prefixes every line so that guest output cannot pass for test
// results on the L1 console.
func indent(s string) string {
	return "    > " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    > ")
}
