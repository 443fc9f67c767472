//go:build linux

package vm

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/synth"
)

// portLog records bytes written to a port range and wakes waiters.
type portLog struct {
	mu   sync.Mutex
	out  []byte
	cond *sync.Cond
}

func newPortLog() *portLog { p := &portLog{}; p.cond = sync.NewCond(&p.mu); return p }

func (p *portLog) PIORead(port uint16, data []byte) {
	for i := range data {
		data[i] = 0
	}
}

func (p *portLog) PIOWrite(port uint16, data []byte) {
	p.mu.Lock()
	p.out = append(p.out, data...)
	p.cond.Broadcast()
	p.mu.Unlock()
}

// waitFor waits until the log contains want.
func (p *portLog) waitFor(t *testing.T, want string) {
	t.Helper()
	deadline := time.AfterFunc(10*time.Second, func() { p.mu.Lock(); p.cond.Broadcast(); p.mu.Unlock() })
	defer deadline.Stop()
	start := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	for !bytes.Contains(p.out, []byte(want)) {
		if time.Since(start) > 10*time.Second {
			t.Fatalf("guest output %q, want %q", p.out, want)
		}
		p.cond.Wait()
	}
}

// mmioDev answers reads with a pattern and logs writes.
type mmioDev struct {
	mu  sync.Mutex
	log []string
}

func (d *mmioDev) MMIORead(off uint64, data []byte) {
	for i := range data {
		data[i] = byte(0xA0 + i)
	}
	d.mu.Lock()
	d.log = append(d.log, fmt.Sprintf("R%x/%d", off, len(data)))
	d.mu.Unlock()
}

func (d *mmioDev) MMIOWrite(off uint64, data []byte) {
	d.mu.Lock()
	d.log = append(d.log, fmt.Sprintf("W%x=%x", off, data))
	d.mu.Unlock()
}

func (d *mmioDev) entries() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.log...)
}

func needKVM(t *testing.T) {
	t.Helper()
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
}

// newGuest builds a 1-vCPU VM with code loaded raw and a port log on COM1.
func newGuest(t *testing.T, code []byte) (*VM, *portLog) {
	t.Helper()
	needKVM(t)
	v, err := New(Config{MemSize: 64 << 20, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	p := newPortLog()
	if err := v.PIO.AddPIO("com1", 0x3f8, 8, p); err != nil {
		t.Fatal(err)
	}
	e, err := boot.LoadRaw(v.Mem, code)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Apply(v.CPUs[0].VCPU); err != nil {
		t.Fatal(err)
	}
	return v, p
}

func TestSerialOutputViaPortIO(t *testing.T) {
	v, p := newGuest(t, synth.Hello("hello from the guest\n"))
	if err := v.Start(); err != nil {
		t.Fatal(err)
	}
	p.waitFor(t, "hello from the guest\n")
	r := v.Stop()
	if r.Outcome != OutcomeStopped {
		t.Fatalf("result %+v, want stopped", r)
	}
	if v.Metrics.Exits()["io"] < uint64(len("hello from the guest\n")) {
		t.Fatalf("exits %v", v.Metrics.Exits())
	}
}

func TestMMIOExitsRoutedToDevice(t *testing.T) {
	const base = boot.VirtioMMIOBase
	// At CPL 3 (native on PVM): store, load+store, store to the last word.
	a := synth.New(synth.LoadAddr).ToUser(0x80000, false).Store32(base, 0x12345678).Copy32(base+4, base+8).Store32(base+0xffc, 1).Spin()
	v, _ := newGuest(t, a.Bytes())
	d := &mmioDev{}
	if err := v.MMIO.AddMMIO("test", base, 0x1000, d); err != nil {
		t.Fatal(err)
	}
	if err := v.Start(); err != nil {
		t.Fatal(err)
	}
	want := []string{"W0=78563412", "R4/4", "W8=a0a1a2a3", "Wffc=01000000"}
	deadline := time.Now().Add(10 * time.Second)
	for len(d.entries()) < len(want) && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	v.Stop()
	if got := d.entries(); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("device saw %v, want %v", got, want)
	}
}

func TestInterruptsDelivered(t *testing.T) {
	const handler = 0x101000
	const idtBase = 0x2000
	const vector = 0x30
	const gsi = 5
	v, p := newGuest(t, synth.New(synth.LoadAddr).Sti().OutStr(0x3f8, "ready\n").Spin().Bytes())
	h := synth.New(handler).OutStr(0x3f8, "I").EOI().Iretq().Bytes()
	if err := v.Mem.Write(handler, h); err != nil {
		t.Fatal(err)
	}
	if err := v.Mem.Write(idtBase+vector*16, synth.IDTGate(handler)); err != nil {
		t.Fatal(err)
	}
	c := v.CPUs[0]
	s, err := c.GetSregs()
	if err != nil {
		t.Fatal(err)
	}
	s.IDT = kvm.DTable{Base: idtBase, Limit: (vector+1)*16 - 1}
	if err := c.SetSregs(s); err != nil {
		t.Fatal(err)
	}
	// Firmware-style set-up done from the host: enable the LAPIC, mask
	// the PIC's LINT0 path, route IOAPIC pin 5 to vector 0x30 on APIC 0.
	l, err := c.GetLAPIC()
	if err != nil {
		t.Fatal(err)
	}
	l.Set32(kvm.APICRegSVR, 0x1ff)
	l.Set32(kvm.APICRegLINT0, 1<<16)
	if err := c.SetLAPIC(l); err != nil {
		t.Fatal(err)
	}
	chip, err := v.KVM.GetIRQChip(kvm.IRQChipIOAPIC)
	if err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint64(chip.Chip[24+gsi*8:], vector)
	if err := v.KVM.SetIRQChip(chip); err != nil {
		t.Fatal(err)
	}
	irq, err := v.IRQLine(gsi)
	if err != nil {
		t.Fatal(err)
	}
	if err := v.Start(); err != nil {
		t.Fatal(err)
	}
	p.waitFor(t, "ready\n")
	for i := 1; i <= 3; i++ {
		if err := irq.Trigger(); err != nil {
			t.Fatal(err)
		}
		p.waitFor(t, "ready\n"+string(bytes.Repeat([]byte("I"), i)))
	}
	if r := v.Stop(); r.Outcome != OutcomeStopped {
		t.Fatalf("result %+v", r)
	}
}

func counter(t *testing.T, v *VM) uint64 {
	b, err := v.Mem.Slice(synth.CounterAddr, 8)
	if err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b)
}

