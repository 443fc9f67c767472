//go:build linux

// Package kvm wraps the Linux KVM ioctl API for x86-64: the system fd
// (/dev/kvm), VM fds and vCPU fds, with the mmap'd kvm_run structure. It
// holds no policy: memory layout, CPU set-up and device models live in the
// sibling packages. Every state getter has a setter so snapshots (issue 7)
// can save and restore a whole VM.
package kvm

import (
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

const kvmio = 0xAE

func ioc(dir, nr, size uintptr) uintptr { return dir<<30 | size<<16 | kvmio<<8 | nr }
func io(nr uintptr) uintptr             { return ioc(0, nr, 0) }
func iow(nr, size uintptr) uintptr      { return ioc(1, nr, size) }
func ior(nr, size uintptr) uintptr      { return ioc(2, nr, size) }
func iowr(nr, size uintptr) uintptr     { return ioc(3, nr, size) }

// ioctl numbers (linux/kvm.h).
var (
	ioGetAPIVersion       = io(0x00)
	ioCreateVM            = io(0x01)
	ioGetMSRIndexList     = iowr(0x02, 4)
	ioCheckExtension      = io(0x03)
	ioGetVCPUMmapSize     = io(0x04)
	ioGetSupportedCPUID   = iowr(0x05, 8)
	ioCreateVCPU          = io(0x41)
	ioSetUserMemoryRegion = iow(0x46, unsafe.Sizeof(userspaceMemoryRegion{}))
	ioSetTSSAddr          = io(0x47)
	ioSetIdentityMapAddr  = iow(0x48, 8)
	ioCreateIRQChip       = io(0x60)
	ioIRQLine             = iow(0x61, unsafe.Sizeof(irqLevel{}))
	ioGetIRQChip          = iowr(0x62, unsafe.Sizeof(IRQChip{}))
	ioSetIRQChip          = ior(0x63, unsafe.Sizeof(IRQChip{}))
	ioIRQFD               = iow(0x76, unsafe.Sizeof(irqfd{}))
	ioCreatePIT2          = iow(0x77, unsafe.Sizeof(PITConfig{}))
	ioIOEventFD           = iow(0x79, unsafe.Sizeof(ioeventfd{}))
	ioSetClock            = iow(0x7b, unsafe.Sizeof(ClockData{}))
	ioGetClock            = ior(0x7c, unsafe.Sizeof(ClockData{}))
	ioGetPIT2             = ior(0x9f, unsafe.Sizeof(PITState2{}))
	ioSetPIT2             = iow(0xa0, unsafe.Sizeof(PITState2{}))
	ioEnableCap           = iow(0xa3, unsafe.Sizeof(enableCap{}))

	ioRun           = io(0x80)
	ioGetRegs       = ior(0x81, unsafe.Sizeof(Regs{}))
	ioSetRegs       = iow(0x82, unsafe.Sizeof(Regs{}))
	ioGetSregs      = ior(0x83, unsafe.Sizeof(Sregs{}))
	ioSetSregs      = iow(0x84, unsafe.Sizeof(Sregs{}))
	ioGetMSRs       = iowr(0x88, 8)
	ioSetMSRs       = iow(0x89, 8)
	ioGetFPU        = ior(0x8c, unsafe.Sizeof(FPU{}))
	ioSetFPU        = iow(0x8d, unsafe.Sizeof(FPU{}))
	ioGetLAPIC      = ior(0x8e, unsafe.Sizeof(LAPICState{}))
	ioSetLAPIC      = iow(0x8f, unsafe.Sizeof(LAPICState{}))
	ioSetCPUID2     = iow(0x90, 8)
	ioGetCPUID2     = iowr(0x91, 8)
	ioGetMPState    = ior(0x98, unsafe.Sizeof(MPState{}))
	ioSetMPState    = iow(0x99, unsafe.Sizeof(MPState{}))
	ioGetVCPUEvents = ior(0x9f, unsafe.Sizeof(VCPUEvents{}))
	ioSetVCPUEvents = iow(0xa0, unsafe.Sizeof(VCPUEvents{}))
	ioGetDebugRegs  = ior(0xa1, unsafe.Sizeof(DebugRegs{}))
	ioSetDebugRegs  = iow(0xa2, unsafe.Sizeof(DebugRegs{}))
	ioGetTSCKHz     = io(0xa3)
	ioGetXSave      = ior(0xa4, unsafe.Sizeof(XSave{}))
	ioSetXSave      = iow(0xa5, unsafe.Sizeof(XSave{}))
	ioGetXCRs       = ior(0xa6, unsafe.Sizeof(XCRs{}))
	ioSetXCRs       = iow(0xa7, unsafe.Sizeof(XCRs{}))
	ioKVMClockCtrl  = io(0xad)
)

// Capabilities (KVM_CAP_*) the VMM checks.
const (
	CapIRQChip        = 0
	CapHLT            = 1
	CapUserMemory     = 3
	CapSetTSSAddr     = 4
	CapExtCPUID       = 7
	CapPIT2           = 33
	CapIRQFD          = 32
	CapIOEventFD      = 36
	CapSetIdentityMap = 37
	CapAdjustClock    = 39
	CapVCPUEvents     = 41
	CapXSave          = 55
	CapXCRs           = 56
	CapDebugRegs      = 50
	CapTSCDeadline    = 72
	CapImmediateExit  = 136
	CapNrMemslots     = 10
	CapMaxVCPUs       = 66
	CapX2APICAPI      = 129
	CapSplitIRQChip   = 121
	CapTSCControl     = 60
	CapIRQRouting     = 25
	CapMPState        = 14
	CapSyncMMU        = 16
)

func ioctl(fd int, req uintptr, arg unsafe.Pointer) (int, error) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, uintptr(arg))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return int(r), e
		}
		return int(r), nil
	}
}

