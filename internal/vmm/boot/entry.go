//go:build linux

package boot

import (
	"fmt"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// Mode is the CPU mode a guest is entered in.
type Mode int

// Entry modes.
const (
	ModeLong64      Mode = iota // 64-bit, CPL 0 (bzImage 64-bit boot protocol)
	ModeUser64                  // 64-bit, CPL 3, IOPL 3 (synthetic raw guests)
	ModeProtected32             // 32-bit flat, paging off (PVH)
)

// Entry is the boot vCPU's initial state.
type Entry struct {
	Mode Mode
	Regs kvm.Regs
}

// Apply loads the entry state into the boot vCPU.
func (e Entry) Apply(c *kvm.VCPU) error {
	s, err := c.GetSregs()
	if err != nil {
		return err
	}
	switch e.Mode {
	case ModeLong64:
		s = LongModeSregs(s, false)
	case ModeUser64:
		s = LongModeSregs(s, true)
	case ModeProtected32:
		s = ProtectedModeSregs(s)
	default:
		return fmt.Errorf("unknown entry mode %d", e.Mode)
	}
	if err := c.SetSregs(s); err != nil {
		return err
	}
	return c.SetRegs(e.Regs)
}

// rflags bits.
const (
	rflagsReserved = 1 << 1
	rflagsIOPL3    = 3 << 12
)

// LoadRaw loads a flat 64-bit code image at KernelAddr and returns an
// entry that runs it in 64-bit mode at CPL 0 with IOPL 3, identity paging
// over the first 4 GiB with user access, the boot GDT (which has CPL 3
// segments, so the image may iretq to user mode) and a stack at
// RawStackTop. This is the synthetic guest used by tests and benchmarks
// (package synth): on KVM-PVM hosts guest user mode runs natively and
// kernel mode is emulated.
func LoadRaw(mem devices.GuestMemory, image []byte) (Entry, error) {
	if len(image) == 0 {
		return Entry{}, fmt.Errorf("raw image is empty")
	}
	if uint64(len(image)) > mem.Size()-KernelAddr || mem.Size() < KernelAddr {
		return Entry{}, fmt.Errorf("raw image (%d bytes) does not fit in guest RAM above %#x", len(image), KernelAddr)
	}
	if err := WriteGDT(mem); err != nil {
		return Entry{}, err
	}
	if err := WritePageTables(mem, true); err != nil {
		return Entry{}, err
	}
	dst, err := mem.Slice(KernelAddr, uint64(len(image)))
	if err != nil {
		return Entry{}, err
	}
	copy(dst, image)
	return Entry{Mode: ModeLong64, Regs: kvm.Regs{
		RIP: KernelAddr, RSP: RawStackTop, RFLAGS: rflagsReserved | rflagsIOPL3,
	}}, nil
}
