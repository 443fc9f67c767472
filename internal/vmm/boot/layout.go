//go:build linux

// Package boot lays out guest memory and the initial vCPU state for the
// ways Cube starts a guest: the 64-bit Linux boot protocol (bzImage), the
// PVH entry of an uncompressed vmlinux ELF, and flat "raw" images (the
// synthetic guests used by tests and `cube bench vmm`, run in 64-bit user
// mode). It writes the zero page, e820 map, command line, initrd, identity
// page tables, GDT and MP table into guest memory; it never touches KVM
// beyond filling register structures.
package boot

// Guest-physical memory layout (all below 1 MiB except the kernel,
// initrd and the MMIO window).
const (
	GDTAddr       = 0x0500 // boot GDT (8 entries)
	IDTAddr       = 0x0580 // empty IDT
	PVHInfoAddr   = 0x6000 // hvm_start_info
	PVHMemmapAddr = 0x6100 // hvm_memmap_table_entry[]
	ZeroPageAddr  = 0x7000 // struct boot_params
	PML4Addr      = 0x9000 // identity page tables: PML4, PDPT, 4 PDs
	PDPTAddr      = 0xA000
	PDAddr        = 0xB000 // 4 pages: identity map of the first 4 GiB in 2 MiB pages
	BootStackTop  = 0x8FF0 // initial RSP for boot protocol entries
	CmdlineAddr   = 0x20000
	CmdlineMax    = 0x10000 // including the NUL
	EBDAStart     = 0x9FC00 // MP table lives here
	HighMemStart  = 0x100000
	KernelAddr    = 0x100000 // bzImage protected-mode part / raw image load address
	RawStackTop   = 0x80000  // synthetic guest user stack
	MMIOGapStart  = 0xD0000000
	MMIOGapEnd    = 0x100000000
	// VirtioMMIOBase is where virtio-mmio device windows start; each
	// device gets VirtioMMIOSize bytes.
	VirtioMMIOBase = 0xD0000000
	VirtioMMIOSize = 0x1000
	// IOAPIC and LAPIC addresses (fixed by the in-kernel irqchip).
	IOAPICAddr = 0xFEC00000
	LAPICAddr  = 0xFEE00000
)

// GDT selectors.
const (
	SelCode    = 0x10 // __BOOT_CS: 64-bit code, DPL 0
	SelData    = 0x18 // __BOOT_DS: data, DPL 0
	SelTSS     = 0x20 // 64-bit TSS (16-byte descriptor)
	SelUData   = 0x33 // data, DPL 3 (RPL 3)
	SelUCode   = 0x3B // 64-bit code, DPL 3 (RPL 3)
	gdtEntries = 8
)

// MemRegion is one e820 entry.
type MemRegion struct {
	Addr, Size uint64
	Type       uint32
}

// e820 types.
const (
	E820RAM      = 1
	E820Reserved = 2
)

// E820 returns the guest memory map for memSize bytes of RAM: low RAM up
// to the EBDA, RAM from 1 MiB to the MMIO gap, and the rest above 4 GiB.
func E820(memSize uint64) []MemRegion {
	r := []MemRegion{{0, EBDAStart, E820RAM}, {EBDAStart, 0x100000 - EBDAStart, E820Reserved}}
	if memSize <= HighMemStart {
		return r
	}
	low := memSize
	if low > MMIOGapStart {
		low = MMIOGapStart
	}
	r = append(r, MemRegion{HighMemStart, low - HighMemStart, E820RAM})
	if memSize > MMIOGapStart {
		r = append(r, MemRegion{MMIOGapEnd, memSize - MMIOGapStart, E820RAM})
	}
	return r
}

// RAMRanges returns the guest-physical RAM ranges (for memory slots):
// [0, min(mem, gap)) and [4 GiB, 4 GiB + rest).
func RAMRanges(memSize uint64) [][2]uint64 {
	if memSize <= MMIOGapStart {
		return [][2]uint64{{0, memSize}}
	}
	return [][2]uint64{{0, MMIOGapStart}, {MMIOGapEnd, memSize - MMIOGapStart}}
}
