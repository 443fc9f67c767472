//go:build linux

package kvm

import (
	"testing"

	"golang.org/x/sys/unix"
	"unsafe"
)

func TestABISizes(t *testing.T) {
	for _, c := range []struct {
		name string
		got  uintptr
		want uintptr
	}{
		{"kvm_regs", unsafe.Sizeof(Regs{}), 144},
		{"kvm_segment", unsafe.Sizeof(Segment{}), 24},
		{"kvm_sregs", unsafe.Sizeof(Sregs{}), 312},
		{"kvm_fpu", unsafe.Sizeof(FPU{}), 416},
		{"kvm_lapic_state", unsafe.Sizeof(LAPICState{}), 1024},
		{"kvm_cpuid_entry2", unsafe.Sizeof(CPUIDEntry{}), 40},
		{"kvm_msr_entry", unsafe.Sizeof(MSREntry{}), 16},
		{"kvm_vcpu_events", unsafe.Sizeof(VCPUEvents{}), 64},
		{"kvm_debugregs", unsafe.Sizeof(DebugRegs{}), 128},
		{"kvm_xsave", unsafe.Sizeof(XSave{}), 4096},
		{"kvm_xcrs", unsafe.Sizeof(XCRs{}), 392},
		{"kvm_clock_data", unsafe.Sizeof(ClockData{}), 48},
		{"kvm_irqchip", unsafe.Sizeof(IRQChip{}), 520},
		{"kvm_pit_state2", unsafe.Sizeof(PITState2{}), 112},
		{"kvm_pit_config", unsafe.Sizeof(PITConfig{}), 64},
		{"kvm_userspace_memory_region", unsafe.Sizeof(userspaceMemoryRegion{}), 32},
		{"kvm_irqfd", unsafe.Sizeof(irqfd{}), 32},
		{"kvm_ioeventfd", unsafe.Sizeof(ioeventfd{}), 64},
		{"kvm_enable_cap", unsafe.Sizeof(enableCap{}), 104},
		{"kvm_run head", unsafe.Offsetof(runHeader{}.Union), 32},
	} {
		if c.got != c.want {
			t.Errorf("%s: size %d, want %d", c.name, c.got, c.want)
		}
	}
	// Spot-check ioctl numbers against linux/kvm.h.
	for _, c := range []struct {
		name      string
		got, want uintptr
	}{
		{"KVM_CREATE_VM", ioCreateVM, 0xAE01},
		{"KVM_RUN", ioRun, 0xAE80},
		{"KVM_SET_USER_MEMORY_REGION", ioSetUserMemoryRegion, 0x4020AE46},
		{"KVM_GET_REGS", ioGetRegs, 0x8090AE81},
		{"KVM_SET_SREGS", ioSetSregs, 0x4138AE84},
		{"KVM_GET_SUPPORTED_CPUID", ioGetSupportedCPUID, 0xC008AE05},
		{"KVM_SET_CPUID2", ioSetCPUID2, 0x4008AE90},
		{"KVM_GET_LAPIC", ioGetLAPIC, 0x8400AE8E},
		{"KVM_IRQFD", ioIRQFD, 0x4020AE76},
		{"KVM_IOEVENTFD", ioIOEventFD, 0x4040AE79},
		{"KVM_CREATE_PIT2", ioCreatePIT2, 0x4040AE77},
		{"KVM_GET_IRQCHIP", ioGetIRQChip, 0xC208AE62},
		{"KVM_SET_IRQCHIP", ioSetIRQChip, 0x8208AE63},
		{"KVM_GET_XSAVE", ioGetXSave, 0x9000AEA4},
		{"KVM_GET_VCPU_EVENTS", ioGetVCPUEvents, 0x8040AE9F},
		{"KVM_GET_PIT2", ioGetPIT2, 0x8070AE9F},
		{"KVM_GET_CLOCK", ioGetClock, 0x8030AE7C},
		{"KVM_GET_MSRS", ioGetMSRs, 0xC008AE88},
	} {
		if c.got != c.want {
			t.Errorf("%s = %#x, want %#x", c.name, c.got, c.want)
		}
	}
}

func newVCPU(t *testing.T) (*System, *VM, *VCPU) {
	t.Helper()
	if !Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	s, err := Open("")
	if err != nil {
		t.Fatal(err)
	}
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	if err := vm.CreatePIT2(PITSpeakerDummy); err != nil {
		t.Fatal(err)
	}
	c, err := vm.CreateVCPU(0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); vm.Close(); s.Close() })
	return s, vm, c
}

