//go:build linux

// Package cpu prepares a vCPU's architectural identity: the CPUID table
// (KVM_GET_SUPPORTED_CPUID normalised for the guest: APIC ids, topology,
// hypervisor bit, KVM paravirt leaves kept, PMU and power leaves hidden),
// the boot MSRs, and the local APIC's LINT0/LINT1 wiring.
package cpu

import (
	"fmt"
	"math/bits"

	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// CPUID bits.
const (
	leaf1ECXHypervisor  = 1 << 31
	leaf1ECXTSCDeadline = 1 << 24
	leaf1EDXHTT         = 1 << 28
)

// NormaliseCPUID returns the CPUID table for vCPU id of n vCPUs, derived
// from the host's supported set. The input is not modified.
func NormaliseCPUID(supported []kvm.CPUIDEntry, id, n int, tscDeadline bool) []kvm.CPUIDEntry {
	if n < 1 {
		n = 1
	}
	out := make([]kvm.CPUIDEntry, 0, len(supported)+4)
	coreBits := uint32(bits.Len(uint(n - 1)))
	for _, e := range supported {
		switch e.Function {
		case 0x1:
			e.EBX = e.EBX&0x0000ffff | uint32(id)<<24 | uint32(n)<<16
			e.EBX = e.EBX&^0xff00 | 8<<8 // CLFLUSH line size: 64 bytes
			e.ECX |= leaf1ECXHypervisor
			if tscDeadline {
				e.ECX |= leaf1ECXTSCDeadline
			}
			if n > 1 {
				e.EDX |= leaf1EDXHTT
			} else {
				e.EDX &^= leaf1EDXHTT
			}
		case 0x4:
			// Deterministic cache parameters: n cores per package, no SMT.
			e.EAX = e.EAX&0x3ff | uint32(n-1)<<26
			if (e.EAX>>5)&7 >= 3 { // L3 shared by all cores
				e.EAX |= uint32(n-1) << 14
			}
		case 0x6, 0xa:
			// No thermal/power management and no PMU for guests.
			e.EAX, e.EBX, e.ECX, e.EDX = 0, 0, 0, 0
		case 0xb, 0x1f:
			e.EDX = uint32(id)
			switch e.Index {
			case 0: // SMT level: one thread per core
				e.EAX, e.EBX, e.ECX = 0, 1, 1<<8
			case 1: // core level: n cores
				e.EAX, e.EBX, e.ECX = coreBits, uint32(n), 2<<8|1
			default:
				e.EAX, e.EBX, e.ECX = 0, 0, e.Index
			}
		case 0x80000008:
			e.ECX = e.ECX&^0xf0ff | uint32(n-1) | coreBits<<12
		case 0x8000001e:
			e.EAX = uint32(id)
			e.EBX = e.EBX &^ 0xff00 // one thread per core
		}
		out = append(out, e)
	}
	return out
}

// MSR indices initialised at boot.
const (
	MSRIA32SysenterCS  = 0x174
	MSRIA32SysenterESP = 0x175
	MSRIA32SysenterEIP = 0x176
	MSRStar            = 0xc0000081
	MSRLStar           = 0xc0000082
	MSRCStar           = 0xc0000083
	MSRSyscallMask     = 0xc0000084
	MSRKernelGSBase    = 0xc0000102
	MSRIA32TSC         = 0x10
	MSRIA32MiscEnable  = 0x1a0
	MSRMTRRDefType     = 0x2ff
)

// BootMSRs returns the MSR values a vCPU starts with: syscall MSRs
// cleared, fast strings enabled, MTRRs enabled with write-back default.
func BootMSRs() []kvm.MSREntry {
	return []kvm.MSREntry{
		{Index: MSRIA32SysenterCS}, {Index: MSRIA32SysenterESP}, {Index: MSRIA32SysenterEIP},
		{Index: MSRStar}, {Index: MSRLStar}, {Index: MSRCStar}, {Index: MSRSyscallMask},
		{Index: MSRKernelGSBase}, {Index: MSRIA32TSC},
		{Index: MSRIA32MiscEnable, Data: 1},
		{Index: MSRMTRRDefType, Data: 1<<11 | 6},
	}
}

// APIC LVT delivery modes.
const (
	apicModeNMI    = 4
	apicModeExtINT = 7
)

// SetupLINT wires LINT0 as ExtINT (the 8259 PIC) and LINT1 as NMI, the
// virtual-wire configuration Linux expects from a PC.
func SetupLINT(v *kvm.VCPU) error {
	l, err := v.GetLAPIC()
	if err != nil {
		return err
	}
	set := func(off int, mode uint32) {
		l.Set32(off, l.Get32(off)&^0x700|mode<<8)
	}
	set(kvm.APICRegLINT0, apicModeExtINT)
	set(kvm.APICRegLINT1, apicModeNMI)
	return v.SetLAPIC(l)
}

// Setup applies CPUID, boot MSRs and LINT wiring to v. MSRs the host
// refuses are reported.
func Setup(v *kvm.VCPU, supported []kvm.CPUIDEntry, n int, tscDeadline bool) error {
	if err := v.SetCPUID2(NormaliseCPUID(supported, v.ID, n, tscDeadline)); err != nil {
		return fmt.Errorf("cpuid: %w", err)
	}
	if err := v.SetMSRs(BootMSRs()); err != nil {
		return fmt.Errorf("msrs: %w", err)
	}
	if err := SetupLINT(v); err != nil {
		return fmt.Errorf("lapic: %w", err)
	}
	return nil
}