func TestSpinningGuestPauseResumeStop(t *testing.T) {
	v, p := newGuest(t, synth.Hello("go\n"))
	if err := v.Start(); err != nil {
		t.Fatal(err)
	}
	p.waitFor(t, "go\n")
	for deadline := time.Now().Add(10 * time.Second); counter(t, v) == 0; {
		if time.Now().After(deadline) {
			t.Fatal("guest counter never moved")
		}
		time.Sleep(time.Millisecond)
	}
	if err := v.Pause(); err != nil {
		t.Fatal(err)
	}
	if v.State() != StatePaused {
		t.Fatalf("state %s", v.State())
	}
	c1 := counter(t, v)
	time.Sleep(50 * time.Millisecond)
	if c2 := counter(t, v); c2 != c1 {
		t.Fatalf("counter moved while paused: %d -> %d", c1, c2)
	}
	// vCPU state is readable while paused (snapshots rely on it).
	regs, err := v.CPUs[0].GetRegs()
	if err != nil {
		t.Fatal(err)
	}
	if regs.RIP < synth.LoadAddr || regs.RIP > synth.LoadAddr+0x1000 {
		t.Fatalf("paused rip %#x outside the guest code", regs.RIP)
	}
	if err := v.Resume(); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); counter(t, v) == c1; {
		if time.Now().After(deadline) {
			t.Fatal("guest did not run after resume")
		}
		time.Sleep(time.Millisecond)
	}
	stopWithin(t, v, 10*time.Second, "spinning guest was not stopped")
	if v.State() != StateStopped {
		t.Fatalf("state %s", v.State())
	}
}

func TestTripleFaultReportedAsCrash(t *testing.T) {
	for _, tc := range []struct {
		name string
		code []byte
	}{
		{"user", synth.TripleFault("boom\n")},
		{"kernel", synth.New(synth.LoadAddr).UD2().Bytes()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			v, _ := newGuest(t, tc.code)
			if err := v.Start(); err != nil {
				t.Fatal(err)
			}
			select {
			case <-v.Done():
			case <-time.After(10 * time.Second):
				t.Fatal("triple-faulting guest hung")
			}
			r := v.Wait()
			if r.Outcome != OutcomeCrashed {
				t.Fatalf("result %+v, want crashed", r)
			}
			t.Logf("crash: %+v", r)
		})
	}
}