// TestStateRoundTrip gets and sets back every piece of vCPU and VM state
// a snapshot needs, checking a modified field survives.
func TestStateRoundTrip(t *testing.T) {
	s, vm, c := newVCPU(t)
	cpuid, err := s.SupportedCPUID()
	if err != nil || len(cpuid) == 0 {
		t.Fatalf("supported cpuid: %d entries, %v", len(cpuid), err)
	}
	if err := c.SetCPUID2(cpuid); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetCPUID2()
	if err != nil || len(got) != len(cpuid) {
		t.Fatalf("get cpuid2: %d entries, %v", len(got), err)
	}

	r, err := c.GetRegs()
	if err != nil {
		t.Fatal(err)
	}
	r.RAX, r.R15, r.RIP = 0x1122334455667788, 42, 0x1000
	if err := c.SetRegs(r); err != nil {
		t.Fatal(err)
	}
	if r2, _ := c.GetRegs(); r2.RAX != r.RAX || r2.R15 != 42 || r2.RIP != 0x1000 {
		t.Fatalf("regs round trip: %+v", r2)
	}

	sr, err := c.GetSregs()
	if err != nil {
		t.Fatal(err)
	}
	sr.CS.Base, sr.CS.Selector = 0, 0
	sr.GDT.Base = 0x500
	if err := c.SetSregs(sr); err != nil {
		t.Fatal(err)
	}
	if sr2, _ := c.GetSregs(); sr2.GDT.Base != 0x500 {
		t.Fatalf("sregs round trip: gdt %+v", sr2.GDT)
	}

	f, err := c.GetFPU()
	if err != nil {
		t.Fatal(err)
	}
	f.XMM[3][0] = 0xAB
	if err := c.SetFPU(f); err != nil {
		t.Fatal(err)
	}
	if f2, _ := c.GetFPU(); f2.XMM[3][0] != 0xAB {
		t.Fatal("fpu round trip")
	}

	if s.CheckExtension(CapXSave) > 0 {
		x, err := c.GetXSave()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SetXSave(x); err != nil {
			t.Fatal(err)
		}
	}
	if s.CheckExtension(CapXCRs) > 0 {
		x, err := c.GetXCRs()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.SetXCRs(x); err != nil {
			t.Fatal(err)
		}
	}

	msrs := []MSREntry{{Index: 0xc0000102, Data: 0xdead000}, {Index: 0x174, Data: 0x10}}
	if err := c.SetMSRs(msrs); err != nil {
		t.Fatal(err)
	}
	back := []MSREntry{{Index: 0xc0000102}, {Index: 0x174}}
	if n, err := c.GetMSRs(back); err != nil || n != 2 || back[0].Data != 0xdead000 || back[1].Data != 0x10 {
		t.Fatalf("msrs round trip: n=%d %+v %v", n, back, err)
	}
	if idx, err := s.MSRIndexList(); err != nil || len(idx) == 0 {
		t.Fatalf("msr index list: %d, %v", len(idx), err)
	}

	l, err := c.GetLAPIC()
	if err != nil {
		t.Fatal(err)
	}
	l.Set32(APICRegLINT1, 0x400)
	if err := c.SetLAPIC(l); err != nil {
		t.Fatal(err)
	}
	if l2, _ := c.GetLAPIC(); l2.Get32(APICRegLINT1) != 0x400 {
		t.Fatalf("lapic round trip: lint1 %#x", l2.Get32(APICRegLINT1))
	}

	ev, err := c.GetVCPUEvents()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetVCPUEvents(ev); err != nil {
		t.Fatal(err)
	}
	dr, err := c.GetDebugRegs()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetDebugRegs(dr); err != nil {
		t.Fatal(err)
	}
	mp, err := c.GetMPState()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetMPState(mp); err != nil {
		t.Fatal(err)
	}

	clk, err := vm.GetClock()
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.SetClock(ClockData{Clock: clk.Clock + 1e9}); err != nil {
		t.Fatal(err)
	}
	if clk2, _ := vm.GetClock(); clk2.Clock < clk.Clock+1e9 {
		t.Fatalf("clock %d after setting %d", clk2.Clock, clk.Clock+1e9)
	}
	for _, id := range []uint32{IRQChipPICMaster, IRQChipPICSlave, IRQChipIOAPIC} {
		chip, err := vm.GetIRQChip(id)
		if err != nil {
			t.Fatal(err)
		}
		if err := vm.SetIRQChip(chip); err != nil {
			t.Fatal(err)
		}
	}
	pit, err := vm.GetPIT2()
	if err != nil {
		t.Fatal(err)
	}
	if err := vm.SetPIT2(pit); err != nil {
		t.Fatal(err)
	}
}

func TestImmediateExit(t *testing.T) {
	_, _, c := newVCPU(t)
	c.SetRequestInterruptWindow(true)
	c.SetImmediateExit(true)
	if !c.ImmediateExit() || c.run.RequestInterruptWindow != 1 {
		t.Fatal("immediate_exit / request_interrupt_window not set independently")
	}
	if err := c.Run(); err != unix.EINTR {
		t.Fatalf("KVM_RUN with immediate_exit set: %v, want EINTR", err)
	}
	c.SetImmediateExit(false)
	if c.ImmediateExit() {
		t.Fatal("immediate_exit still set")
	}
}

func TestIRQFDAndIOEventFD(t *testing.T) {
	_, vm, _ := newVCPU(t)
	_ = vm
	// Creation and deassignment of both kinds of eventfd binding.
	// (Delivery is covered by package vm's interrupt test.)
	efd := mustEventfd(t)
	if err := vm.IRQFD(efd, 5, false); err != nil {
		t.Fatal(err)
	}
	if err := vm.IRQFD(efd, 5, true); err != nil {
		t.Fatal(err)
	}
	dm := uint64(7)
	if err := vm.IOEventFD(efd, 0xd0000050, 4, false, &dm, false); err != nil {
		t.Fatal(err)
	}
	if err := vm.IOEventFD(efd, 0xd0000050, 4, false, &dm, true); err != nil {
		t.Fatal(err)
	}
	if err := vm.IRQLine(4, true); err != nil {
		t.Fatal(err)
	}
	if err := vm.IRQLine(4, false); err != nil {
		t.Fatal(err)
	}
}
