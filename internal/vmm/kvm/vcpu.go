//go:build linux

package kvm

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Exit reasons (KVM_EXIT_*).
const (
	ExitUnknown       = 0
	ExitException     = 1
	ExitIO            = 2
	ExitHypercall     = 3
	ExitDebug         = 4
	ExitHLT           = 5
	ExitMMIO          = 6
	ExitIRQWindowOpen = 7
	ExitShutdown      = 8
	ExitFailEntry     = 9
	ExitIntr          = 10
	ExitInternalError = 17
	ExitSystemEvent   = 24
)

// ExitName names an exit reason for logs and metrics.
func ExitName(r uint32) string {
	switch r {
	case ExitUnknown:
		return "unknown"
	case ExitException:
		return "exception"
	case ExitIO:
		return "io"
	case ExitHypercall:
		return "hypercall"
	case ExitDebug:
		return "debug"
	case ExitHLT:
		return "hlt"
	case ExitMMIO:
		return "mmio"
	case ExitIRQWindowOpen:
		return "irq_window_open"
	case ExitShutdown:
		return "shutdown"
	case ExitFailEntry:
		return "fail_entry"
	case ExitIntr:
		return "intr"
	case ExitInternalError:
		return "internal_error"
	case ExitSystemEvent:
		return "system_event"
	}
	return fmt.Sprintf("exit_%d", r)
}

// System event types (KVM_SYSTEM_EVENT_*).
const (
	SystemEventShutdown = 1
	SystemEventReset    = 2
	SystemEventCrash    = 3
)

// runHeader is the fixed head of struct kvm_run; the exit union starts at
// offset 32.
type runHeader struct {
	RequestInterruptWindow     uint8
	ImmediateExit              uint8
	_                          [6]uint8
	ExitReason                 uint32
	ReadyForInterruptInjection uint8
	IFFlag                     uint8
	Flags                      uint16
	CR8                        uint64
	APICBase                   uint64
	Union                      [256]byte
}

// VCPU is a KVM vCPU fd with its mapped kvm_run.
type VCPU struct {
	fd     int
	ID     int
	runMem []byte
	run    *runHeader
}

// FD returns the vCPU fd.
func (c *VCPU) FD() int { return c.fd }

// Close unmaps kvm_run and closes the fd.
func (c *VCPU) Close() error {
	if c.runMem != nil {
		unix.Munmap(c.runMem)
		c.runMem, c.run = nil, nil
	}
	return unix.Close(c.fd)
}

// Run enters the guest until the next exit. It returns unix.EINTR when a
// signal or immediate_exit kicked the vCPU out (exit reason ExitIntr).
func (c *VCPU) Run() error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), ioRun, 0)
	if e != 0 {
		return e
	}
	return nil
}

// SetImmediateExit sets kvm_run.immediate_exit: while set, Run returns
// EINTR at once. Safe to call from any thread.
func (c *VCPU) SetImmediateExit(on bool) {
	var v uint32
	if on {
		v = 1
	}
	// immediate_exit is a byte; store atomically through the aligned word
	// holding it, preserving the neighbouring request_interrupt_window.
	w := (*uint32)(unsafe.Pointer(c.run))
	for {
		old := atomic.LoadUint32(w)
		nw := old&^0xff00 | v<<8
		if atomic.CompareAndSwapUint32(w, old, nw) {
			return
		}
	}
}

// ImmediateExit reports kvm_run.immediate_exit.
func (c *VCPU) ImmediateExit() bool {
	return atomic.LoadUint32((*uint32)(unsafe.Pointer(c.run)))&0xff00 != 0
}

// SetRequestInterruptWindow sets kvm_run.request_interrupt_window.
func (c *VCPU) SetRequestInterruptWindow(on bool) {
	if on {
		c.run.RequestInterruptWindow = 1
	} else {
		c.run.RequestInterruptWindow = 0
	}
}

// ExitReason is kvm_run.exit_reason after Run.
func (c *VCPU) ExitReason() uint32 { return c.run.ExitReason }

// IO describes a KVM_EXIT_IO. Data aliases kvm_run: for an IN the handler
// fills it before the next Run.
type IO struct {
	Out   bool
	Size  int
	Port  uint16
	Count int
	Data  []byte // Size*Count bytes
}

// IOExit decodes the io member of the exit union.
func (c *VCPU) IOExit() IO {
	u := c.run.Union[:]
	size := int(u[1])
	count := int(*(*uint32)(unsafe.Pointer(&u[4])))
	off := *(*uint64)(unsafe.Pointer(&u[8]))
	n := size * count
	var data []byte
	if off < uint64(len(c.runMem)) && uint64(n) <= uint64(len(c.runMem))-off {
		data = c.runMem[off : off+uint64(n)]
	}
	return IO{Out: u[0] == 1, Size: size, Port: *(*uint16)(unsafe.Pointer(&u[2])), Count: count, Data: data}
}

// MMIO describes a KVM_EXIT_MMIO. Data aliases kvm_run.
type MMIO struct {
	Addr  uint64
	Data  []byte
	Write bool
}