func ioctlVal(fd int, req, val uintptr) (int, error) {
	for {
		r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), req, val)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return int(r), e
		}
		return int(r), nil
	}
}

// System is an open /dev/kvm.
type System struct {
	fd       int
	mmapSize int
}

// Open opens /dev/kvm (path may override it) and checks the API version.
func Open(path string) (*System, error) {
	if path == "" {
		path = "/dev/kvm"
	}
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	return FromFD(fd)
}

// FromFD adopts an already open /dev/kvm fd (inherited from a launcher
// that may have dropped the privilege to open it). It closes fd on error.
func FromFD(fd int) (*System, error) {
	s := &System{fd: fd}
	v, err := ioctlVal(fd, ioGetAPIVersion, 0)
	if err != nil || v != 12 {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM_GET_API_VERSION = %d (%v), want 12", v, err)
	}
	sz, err := ioctlVal(fd, ioGetVCPUMmapSize, 0)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("KVM_GET_VCPU_MMAP_SIZE: %w", err)
	}
	s.mmapSize = sz
	return s, nil
}

// FD returns the system fd.
func (s *System) FD() int { return s.fd }

// Close closes /dev/kvm (VMs stay valid).
func (s *System) Close() error { return unix.Close(s.fd) }

// CheckExtension returns KVM_CHECK_EXTENSION for cap (0 = absent).
func (s *System) CheckExtension(cap int) int {
	r, err := ioctlVal(s.fd, ioCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return r
}

// SupportedCPUID returns KVM_GET_SUPPORTED_CPUID.
func (s *System) SupportedCPUID() ([]CPUIDEntry, error) {
	for n := 64; n <= 4096; n *= 2 {
		buf, ents := cpuidBuf(n)
		_, err := ioctl(s.fd, ioGetSupportedCPUID, unsafe.Pointer(&buf[0]))
		if err == unix.E2BIG {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: %w", err)
		}
		nent := *(*uint32)(unsafe.Pointer(&buf[0]))
		out := make([]CPUIDEntry, nent)
		copy(out, ents[:nent])
		return out, nil
	}
	return nil, fmt.Errorf("KVM_GET_SUPPORTED_CPUID: too many entries")
}

// cpuidBuf allocates a struct kvm_cpuid2 with room for n entries.
func cpuidBuf(n int) ([]uint64, []CPUIDEntry) {
	esz := int(unsafe.Sizeof(CPUIDEntry{}))
	words := (8 + n*esz + 7) / 8
	buf := make([]uint64, words)
	*(*uint32)(unsafe.Pointer(&buf[0])) = uint32(n)
	if n == 0 {
		return buf, nil
	}
	ents := unsafe.Slice((*CPUIDEntry)(unsafe.Pointer(&buf[1])), n)
	return buf, ents
}

// MSRIndexList returns KVM_GET_MSR_INDEX_LIST (the MSRs KVM saves and
// restores for a vCPU).
func (s *System) MSRIndexList() ([]uint32, error) {
	for n := 256; n <= 8192; n *= 2 {
		buf := make([]uint32, n+1)
		buf[0] = uint32(n)
		_, err := ioctl(s.fd, ioGetMSRIndexList, unsafe.Pointer(&buf[0]))
		if err == unix.E2BIG {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: %w", err)
		}
		return append([]uint32(nil), buf[1:1+buf[0]]...), nil
	}
	return nil, fmt.Errorf("KVM_GET_MSR_INDEX_LIST: too many entries")
}

// CreateVM creates a VM.
func (s *System) CreateVM() (*VM, error) {
	fd, err := ioctlVal(s.fd, ioCreateVM, 0)
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VM: %w", err)
	}
	unix.CloseOnExec(fd)
	return &VM{fd: fd, sys: s}, nil
}

// Available reports whether /dev/kvm can be opened here.
func Available() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	return true
}
