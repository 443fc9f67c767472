//go:build linux

package kvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// VM is a KVM VM fd.
type VM struct {
	fd  int
	sys *System
}

// FD returns the VM fd.
func (v *VM) FD() int { return v.fd }

// Close closes the VM fd (vCPU fds keep the VM alive until closed).
func (v *VM) Close() error { return unix.Close(v.fd) }

// CheckExtension asks the VM (KVM_CHECK_EXTENSION on the VM fd).
func (v *VM) CheckExtension(cap int) int {
	r, err := ioctlVal(v.fd, ioCheckExtension, uintptr(cap))
	if err != nil {
		return 0
	}
	return r
}

// SetUserMemoryRegion maps host memory at hva into guest-physical gpa.
// size 0 deletes the slot.
func (v *VM) SetUserMemoryRegion(slot uint32, flags uint32, gpa, size uint64, hva uintptr) error {
	r := userspaceMemoryRegion{Slot: slot, Flags: flags, GuestPhysAddr: gpa, MemorySize: size, UserspaceAddr: uint64(hva)}
	if _, err := ioctl(v.fd, ioSetUserMemoryRegion, unsafe.Pointer(&r)); err != nil {
		return fmt.Errorf("KVM_SET_USER_MEMORY_REGION slot %d gpa %#x size %#x: %w", slot, gpa, size, err)
	}
	return nil
}

// SetTSSAddr sets the 3-page TSS region (needed by VT-x).
func (v *VM) SetTSSAddr(addr uint64) error {
	if _, err := ioctlVal(v.fd, ioSetTSSAddr, uintptr(addr)); err != nil {
		return fmt.Errorf("KVM_SET_TSS_ADDR: %w", err)
	}
	return nil
}

// SetIdentityMapAddr sets the identity-map page (needed by VT-x).
func (v *VM) SetIdentityMapAddr(addr uint64) error {
	if _, err := ioctl(v.fd, ioSetIdentityMapAddr, unsafe.Pointer(&addr)); err != nil {
		return fmt.Errorf("KVM_SET_IDENTITY_MAP_ADDR: %w", err)
	}
	return nil
}

// CreateIRQChip creates the in-kernel PIC, IOAPIC and LAPICs.
func (v *VM) CreateIRQChip() error {
	if _, err := ioctlVal(v.fd, ioCreateIRQChip, 0); err != nil {
		return fmt.Errorf("KVM_CREATE_IRQCHIP: %w", err)
	}
	return nil
}

// CreatePIT2 creates the in-kernel i8254 PIT.
func (v *VM) CreatePIT2(flags uint32) error {
	c := PITConfig{Flags: flags}
	if _, err := ioctl(v.fd, ioCreatePIT2, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("KVM_CREATE_PIT2: %w", err)
	}
	return nil
}

// IRQLine sets the level of a GSI on the in-kernel irqchip.
func (v *VM) IRQLine(gsi uint32, level bool) error {
	l := irqLevel{IRQ: gsi}
	if level {
		l.Level = 1
	}
	if _, err := ioctl(v.fd, ioIRQLine, unsafe.Pointer(&l)); err != nil {
		return fmt.Errorf("KVM_IRQ_LINE %d: %w", gsi, err)
	}
	return nil
}

// IRQFD binds eventfd efd to GSI gsi (a write to efd injects an edge).
func (v *VM) IRQFD(efd int, gsi uint32, deassign bool) error {
	a := irqfd{FD: uint32(efd), GSI: gsi}
	if deassign {
		a.Flags = IRQFDFlagDeassign
	}
	if _, err := ioctl(v.fd, ioIRQFD, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("KVM_IRQFD gsi %d: %w", gsi, err)
	}
	return nil
}

// IOEventFD binds eventfd efd to a guest write at addr of length n (PIO
// when pio). With datamatch set only writes of that value signal.
func (v *VM) IOEventFD(efd int, addr uint64, n uint32, pio bool, datamatch *uint64, deassign bool) error {
	a := ioeventfd{Addr: addr, Len: n, FD: int32(efd)}
	if pio {
		a.Flags |= IOEventFDFlagPIO
	}
	if datamatch != nil {
		a.Flags |= IOEventFDFlagDatamatch
		a.Datamatch = *datamatch
	}
	if deassign {
		a.Flags |= IOEventFDFlagDeassign
	}
	if _, err := ioctl(v.fd, ioIOEventFD, unsafe.Pointer(&a)); err != nil {
		return fmt.Errorf("KVM_IOEVENTFD %#x: %w", addr, err)
	}
	return nil
}

// GetClock returns the kvmclock state.
func (v *VM) GetClock() (ClockData, error) {
	var c ClockData
	_, err := ioctl(v.fd, ioGetClock, unsafe.Pointer(&c))
	if err != nil {
		return c, fmt.Errorf("KVM_GET_CLOCK: %w", err)
	}
	return c, nil
}

// SetClock sets the kvmclock state.
func (v *VM) SetClock(c ClockData) error {
	if _, err := ioctl(v.fd, ioSetClock, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("KVM_SET_CLOCK: %w", err)
	}
	return nil
}

// GetIRQChip returns the state of chip (IRQChipPICMaster, ...).
func (v *VM) GetIRQChip(chip uint32) (IRQChip, error) {
	c := IRQChip{ChipID: chip}
	if _, err := ioctl(v.fd, ioGetIRQChip, unsafe.Pointer(&c)); err != nil {
		return c, fmt.Errorf("KVM_GET_IRQCHIP %d: %w", chip, err)
	}
	return c, nil
}

// SetIRQChip restores the state of c.ChipID.
func (v *VM) SetIRQChip(c IRQChip) error {
	if _, err := ioctl(v.fd, ioSetIRQChip, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("KVM_SET_IRQCHIP %d: %w", c.ChipID, err)
	}
	return nil
}

// GetPIT2 returns the PIT state.
func (v *VM) GetPIT2() (PITState2, error) {
	var p PITState2
	if _, err := ioctl(v.fd, ioGetPIT2, unsafe.Pointer(&p)); err != nil {
		return p, fmt.Errorf("KVM_GET_PIT2: %w", err)
	}
	return p, nil
}

// SetPIT2 restores the PIT state.
func (v *VM) SetPIT2(p PITState2) error {
	if _, err := ioctl(v.fd, ioSetPIT2, unsafe.Pointer(&p)); err != nil {
		return fmt.Errorf("KVM_SET_PIT2: %w", err)
	}
	return nil
}

// EnableCap calls KVM_ENABLE_CAP on the VM.
func (v *VM) EnableCap(cap uint32, args ...uint64) error {
	c := enableCap{Cap: cap}
	copy(c.Args[:], args)
	if _, err := ioctl(v.fd, ioEnableCap, unsafe.Pointer(&c)); err != nil {
		return fmt.Errorf("KVM_ENABLE_CAP %d: %w", cap, err)
	}
	return nil
}

// CreateVCPU creates vCPU id and maps its kvm_run structure.
func (v *VM) CreateVCPU(id int) (*VCPU, error) {
	fd, err := ioctlVal(v.fd, ioCreateVCPU, uintptr(id))
	if err != nil {
		return nil, fmt.Errorf("KVM_CREATE_VCPU %d: %w", id, err)
	}
	unix.CloseOnExec(fd)
	m, err := unix.Mmap(fd, 0, v.sys.mmapSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("mmap kvm_run: %w", err)
	}
	return &VCPU{fd: fd, ID: id, runMem: m, run: (*runHeader)(unsafe.Pointer(&m[0]))}, nil
}
