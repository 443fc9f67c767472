//go:build linux

package boot

import (
	"encoding/binary"
	"fmt"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// Control register and EFER bits.
const (
	cr0PE = 1 << 0
	cr0MP = 1 << 1
	cr0ET = 1 << 4
	cr0NE = 1 << 5
	cr0WP = 1 << 16
	cr0AM = 1 << 18
	cr0PG = 1 << 31

	cr4PAE        = 1 << 5
	cr4OSFXSR     = 1 << 9
	cr4OSXMMEXCPT = 1 << 10

	eferSCE = 1 << 0
	eferLME = 1 << 8
	eferLMA = 1 << 10
)

func gdtEntry(flags uint16, base, limit uint32) uint64 {
	return uint64(base&0xff000000)<<32 | uint64(base&0x00ffffff)<<16 |
		uint64(flags&0xf0ff)<<40 | uint64(limit&0x000f0000)<<32 | uint64(limit&0x0000ffff)
}

func segFromEntry(e uint64, sel uint16) kvm.Segment {
	s := kvm.Segment{
		Base:     (e>>16)&0xffffff | (e>>32)&0xff000000,
		Limit:    uint32((e>>32)&0xf0000 | e&0xffff),
		Selector: sel,
		Type:     uint8(e>>40) & 0xf,
		S:        uint8(e>>44) & 1,
		DPL:      uint8(e>>45) & 3,
		Present:  uint8(e>>47) & 1,
		AVL:      uint8(e>>52) & 1,
		L:        uint8(e>>53) & 1,
		DB:       uint8(e>>54) & 1,
		G:        uint8(e>>55) & 1,
	}
	if s.G == 1 {
		s.Limit = s.Limit<<12 | 0xfff
	}
	return s
}

// gdt returns the boot GDT: null, null, code64, data, TSS (2 slots),
// user data, user code64.
func gdt() [gdtEntries]uint64 {
	return [gdtEntries]uint64{
		0,
		0,
		gdtEntry(0xa09b, 0, 0xfffff), // 0x10 code: L, P, DPL0, exec/read, accessed
		gdtEntry(0xc093, 0, 0xfffff), // 0x18 data: DB, P, DPL0, read/write, accessed
		gdtEntry(0x008b, 0, 0x67),    // 0x20 TSS (busy)
		0,                            // 0x28 upper half of the TSS descriptor
		gdtEntry(0xc0f3, 0, 0xfffff), // 0x30 user data: DPL3
		gdtEntry(0xa0fb, 0, 0xfffff), // 0x38 user code64: DPL3
	}
}

// WriteGDT writes the boot GDT and an empty IDT into guest memory.
func WriteGDT(mem devices.GuestMemory) error {
	b, err := mem.Slice(GDTAddr, gdtEntries*8)
	if err != nil {
		return fmt.Errorf("gdt: %w", err)
	}
	for i, e := range gdt() {
		binary.LittleEndian.PutUint64(b[i*8:], e)
	}
	idt, err := mem.Slice(IDTAddr, 8)
	if err != nil {
		return fmt.Errorf("idt: %w", err)
	}
	clear(idt)
	return nil
}

// Page table entry bits.
const (
	ptePresent = 1 << 0
	pteWrite   = 1 << 1
	pteUser    = 1 << 2
	ptePS      = 1 << 7
)

// WritePageTables identity-maps the first 4 GiB with 2 MiB pages. With
// user set the pages are user-accessible (synthetic CPL 3 guests).
func WritePageTables(mem devices.GuestMemory, user bool) error {
	flags := uint64(ptePresent | pteWrite)
	if user {
		flags |= pteUser
	}
	pml4, err := mem.Slice(PML4Addr, 0x1000)
	if err != nil {
		return fmt.Errorf("pml4: %w", err)
	}
	pdpt, err := mem.Slice(PDPTAddr, 0x1000)
	if err != nil {
		return fmt.Errorf("pdpt: %w", err)
	}
	pd, err := mem.Slice(PDAddr, 4*0x1000)
	if err != nil {
		return fmt.Errorf("pd: %w", err)
	}
	clear(pml4)
	clear(pdpt)
	binary.LittleEndian.PutUint64(pml4, PDPTAddr|flags)
	for i := uint64(0); i < 4; i++ {
		binary.LittleEndian.PutUint64(pdpt[i*8:], (PDAddr+i*0x1000)|flags)
	}
	for i := uint64(0); i < 4*512; i++ {
		binary.LittleEndian.PutUint64(pd[i*8:], i<<21|flags|ptePS)
	}
	return nil
}

// LongModeSregs returns special registers for 64-bit mode with the boot
// GDT and identity page tables; user selects CPL 3 segments.
func LongModeSregs(s kvm.Sregs, user bool) kvm.Sregs {
	g := gdt()
	code := segFromEntry(g[SelCode>>3], SelCode)
	data := segFromEntry(g[SelData>>3], SelData)
	if user {
		code = segFromEntry(g[SelUCode>>3], SelUCode)
		data = segFromEntry(g[SelUData>>3], SelUData)
	}
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = segFromEntry(g[SelTSS>>3], SelTSS)
	s.GDT = kvm.DTable{Base: GDTAddr, Limit: gdtEntries*8 - 1}
	s.IDT = kvm.DTable{Base: IDTAddr, Limit: 0}
	s.CR0 = cr0PE | cr0MP | cr0ET | cr0NE | cr0WP | cr0AM | cr0PG
	s.CR3 = PML4Addr
	s.CR4 = cr4PAE | cr4OSFXSR | cr4OSXMMEXCPT
	s.EFER = eferLME | eferLMA | eferSCE
	return s
}

// ProtectedModeSregs returns special registers for 32-bit flat protected
// mode without paging (the PVH entry state).
func ProtectedModeSregs(s kvm.Sregs) kvm.Sregs {
	g := gdt()
	code := segFromEntry(gdtEntry(0xc09b, 0, 0xfffff), SelCode)
	data := segFromEntry(g[SelData>>3], SelData)
	s.CS = code
	s.DS, s.ES, s.FS, s.GS, s.SS = data, data, data, data, data
	s.TR = segFromEntry(g[SelTSS>>3], SelTSS)
	s.GDT = kvm.DTable{Base: GDTAddr, Limit: gdtEntries*8 - 1}
	s.IDT = kvm.DTable{Base: IDTAddr, Limit: 0}
	s.CR0 = cr0PE | cr0ET
	s.CR4 = 0
	s.EFER = 0
	return s
}