func TestMultipleVCPUsStop(t *testing.T) {
	needKVM(t)
	v, err := New(Config{MemSize: 64 << 20, VCPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	e, err := boot.LoadRaw(v.Mem, synth.Hello(""))
	if err != nil {
		t.Fatal(err)
	}
	if err := e.Apply(v.CPUs[0].VCPU); err != nil {
		t.Fatal(err)
	}
	if err := v.Start(); err != nil {
		t.Fatal(err)
	}
	// The AP waits for INIT/SIPI inside KVM; pause and stop must still work.
	if err := v.Pause(); err != nil {
		t.Fatal(err)
	}
	if err := v.Resume(); err != nil {
		t.Fatal(err)
	}
	if r := v.Stop(); r.Outcome != OutcomeStopped {
		t.Fatalf("result %+v", r)
	}
}

func TestMemoryFilePrivate(t *testing.T) {
	needKVM(t)
	path := filepath.Join(t.TempDir(), "mem")
	img := make([]byte, 4<<20)
	copy(img[synth.LoadAddr:], synth.Hello("from file\n"))
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	v, err := New(Config{MemSize: 4 << 20, VCPUs: 1, MemMode: MemFilePrivate, MemFile: path})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	p := newPortLog()
	v.PIO.AddPIO("com1", 0x3f8, 8, p)
	// Page tables and GDT go in with the code already in the file.
	if _, err := boot.LoadRaw(v.Mem, synth.Hello("from file\n")); err != nil {
		t.Fatal(err)
	}
	e := boot.Entry{Mode: boot.ModeLong64, Regs: kvm.Regs{RIP: synth.LoadAddr, RSP: boot.RawStackTop, RFLAGS: 0x3002}}
	if err := e.Apply(v.CPUs[0].VCPU); err != nil {
		t.Fatal(err)
	}
	v.Start()
	p.waitFor(t, "from file\n")
	for deadline := time.Now().Add(10 * time.Second); counter(t, v) == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	v.Stop()
	if counter(t, v) == 0 {
		t.Fatal("guest never counted")
	}
	after, _ := os.ReadFile(path)
	if !bytes.Equal(after, img) {
		t.Fatal("guest writes reached the MAP_PRIVATE memory file")
	}
}

func TestMemorySlice(t *testing.T) {
	m, err := NewMemory(boot.MMIOGapStart+(8<<20), MemAnonymous, "")
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for _, tc := range []struct {
		gpa, n uint64
		ok     bool
	}{
		{0, 4096, true},
		{boot.MMIOGapStart - 4096, 4096, true},
		{boot.MMIOGapStart - 4096, 4097, false},
		{boot.MMIOGapStart, 1, false},
		{boot.MMIOGapEnd, 8 << 20, true},
		{boot.MMIOGapEnd, 8<<20 + 1, false},
		{^uint64(0), 2, false},
		{1 << 62, 1, false},
	} {
		_, err := m.Slice(tc.gpa, tc.n)
		if (err == nil) != tc.ok {
			t.Errorf("Slice(%#x, %#x) err=%v, want ok=%v", tc.gpa, tc.n, err, tc.ok)
		}
	}
	a, _ := m.Slice(boot.MMIOGapEnd, 1)
	a[0] = 7
	if m.Host()[boot.MMIOGapStart] != 7 {
		t.Fatal("high RAM does not follow low RAM in the host mapping")
	}
}

type panicDev struct{}

func (panicDev) PIORead(uint16, []byte)  { panic("device bug") }
func (panicDev) PIOWrite(uint16, []byte) { panic("device bug") }

func TestDevicePanicStopsVM(t *testing.T) {
	v, _ := newGuest(t, synth.New(synth.LoadAddr).OutStr(0x60, "x").Spin().Bytes())
	if err := v.PIO.AddPIO("bad", 0x60, 1, panicDev{}); err != nil {
		t.Fatal(err)
	}
	v.Start()
	select {
	case <-v.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("vm still running after a device panic")
	}
	if r := v.Wait(); r.Outcome != OutcomeCrashed || !strings.Contains(r.Reason, "device bug") {
		t.Fatalf("result %+v", r)
	}
}

func TestStringIO(t *testing.T) {
	const data = 0x102000
	msg := "string I/O through one rep outsb\n"
	v, p := newGuest(t, synth.New(synth.LoadAddr).RepOutsb(0x3f8, data, uint32(len(msg))).Spin().Bytes())
	if err := v.Mem.Write(data, []byte(msg)); err != nil {
		t.Fatal(err)
	}
	v.Start()
	p.waitFor(t, msg)
	v.Stop()
	if n := v.Metrics.Exits()["io"]; n >= uint64(len(msg)) {
		t.Logf("io exits %d: the string was not batched (allowed, just slower)", n)
	}
}

// TestPauseResumeStress pauses and resumes a spinning guest many times,
// with a stop racing the last ones.
func TestPauseResumeStress(t *testing.T) {
	v, p := newGuest(t, synth.Hello("x\n"))
	v.Start()
	p.waitFor(t, "x\n")
	for i := 0; i < 200; i++ {
		if err := v.Pause(); err != nil {
			t.Fatalf("pause %d: %v", i, err)
		}
		if err := v.Resume(); err != nil {
			t.Fatalf("resume %d: %v", i, err)
		}
	}
	go func() {
		for v.Pause() == nil && v.Resume() == nil {
		}
	}()
	stopWithin(t, v, 20*time.Second, "stop racing pause/resume hung")
	if v.Metrics.Pauses.Load() < 200 {
		t.Fatalf("pauses %d", v.Metrics.Pauses.Load())
	}
}

// stopWithin stops v and fails the test with msg unless it stops, with
// outcome stopped, within d.
func stopWithin(t *testing.T, v *VM, d time.Duration, msg string) {
	t.Helper()
	done := make(chan Result, 1)
	go func() { done <- v.Stop() }()
	select {
	case r := <-done:
		if r.Outcome != OutcomeStopped {
			t.Fatalf("result %+v", r)
		}
	case <-time.After(d):
		t.Fatal(msg)
	}
}
