//go:build linux

package machine

import (
	"bytes"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/synth"
	"github.com/cubesandbox/cube/internal/vmm/vm"
)

func TestInsertArgs(t *testing.T) {
	for _, c := range [][3]string{
		{"console=ttyS0", "a=1", "console=ttyS0 a=1"},
		{"console=ttyS0 -- -c echo", "a=1", "console=ttyS0 a=1 -- -c echo"},
		{"", "a=1", "a=1"},
		{"-- x", "a=1", "a=1 -- x"},
	} {
		if got := InsertArgs(c[0], []string{c[1]}); got != c[2] {
			t.Errorf("InsertArgs(%q) = %q, want %q", c[0], got, c[2])
		}
	}
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) { s.mu.Lock(); defer s.mu.Unlock(); return s.b.Write(p) }
func (s *syncBuf) String() string              { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

type regDev struct {
	mu   sync.Mutex
	last uint32
	irq  devices.IRQLine
}

func (d *regDev) MMIORead(off uint64, data []byte) {}
func (d *regDev) MMIOWrite(off uint64, data []byte) {
	d.mu.Lock()
	d.last = uint32(data[0]) | uint32(data[1])<<8 | uint32(data[2])<<16 | uint32(data[3])<<24
	d.mu.Unlock()
}

// TestMachineSyntheticGuest boots a raw guest on the assembled machine:
// its console output reaches the serial writer through the real 8250
// model, its MMIO store reaches a device in the first virtio slot, and an
// i8042 reset stops the VM as a guest shutdown.
func TestMachineSyntheticGuest(t *testing.T) {
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	out := &syncBuf{}
	dev := &regDev{}
	code := synth.New(synth.LoadAddr).OutStr(0x3f8, "console ok\n").
		Store32(boot.VirtioMMIOBase+0x50, 0xCAFE).
		OutStr(0x64, "\xFE"). // i8042 reset
		Spin().Bytes()
	m, err := New(Spec{
		Kernel: code, KernelFormat: boot.FormatRaw, MemSize: 64 << 20, VCPUs: 1, Serial: out,
		Virtio: []VirtioDevice{{Name: "test", Build: func(mem devices.GuestMemory, irq devices.IRQLine) (devices.MMIODevice, error) {
			dev.irq = irq
			return dev, nil
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	if !strings.Contains(m.Cmdline, "virtio_mmio.device=4K@0xd0000000:5") {
		t.Fatalf("cmdline %q", m.Cmdline)
	}
	if err := m.VM.Start(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-m.VM.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("guest did not reset")
	}
	r := m.VM.Wait()
	if r.Outcome != vm.OutcomeShutdown || !strings.Contains(r.Reason, "i8042") {
		t.Fatalf("result %+v", r)
	}
	if out.String() != "console ok\n" {
		t.Fatalf("serial %q", out.String())
	}
	if dev.last != 0xCAFE || dev.irq == nil {
		t.Fatalf("device saw %#x", dev.last)
	}
	if len(m.VM.StatefulDevices()) < 3 {
		t.Fatalf("stateful devices %v", m.VM.StatefulDevices())
	}
}

// TestIOEventFDNotify checks a guest's QueueNotify write to a virtio
// transport reaches it through the ioeventfd (no MMIO exit) and an
// MMIO-exit path is still used for other registers.
func TestIOEventFDNotify(t *testing.T) {
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	code := synth.New(synth.LoadAddr).ToUser(0x80000, false).
		Store32(boot.VirtioMMIOBase+virtio.RegQueueNotify, 0).
		Store32(boot.VirtioMMIOBase+virtio.RegQueueNotify, 0).
		Store32(boot.VirtioMMIOBase+virtio.RegStatus, 0).
		Spin().Bytes()
	m, err := New(Spec{
		Kernel: code, KernelFormat: boot.FormatRaw, MemSize: 64 << 20, VCPUs: 1,
		Virtio: []VirtioDevice{{Name: "rng", Build: func(mem devices.GuestMemory, irq devices.IRQLine) (devices.MMIODevice, error) {
			return virtio.NewTransport(rng.New(), mem, irq, virtio.Options{}), nil
		}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	if err := m.VM.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for (m.VM.Metrics.Notifies.Load() < 2 || m.VM.Metrics.Exits()["mmio"] < 1) && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	m.VM.Stop()
	if n := m.VM.Metrics.Notifies.Load(); n != 2 {
		t.Fatalf("ioeventfd notifies %d, want 2 (exits %v)", n, m.VM.Metrics.Exits())
	}
	if e := m.VM.Metrics.Exits()["mmio"]; e != 1 {
		t.Fatalf("mmio exits %d, want 1 (the status write)", e)
	}
}

// TestSerialInterrupt runs the guest side of the 8250 driver's interrupt
// path: the guest enables the THRE interrupt on COM1, the UART raises
// IRQ 4 through its irqfd, the IOAPIC (routed from the host here, as
// firmware would) delivers vector 0x34 to an IDT handler that prints.
func TestSerialInterrupt(t *testing.T) {
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	const handler, idtBase, vector = 0x101000, 0x2000, 0x34
	code := synth.New(synth.LoadAddr).Sti().
		OutStr(0x3f9, "\x02"). // IER = THRI: THR is empty, so this interrupts
		Spin().Bytes()
	out := &syncBuf{}
	m, err := New(Spec{Kernel: code, KernelFormat: boot.FormatRaw, MemSize: 64 << 20, VCPUs: 1, Serial: out})
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	// Handler: read IIR (acknowledges THRE), print "T", disable IER, EOI.
	h := synth.New(handler).InByte(0x3fa).OutStr(0x3f8, "T").OutStr(0x3f9, "\x00").EOI().Iretq().Bytes()
	m.VM.Mem.Write(handler, h)
	m.VM.Mem.Write(idtBase+vector*16, synth.IDTGate(handler))
	c := m.VM.CPUs[0]
	s, _ := c.GetSregs()
	s.IDT = kvm.DTable{Base: idtBase, Limit: (vector+1)*16 - 1}
	if err := c.SetSregs(s); err != nil {
		t.Fatal(err)
	}
	l, _ := c.GetLAPIC()
	l.Set32(kvm.APICRegSVR, 0x1ff)
	l.Set32(kvm.APICRegLINT0, 1<<16)
	if err := c.SetLAPIC(l); err != nil {
		t.Fatal(err)
	}
	chip, err := m.VM.KVM.GetIRQChip(kvm.IRQChipIOAPIC)
	if err != nil {
		t.Fatal(err)
	}
	chip.Chip[24+4*8] = vector // pin 4 (COM1): fixed, edge, unmasked, APIC 0
	for i := 1; i < 8; i++ {
		chip.Chip[24+4*8+i] = 0
	}
	if err := m.VM.KVM.SetIRQChip(chip); err != nil {
		t.Fatal(err)
	}
	if err := m.VM.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for both interrupts (however loaded the host), then a little
	// longer so that a third, wrong one would show.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(out.String(), "TT") && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	m.VM.Stop()
	// Two interrupts: enabling THRI with THR empty raises one; the "T"
	// the handler transmits empties THR again while THRI is still on and
	// raises a second (pending in the LAPIC until the first EOI). In the
	// second run IER is already 0, so its "T" raises nothing.
	if got := out.String(); got != "TT" {
		t.Fatalf("console %q, want %q", got, "TT")
	}
}
