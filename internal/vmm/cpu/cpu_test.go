//go:build linux

package cpu

import (
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

func find(es []kvm.CPUIDEntry, fn, idx uint32) kvm.CPUIDEntry {
	for _, e := range es {
		if e.Function == fn && e.Index == idx {
			return e
		}
	}
	return kvm.CPUIDEntry{Function: 0xffffffff}
}

func TestNormaliseCPUID(t *testing.T) {
	in := []kvm.CPUIDEntry{
		{Function: 0x1, EBX: 0xAB0000ff, EDX: leaf1EDXHTT},
		{Function: 0x4, Index: 0, EAX: 1<<5 | 0x1}, // L1
		{Function: 0x4, Index: 3, EAX: 3<<5 | 0x3}, // L3
		{Function: 0xa, EAX: 0x07300402},           // PMU
		{Function: 0xb, Index: 0}, {Function: 0xb, Index: 1}, {Function: 0xb, Index: 2},
		{Function: 0x40000000, EBX: 0x4b4d564b}, // "KVMK"
		{Function: 0x8000001e, EAX: 99, EBX: 0x0100},
	}
	out := NormaliseCPUID(in, 3, 4, true)
	if in[0].EBX != 0xAB0000ff {
		t.Fatal("input modified")
	}
	l1 := find(out, 1, 0)
	if l1.EBX>>24 != 3 || (l1.EBX>>16)&0xff != 4 || (l1.EBX>>8)&0xff != 8 || l1.EBX&0xff != 0xff {
		t.Fatalf("leaf 1 ebx %#x", l1.EBX)
	}
	if l1.ECX&leaf1ECXHypervisor == 0 || l1.ECX&leaf1ECXTSCDeadline == 0 || l1.EDX&leaf1EDXHTT == 0 {
		t.Fatalf("leaf 1 ecx %#x edx %#x", l1.ECX, l1.EDX)
	}
	if e := find(out, 4, 0); e.EAX>>26 != 3 || (e.EAX>>14)&0xfff != 0 {
		t.Fatalf("leaf 4 L1 %#x", e.EAX)
	}
	if e := find(out, 4, 3); (e.EAX>>14)&0xfff != 3 {
		t.Fatalf("leaf 4 L3 %#x", e.EAX)
	}
	if e := find(out, 0xa, 0); e.EAX != 0 {
		t.Fatal("PMU leaf not hidden")
	}
	if e := find(out, 0xb, 1); e.EBX != 4 || e.EAX != 2 || e.EDX != 3 || e.ECX != 0x201 {
		t.Fatalf("leaf 0xb core level %+v", e)
	}
	if e := find(out, 0xb, 2); e.EBX != 0 || e.ECX != 2 {
		t.Fatalf("leaf 0xb invalid level %+v", e)
	}
	if e := find(out, 0x40000000, 0); e.EBX != 0x4b4d564b {
		t.Fatal("KVM leaf dropped")
	}
	if e := find(out, 0x8000001e, 0); e.EAX != 3 || e.EBX&0xff00 != 0 {
		t.Fatalf("leaf 0x8000001e %+v", e)
	}
	one := NormaliseCPUID(in, 0, 1, false)
	if e := find(one, 1, 0); e.EDX&leaf1EDXHTT != 0 || e.ECX&leaf1ECXTSCDeadline != 0 {
		t.Fatalf("1 vCPU leaf 1 %+v", e)
	}
}

// TestSetupOnKVM applies the normalised table, MSRs and LINT set-up to a
// real vCPU and reads them back.
func TestSetupOnKVM(t *testing.T) {
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
	s, err := kvm.Open("")
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	vm, err := s.CreateVM()
	if err != nil {
		t.Fatal(err)
	}
	defer vm.Close()
	if err := vm.CreateIRQChip(); err != nil {
		t.Fatal(err)
	}
	c, err := vm.CreateVCPU(1)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sup, err := s.SupportedCPUID()
	if err != nil {
		t.Fatal(err)
	}
	if err := Setup(c, sup, 2, true); err != nil {
		t.Fatal(err)
	}
	got, err := c.GetCPUID2()
	if err != nil {
		t.Fatal(err)
	}
	if e := find(got, 1, 0); e.EBX>>24 != 1 || e.ECX&leaf1ECXHypervisor == 0 {
		t.Fatalf("leaf 1 %+v", e)
	}
	l, err := c.GetLAPIC()
	if err != nil {
		t.Fatal(err)
	}
	if (l.Get32(kvm.APICRegLINT0)>>8)&7 != apicModeExtINT || (l.Get32(kvm.APICRegLINT1)>>8)&7 != apicModeNMI {
		t.Fatalf("LINT0 %#x LINT1 %#x", l.Get32(kvm.APICRegLINT0), l.Get32(kvm.APICRegLINT1))
	}
	m := []kvm.MSREntry{{Index: MSRMTRRDefType}}
	if n, err := c.GetMSRs(m); err != nil || n != 1 || m[0].Data != 1<<11|6 {
		t.Fatalf("MTRRdefType %+v n=%d %v", m, n, err)
	}
}
