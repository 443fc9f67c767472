//go:build linux

package kvm

// Go mirrors of the x86-64 KVM UAPI structures (linux/kvm.h,
// asm/kvm.h). Layouts are fixed by the kernel ABI; sizes are checked in
// the tests. Structures the VMM only saves and restores (snapshots) are
// kept as opaque byte arrays with small accessors where the VMM needs a
// field.

// Regs is struct kvm_regs.
type Regs struct {
	RAX, RBX, RCX, RDX, RSI, RDI, RSP, RBP uint64
	R8, R9, R10, R11, R12, R13, R14, R15   uint64
	RIP, RFLAGS                            uint64
}

// Segment is struct kvm_segment.
type Segment struct {
	Base     uint64
	Limit    uint32
	Selector uint16
	Type     uint8
	Present  uint8
	DPL      uint8
	DB       uint8
	S        uint8
	L        uint8
	G        uint8
	AVL      uint8
	Unusable uint8
	_        uint8
}

// DTable is struct kvm_dtable (GDTR/IDTR).
type DTable struct {
	Base  uint64
	Limit uint16
	_     [3]uint16
}

// Sregs is struct kvm_sregs.
type Sregs struct {
	CS, DS, ES, FS, GS, SS Segment
	TR, LDT                Segment
	GDT, IDT               DTable
	CR0, CR2, CR3, CR4     uint64
	CR8                    uint64
	EFER                   uint64
	APICBase               uint64
	InterruptBitmap        [4]uint64
}

// FPU is struct kvm_fpu.
type FPU struct {
	FPR        [8][16]uint8
	FCW        uint16
	FSW        uint16
	FTWX       uint8
	_          uint8
	LastOpcode uint16
	LastIP     uint64
	LastDP     uint64
	XMM        [16][16]uint8
	MXCSR      uint32
	_          uint32
}

// LAPICState is struct kvm_lapic_state: the 1 KiB APIC register page.
type LAPICState struct {
	Regs [1024]byte
}

// Get32 reads the 32-bit APIC register at byte offset off.
func (l *LAPICState) Get32(off int) uint32 {
	b := l.Regs[off : off+4]
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}

// Set32 writes the 32-bit APIC register at byte offset off.
func (l *LAPICState) Set32(off int, v uint32) {
	b := l.Regs[off : off+4]
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}

// APIC register offsets used by the VMM.
const (
	APICRegID    = 0x20
	APICRegSVR   = 0xF0
	APICRegLINT0 = 0x350
	APICRegLINT1 = 0x360
)

// MSREntry is struct kvm_msr_entry.
type MSREntry struct {
	Index uint32
	_     uint32
	Data  uint64
}

// CPUIDEntry is struct kvm_cpuid_entry2.
type CPUIDEntry struct {
	Function uint32
	Index    uint32
	Flags    uint32
	EAX      uint32
	EBX      uint32
	ECX      uint32
	EDX      uint32
	_        [3]uint32
}

// CPUID entry flags.
const (
	CPUIDFlagSignificantIndex = 1 << 0
)

// VCPUEvents is struct kvm_vcpu_events (pending exceptions, interrupts,
// NMI, SMI state), kept opaque.
type VCPUEvents struct {
	Raw [64]byte
}

// DebugRegs is struct kvm_debugregs, kept opaque.
type DebugRegs struct {
	Raw [128]byte
}

// XSave is struct kvm_xsave (the legacy 4 KiB area).
type XSave struct {
	Region [1024]uint32
}

// XCR is one struct kvm_xcr.
type XCR struct {
	XCR   uint32
	_     uint32
	Value uint64
}

// XCRs is struct kvm_xcrs.
type XCRs struct {
	NrXCRs uint32
	Flags  uint32
	XCRs   [16]XCR
	_      [16]uint64
}

// MPState is struct kvm_mp_state.
type MPState struct {
	State uint32
}

// MP states.
const (
	MPStateRunnable      = 0
	MPStateUninitialized = 1
	MPStateInitReceived  = 2
	MPStateHalted        = 3
	MPStateSIPIReceived  = 4
)

// ClockData is struct kvm_clock_data.
type ClockData struct {
	Clock    uint64
	Flags    uint32
	_        uint32
	Realtime uint64
	HostTSC  uint64
	_        [4]uint32
}

// IRQChip is struct kvm_irqchip; Chip selects PIC master (0), PIC slave
// (1) or IOAPIC (2). The chip state is kept opaque.
type IRQChip struct {
	ChipID uint32
	_      uint32
	Chip   [512]byte
}

// IRQ chip ids.
const (
	IRQChipPICMaster = 0
	IRQChipPICSlave  = 1
	IRQChipIOAPIC    = 2
)

// PITState2 is struct kvm_pit_state2, kept opaque.
type PITState2 struct {
	Raw [112]byte
}

// PITConfig is struct kvm_pit_config.
type PITConfig struct {
	Flags uint32
	_     [15]uint32
}

// PITSpeakerDummy makes the PIT not emulate the speaker port.
const PITSpeakerDummy = 1

type userspaceMemoryRegion struct {
	Slot          uint32
	Flags         uint32
	GuestPhysAddr uint64
	MemorySize    uint64
	UserspaceAddr uint64
}

// Memory region flags.
const (
	MemLogDirtyPages = 1 << 0
	MemReadonly      = 1 << 1
)

type irqLevel struct {
	IRQ   uint32
	Level uint32
}

type irqfd struct {
	FD         uint32
	GSI        uint32
	Flags      uint32
	ResampleFD uint32
	_          [16]uint8
}

// IRQFD flags.
const (
	IRQFDFlagDeassign = 1 << 0
)

type ioeventfd struct {
	Datamatch uint64
	Addr      uint64
	Len       uint32
	FD        int32
	Flags     uint32
	_         [36]uint8
}

// IOEVENTFD flags.
const (
	IOEventFDFlagDatamatch = 1 << 0
	IOEventFDFlagPIO       = 1 << 1
	IOEventFDFlagDeassign  = 1 << 2
)

type enableCap struct {
	Cap   uint32
	Flags uint32
	Args  [4]uint64
	_     [64]uint8
}