// MMIOExit decodes the mmio member of the exit union.
func (c *VCPU) MMIOExit() MMIO {
	u := c.run.Union[:]
	n := *(*uint32)(unsafe.Pointer(&u[16]))
	if n > 8 {
		n = 8
	}
	return MMIO{Addr: *(*uint64)(unsafe.Pointer(&u[0])), Data: u[8 : 8+n], Write: u[20] != 0}
}

// InternalError decodes KVM_EXIT_INTERNAL_ERROR: suberror and data words.
func (c *VCPU) InternalError() (uint32, []uint64) {
	u := c.run.Union[:]
	sub := *(*uint32)(unsafe.Pointer(&u[0]))
	n := *(*uint32)(unsafe.Pointer(&u[4]))
	if n > 16 {
		n = 16
	}
	d := make([]uint64, n)
	for i := range d {
		d[i] = *(*uint64)(unsafe.Pointer(&u[8+8*i]))
	}
	return sub, d
}

// FailEntryReason decodes KVM_EXIT_FAIL_ENTRY.
func (c *VCPU) FailEntryReason() uint64 { return *(*uint64)(unsafe.Pointer(&c.run.Union[0])) }

// SystemEventType decodes KVM_EXIT_SYSTEM_EVENT.
func (c *VCPU) SystemEventType() uint32 { return *(*uint32)(unsafe.Pointer(&c.run.Union[0])) }

func (c *VCPU) get(req uintptr, p unsafe.Pointer, name string) error {
	if _, err := ioctl(c.fd, req, p); err != nil {
		return fmt.Errorf("%s vcpu %d: %w", name, c.ID, err)
	}
	return nil
}

// GetRegs returns the general-purpose registers.
func (c *VCPU) GetRegs() (r Regs, err error) {
	err = c.get(ioGetRegs, unsafe.Pointer(&r), "KVM_GET_REGS")
	return
}

// SetRegs sets the general-purpose registers.
func (c *VCPU) SetRegs(r Regs) error { return c.get(ioSetRegs, unsafe.Pointer(&r), "KVM_SET_REGS") }

// GetSregs returns the special registers.
func (c *VCPU) GetSregs() (s Sregs, err error) {
	err = c.get(ioGetSregs, unsafe.Pointer(&s), "KVM_GET_SREGS")
	return
}

// SetSregs sets the special registers.
func (c *VCPU) SetSregs(s Sregs) error { return c.get(ioSetSregs, unsafe.Pointer(&s), "KVM_SET_SREGS") }

// GetFPU returns the FPU/SSE state.
func (c *VCPU) GetFPU() (f FPU, err error) {
	err = c.get(ioGetFPU, unsafe.Pointer(&f), "KVM_GET_FPU")
	return
}

// SetFPU sets the FPU/SSE state.
func (c *VCPU) SetFPU(f FPU) error { return c.get(ioSetFPU, unsafe.Pointer(&f), "KVM_SET_FPU") }

// GetXSave returns the XSAVE area.
func (c *VCPU) GetXSave() (x XSave, err error) {
	err = c.get(ioGetXSave, unsafe.Pointer(&x), "KVM_GET_XSAVE")
	return
}

// SetXSave sets the XSAVE area.
func (c *VCPU) SetXSave(x XSave) error { return c.get(ioSetXSave, unsafe.Pointer(&x), "KVM_SET_XSAVE") }

// GetXCRs returns the extended control registers.
func (c *VCPU) GetXCRs() (x XCRs, err error) {
	err = c.get(ioGetXCRs, unsafe.Pointer(&x), "KVM_GET_XCRS")
	return
}

// SetXCRs sets the extended control registers.
func (c *VCPU) SetXCRs(x XCRs) error { return c.get(ioSetXCRs, unsafe.Pointer(&x), "KVM_SET_XCRS") }

// GetLAPIC returns the in-kernel local APIC state.
func (c *VCPU) GetLAPIC() (l LAPICState, err error) {
	err = c.get(ioGetLAPIC, unsafe.Pointer(&l), "KVM_GET_LAPIC")
	return
}

// SetLAPIC sets the in-kernel local APIC state.
func (c *VCPU) SetLAPIC(l LAPICState) error {
	return c.get(ioSetLAPIC, unsafe.Pointer(&l), "KVM_SET_LAPIC")
}

// GetVCPUEvents returns pending events.
func (c *VCPU) GetVCPUEvents() (e VCPUEvents, err error) {
	err = c.get(ioGetVCPUEvents, unsafe.Pointer(&e), "KVM_GET_VCPU_EVENTS")
	return
}

// SetVCPUEvents sets pending events.
func (c *VCPU) SetVCPUEvents(e VCPUEvents) error {
	return c.get(ioSetVCPUEvents, unsafe.Pointer(&e), "KVM_SET_VCPU_EVENTS")
}

