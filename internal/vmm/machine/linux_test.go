//go:build linux

package machine

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// guestKernelDir finds the kernel `make kernel` built ($CUBE_KERNEL_DIR,
// else the newest $CUBE_CACHE_DIR/kernel/*/ with a vmlinux).
func guestKernelDir() string {
	if d := os.Getenv("CUBE_KERNEL_DIR"); d != "" {
		return d
	}
	cache := os.Getenv("CUBE_CACHE_DIR")
	if cache == "" {
		cache = "/var/cache/cube"
	}
	m, _ := filepath.Glob(filepath.Join(cache, "kernel", "*", "vmlinux"))
	sort.Slice(m, func(i, j int) bool {
		a, _ := os.Stat(m[i])
		b, _ := os.Stat(m[j])
		return a.ModTime().After(b.ModTime())
	})
	if len(m) == 0 {
		return ""
	}
	return filepath.Dir(m[0])
}

// TestLinuxPVHEarlyBoot boots the real guest kernel (vmlinux, PVH entry)
// and waits for it to report the memory map, kvm-clock and the MP table
// on the serial console: this checks the PVH start info, e820, command
// line, CPUID and MP table against Linux itself. On KVM-PVM the guest
// kernel is emulated instruction by instruction, so this takes ~30 s and
// Linux gets no further than early set-up; the full boot runs in `make
// vmtest`.
func TestLinuxPVHEarlyBoot(t *testing.T) {
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	if testing.Short() {
		t.Skip("slow under KVM-PVM (-short)")
	}
	dir := guestKernelDir()
	if dir == "" {
		t.Skip("no guest kernel built (make kernel)")
	}
	kernel, err := ReadFile(filepath.Join(dir, "vmlinux"), 256<<20)
	if err != nil {
		t.Fatal(err)
	}
	out := &syncBuf{}
	m, err := New(Spec{
		Kernel: kernel, MemSize: 256 << 20, VCPUs: 2, Serial: out,
		Cmdline: "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	if err := m.VM.Start(); err != nil {
		t.Fatal(err)
	}
	want := []string{
		"Command line: console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=-1",
		"BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
		"BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
		"Hypervisor detected: KVM",
		"MPTABLE: OEM ID: CUBE",
		"IOAPIC[0]: apic_id 2, version 17, address 0xfec00000, GSI 0-23",
		"Processors: 2",
	}
	deadline := time.Now().Add(3 * time.Minute)
	for {
		s := out.String()
		missing := ""
		for _, w := range want {
			if !strings.Contains(s, w) {
				missing = w
				break
			}
		}
		if missing == "" {
			break
		}
		select {
		case <-m.VM.Done():
			t.Fatalf("guest stopped (%+v) before printing %q:\n%s", m.VM.Wait(), missing, s)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %q on the console after 3 minutes:\n%s", missing, s)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if r := m.VM.Stop(); r.Outcome != "stopped" {
		t.Fatalf("result %+v", r)
	}
}