// GetDebugRegs returns the debug registers.
func (c *VCPU) GetDebugRegs() (d DebugRegs, err error) {
	err = c.get(ioGetDebugRegs, unsafe.Pointer(&d), "KVM_GET_DEBUGREGS")
	return
}

// SetDebugRegs sets the debug registers.
func (c *VCPU) SetDebugRegs(d DebugRegs) error {
	return c.get(ioSetDebugRegs, unsafe.Pointer(&d), "KVM_SET_DEBUGREGS")
}

// GetMPState returns the multiprocessing state.
func (c *VCPU) GetMPState() (m MPState, err error) {
	err = c.get(ioGetMPState, unsafe.Pointer(&m), "KVM_GET_MP_STATE")
	return
}

// SetMPState sets the multiprocessing state.
func (c *VCPU) SetMPState(m MPState) error {
	return c.get(ioSetMPState, unsafe.Pointer(&m), "KVM_SET_MP_STATE")
}

// TSCKHz returns the vCPU's TSC frequency (KVM_GET_TSC_KHZ).
func (c *VCPU) TSCKHz() (uint32, error) {
	r, err := ioctlVal(c.fd, ioGetTSCKHz, 0)
	if err != nil {
		return 0, fmt.Errorf("KVM_GET_TSC_KHZ: %w", err)
	}
	return uint32(r), nil
}

// KVMClockCtrl tells the guest its clock was paused (after a pause).
func (c *VCPU) KVMClockCtrl() error {
	if _, err := ioctlVal(c.fd, ioKVMClockCtrl, 0); err != nil {
		return fmt.Errorf("KVM_KVMCLOCK_CTRL: %w", err)
	}
	return nil
}

// SetCPUID2 sets the vCPU's CPUID table.
func (c *VCPU) SetCPUID2(ents []CPUIDEntry) error {
	buf, dst := cpuidBuf(len(ents))
	copy(dst, ents)
	return c.get(ioSetCPUID2, unsafe.Pointer(&buf[0]), "KVM_SET_CPUID2")
}

// GetCPUID2 returns the vCPU's CPUID table. Kernels disagree on nent:
// 6.1 leaves it at the buffer size on success, newer ones set it on
// success but not with E2BIG. So the buffer grows until the call
// succeeds, and its entries are pre-filled with a sentinel: KVM copies
// exactly the table, and the first untouched sentinel ends it.
func (c *VCPU) GetCPUID2() ([]CPUIDEntry, error) {
	sentinel := CPUIDEntry{Function: ^uint32(0), Index: ^uint32(0), Flags: ^uint32(0),
		EAX: ^uint32(0), EBX: ^uint32(0), ECX: ^uint32(0), EDX: ^uint32(0)}
	for n := 64; n <= 4096; n *= 2 {
		buf, ents := cpuidBuf(n)
		for i := range ents {
			ents[i] = sentinel
		}
		_, err := ioctl(c.fd, ioGetCPUID2, unsafe.Pointer(&buf[0]))
		if err == unix.E2BIG {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("KVM_GET_CPUID2: %w", err)
		}
		count := int(*(*uint32)(unsafe.Pointer(&buf[0])))
		if count > n {
			count = n
		}
		for i := 0; i < count; i++ {
			if ents[i] == sentinel {
				count = i
				break
			}
		}
		return append([]CPUIDEntry(nil), ents[:count]...), nil
	}
	return nil, fmt.Errorf("KVM_GET_CPUID2: too many entries")
}

// msrsBuf allocates struct kvm_msrs with n entries.
func msrsBuf(n int) ([]uint64, []MSREntry) {
	buf := make([]uint64, 1+2*n)
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(n)
	var ents []MSREntry
	if n > 0 {
		ents = unsafe.Slice((*MSREntry)(unsafe.Pointer(&buf[1])), n)
	}
	return buf, ents
}

// GetMSRs reads the MSRs whose Index is set in ents (Data is filled).
// It returns the number read; KVM stops at the first unsupported MSR.
func (c *VCPU) GetMSRs(ents []MSREntry) (int, error) {
	if len(ents) == 0 {
		return 0, nil
	}
	buf, dst := msrsBuf(len(ents))
	copy(dst, ents)
	n, err := ioctl(c.fd, ioGetMSRs, unsafe.Pointer(&buf[0]))
	if err != nil {
		return 0, fmt.Errorf("KVM_GET_MSRS: %w", err)
	}
	copy(ents, dst)
	return n, nil
}

// SetMSRs writes ents. It returns an error unless all were written.
func (c *VCPU) SetMSRs(ents []MSREntry) error {
	if len(ents) == 0 {
		return nil
	}
	buf, dst := msrsBuf(len(ents))
	copy(dst, ents)
	n, err := ioctl(c.fd, ioSetMSRs, unsafe.Pointer(&buf[0]))
	if err != nil {
		return fmt.Errorf("KVM_SET_MSRS: %w", err)
	}
	if n != len(ents) {
		return fmt.Errorf("KVM_SET_MSRS: set %d of %d (MSR %#x refused)", n, len(ents), ents[n].Index)
	}
	return nil
}
