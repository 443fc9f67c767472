//go:build linux

package boot

import (
	"bytes"
	"debug/elf"
	"encoding/binary"
	"fmt"
	"strings"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
)

// Format is a kernel image format.
type Format string

// Kernel formats.
const (
	FormatAuto    Format = "auto"
	FormatBzImage Format = "bzimage" // 64-bit Linux boot protocol
	FormatELF     Format = "elf"     // vmlinux with a PVH entry note
	FormatRaw     Format = "raw"     // synthetic flat code (LoadRaw)
)

// Params describes what to boot.
type Params struct {
	Kernel  []byte
	Format  Format
	Initrd  []byte
	Cmdline string
	MemSize uint64
	VCPUs   int
}

// Detect guesses a kernel image's format: bzImage by its "HdrS" header,
// ELF by its magic. Anything else is an error (raw images must be asked
// for explicitly).
func Detect(img []byte) (Format, error) {
	if len(img) > 0x206 && string(img[0x202:0x206]) == "HdrS" {
		return FormatBzImage, nil
	}
	if len(img) > 4 && string(img[:4]) == "\x7fELF" {
		return FormatELF, nil
	}
	return "", fmt.Errorf("kernel image is neither a bzImage nor an ELF vmlinux")
}

// Load writes the kernel, initrd, command line and boot tables into mem
// and returns the boot vCPU's entry state.
func Load(mem devices.GuestMemory, p Params) (Entry, error) {
	f := p.Format
	if f == "" || f == FormatAuto {
		var err error
		if f, err = Detect(p.Kernel); err != nil {
			return Entry{}, err
		}
	}
	if f == FormatRaw {
		if len(p.Initrd) > 0 {
			return Entry{}, fmt.Errorf("raw images take no initrd")
		}
		e, err := LoadRaw(mem, p.Kernel)
		if err != nil {
			return e, err
		}
		return e, WriteMPTable(mem, p.VCPUs)
	}
	if len(p.Cmdline)+1 > CmdlineMax {
		return Entry{}, fmt.Errorf("command line is %d bytes, limit %d", len(p.Cmdline), CmdlineMax-1)
	}
	if strings.IndexByte(p.Cmdline, 0) >= 0 {
		return Entry{}, fmt.Errorf("command line contains a NUL byte")
	}
	cl, err := mem.Slice(CmdlineAddr, uint64(len(p.Cmdline)+1))
	if err != nil {
		return Entry{}, err
	}
	copy(cl, p.Cmdline)
	cl[len(p.Cmdline)] = 0
	if err := WriteGDT(mem); err != nil {
		return Entry{}, err
	}
	if err := WriteMPTable(mem, p.VCPUs); err != nil {
		return Entry{}, err
	}
	switch f {
	case FormatBzImage:
		return loadBzImage(mem, p)
	case FormatELF:
		return loadPVH(mem, p)
	}
	return Entry{}, fmt.Errorf("unknown kernel format %q", f)
}

// placeInitrd puts the initrd at the top of low RAM, page aligned, below
// max, and returns its address.
func placeInitrd(mem devices.GuestMemory, initrd []byte, kernelEnd, max uint64) (uint64, error) {
	top := mem.Size()
	if top > MMIOGapStart {
		top = MMIOGapStart
	}
	if max != 0 && top > max+1 {
		top = max + 1
	}
	n := uint64(len(initrd))
	if n > top || (top-n)&^0xfff < kernelEnd {
		return 0, fmt.Errorf("initrd (%d bytes) does not fit in guest RAM", n)
	}
	addr := (top - n) &^ 0xfff
	dst, err := mem.Slice(addr, n)
	if err != nil {
		return 0, err
	}
	copy(dst, initrd)
	return addr, nil
}

// boot_params offsets (Documentation/arch/x86/zero-page.rst, boot.rst).
const (
	bpE820Entries  = 0x1e8
	bpSetupSects   = 0x1f1
	bpBootFlag     = 0x1fe
	bpHeader       = 0x202
	bpVersion      = 0x206
	bpTypeOfLoader = 0x210
	bpLoadFlags    = 0x211
	bpRamdiskImage = 0x218
	bpRamdiskSize  = 0x21c
	bpHeapEndPtr   = 0x224
	bpCmdLinePtr   = 0x228
	bpInitrdMax    = 0x22c
	bpRelocatable  = 0x234
	bpXLoadFlags   = 0x236
	bpCmdlineSize  = 0x238
	bpPrefAddress  = 0x258
	bpInitSize     = 0x260
	bpE820Table    = 0x2d0
	bpE820Max      = 128

	loadedHigh   = 0x01
	canUseHeap   = 0x80
	xlfKernel64  = 0x01
	minBootProto = 0x020c
)

func loadBzImage(mem devices.GuestMemory, p Params) (Entry, error) {
	k := p.Kernel
	if len(k) < 0x264 || binary.LittleEndian.Uint16(k[bpBootFlag:]) != 0xAA55 {
		return Entry{}, fmt.Errorf("bzImage: bad boot sector")
	}
	ver := binary.LittleEndian.Uint16(k[bpVersion:])
	if ver < minBootProto {
		return Entry{}, fmt.Errorf("bzImage: boot protocol %#x is too old (need %#x)", ver, minBootProto)
	}
	if k[bpXLoadFlags]&xlfKernel64 == 0 {
		return Entry{}, fmt.Errorf("bzImage: no 64-bit entry point")
	}
	if k[bpLoadFlags]&loadedHigh == 0 {
		return Entry{}, fmt.Errorf("bzImage: not a bzImage (zImage loads low)")
	}
	setup := int(k[bpSetupSects])
	if setup == 0 {
		setup = 4
	}
	off := (setup + 1) * 512
	if off >= len(k) {
		return Entry{}, fmt.Errorf("bzImage: truncated (setup %d sectors, file %d bytes)", setup, len(k))
	}
	pm := k[off:]
	load := uint64(KernelAddr)
	if k[bpRelocatable] == 0 {
		load = binary.LittleEndian.Uint64(k[bpPrefAddress:])
	}
	initSize := uint64(binary.LittleEndian.Uint32(k[bpInitSize:]))
	if initSize < uint64(len(pm)) {
		initSize = uint64(len(pm))
	}
	if load+initSize > mem.Size() || load+initSize > MMIOGapStart {
		return Entry{}, fmt.Errorf("bzImage: kernel needs %d bytes at %#x, guest RAM is %d", initSize, load, mem.Size())
	}
	dst, err := mem.Slice(load, uint64(len(pm)))
	if err != nil {
		return Entry{}, err
	}
	copy(dst, pm)

	zp, err := mem.Slice(ZeroPageAddr, 4096)
	if err != nil {
		return Entry{}, err
	}
	clear(zp)
	hdrEnd := 0x202 + int(k[0x201])
	if hdrEnd > len(k) || hdrEnd > 4096 {
		return Entry{}, fmt.Errorf("bzImage: bad setup header length")
	}
	copy(zp[bpSetupSects:hdrEnd], k[bpSetupSects:hdrEnd])
	zp[bpTypeOfLoader] = 0xff
	zp[bpLoadFlags] |= canUseHeap
	binary.LittleEndian.PutUint16(zp[bpHeapEndPtr:], 0xfe00)
	binary.LittleEndian.PutUint32(zp[bpCmdLinePtr:], CmdlineAddr)
	if max := binary.LittleEndian.Uint32(k[bpCmdlineSize:]); ver >= 0x0206 && uint32(len(p.Cmdline)) > max {
		return Entry{}, fmt.Errorf("command line is %d bytes, the kernel takes %d", len(p.Cmdline), max)
	}
	if len(p.Initrd) > 0 {
		addr, err := placeInitrd(mem, p.Initrd, load+initSize, uint64(binary.LittleEndian.Uint32(k[bpInitrdMax:])))
		if err != nil {
			return Entry{}, err
		}
		binary.LittleEndian.PutUint32(zp[bpRamdiskImage:], uint32(addr))
		binary.LittleEndian.PutUint32(zp[bpRamdiskSize:], uint32(len(p.Initrd)))
	}
	e820 := E820(mem.Size())
	if len(e820) > bpE820Max {
		return Entry{}, fmt.Errorf("e820: too many entries")
	}
	zp[bpE820Entries] = byte(len(e820))
	for i, r := range e820 {
		o := bpE820Table + 20*i
		binary.LittleEndian.PutUint64(zp[o:], r.Addr)
		binary.LittleEndian.PutUint64(zp[o+8:], r.Size)
		binary.LittleEndian.PutUint32(zp[o+16:], r.Type)
	}
	if err := WritePageTables(mem, false); err != nil {
		return Entry{}, err
	}
	return Entry{Mode: ModeLong64, Regs: kvm.Regs{
		RIP: load + 0x200, RSI: ZeroPageAddr, RSP: BootStackTop, RBP: BootStackTop, RFLAGS: rflagsReserved,
	}}, nil
}

// PVH (xen/include/public/arch-x86/hvm/start_info.h).
const (
	xenElfNotePhys32Entry = 18
	pvhMagic              = 0x336ec578
	pvhModlistAddr        = PVHInfoAddr + 0x40
)

func loadPVH(mem devices.GuestMemory, p Params) (Entry, error) {
	f, err := elf.NewFile(bytes.NewReader(p.Kernel))
	if err != nil {
		return Entry{}, fmt.Errorf("vmlinux: %w", err)
	}
	if f.Class != elf.ELFCLASS64 || f.Machine != elf.EM_X86_64 {
		return Entry{}, fmt.Errorf("vmlinux: not an x86-64 ELF")
	}
	var entry uint64
	var end uint64
	for _, ph := range f.Progs {
		switch ph.Type {
		case elf.PT_LOAD:
			if ph.Filesz > ph.Memsz || ph.Filesz > uint64(len(p.Kernel)) || ph.Paddr < HighMemStart || ph.Paddr+ph.Memsz > mem.Size() || ph.Paddr+ph.Memsz > MMIOGapStart || ph.Paddr+ph.Memsz < ph.Paddr {
				return Entry{}, fmt.Errorf("vmlinux: segment [%#x, +%#x) outside guest RAM", ph.Paddr, ph.Memsz)
			}
			dst, err := mem.Slice(ph.Paddr, ph.Memsz)
			if err != nil {
				return Entry{}, err
			}
			n, err := ph.ReadAt(dst[:ph.Filesz], 0)
			if err != nil && uint64(n) != ph.Filesz {
				return Entry{}, fmt.Errorf("vmlinux: read segment: %w", err)
			}
			clear(dst[ph.Filesz:])
			end = max(end, ph.Paddr+ph.Memsz)
		case elf.PT_NOTE:
			if ph.Filesz > uint64(len(p.Kernel)) {
				return Entry{}, fmt.Errorf("vmlinux: note segment larger than the file")
			}
			data := make([]byte, ph.Filesz)
			if _, err := ph.ReadAt(data, 0); err != nil {
				return Entry{}, fmt.Errorf("vmlinux: read note: %w", err)
			}
			if e, ok := findPVHEntry(data); ok {
				entry = e
			}
		}
	}
	if entry == 0 {
		return Entry{}, fmt.Errorf("vmlinux: no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build with CONFIG_PVH")
	}
	info, err := mem.Slice(PVHInfoAddr, 0x40)
	if err != nil {
		return Entry{}, err
	}
	clear(info)
	binary.LittleEndian.PutUint32(info[0:], pvhMagic)
	binary.LittleEndian.PutUint32(info[4:], 1) // version
	// hvm_start_info: magic, version, flags, nr_modules, modlist_paddr,
	// cmdline_paddr, rsdp_paddr, memmap_paddr, memmap_entries.
	binary.LittleEndian.PutUint64(info[24:], CmdlineAddr)
	if len(p.Initrd) > 0 {
		addr, err := placeInitrd(mem, p.Initrd, end, 0xffffffff)
		if err != nil {
			return Entry{}, err
		}
		mod, err := mem.Slice(pvhModlistAddr, 32)
		if err != nil {
			return Entry{}, err
		}
		clear(mod)
		binary.LittleEndian.PutUint64(mod[0:], addr)
		binary.LittleEndian.PutUint64(mod[8:], uint64(len(p.Initrd)))
		binary.LittleEndian.PutUint32(info[12:], 1)
		binary.LittleEndian.PutUint64(info[16:], pvhModlistAddr)
	}
	e820 := E820(mem.Size())
	mm, err := mem.Slice(PVHMemmapAddr, uint64(24*len(e820)))
	if err != nil {
		return Entry{}, err
	}
	for i, r := range e820 {
		binary.LittleEndian.PutUint64(mm[24*i:], r.Addr)
		binary.LittleEndian.PutUint64(mm[24*i+8:], r.Size)
		binary.LittleEndian.PutUint32(mm[24*i+16:], r.Type)
		binary.LittleEndian.PutUint32(mm[24*i+20:], 0)
	}
	binary.LittleEndian.PutUint64(info[40:], PVHMemmapAddr)
	binary.LittleEndian.PutUint32(info[48:], uint32(len(e820)))
	return Entry{Mode: ModeProtected32, Regs: kvm.Regs{RIP: entry, RBX: PVHInfoAddr, RFLAGS: rflagsReserved}}, nil
}

// findPVHEntry scans ELF note data for the Xen PHYS32_ENTRY note.
func findPVHEntry(b []byte) (uint64, bool) {
	align := func(n uint32) uint32 { return (n + 3) &^ 3 }
	for len(b) >= 12 {
		nsz := binary.LittleEndian.Uint32(b[0:])
		dsz := binary.LittleEndian.Uint32(b[4:])
		typ := binary.LittleEndian.Uint32(b[8:])
		b = b[12:]
		if uint64(align(nsz))+uint64(align(dsz)) > uint64(len(b)) {
			return 0, false
		}
		name := string(bytes.TrimRight(b[:nsz], "\x00"))
		desc := b[align(nsz) : align(nsz)+dsz]
		b = b[align(nsz)+align(dsz):]
		if name == "Xen" && typ == xenElfNotePhys32Entry {
			switch len(desc) {
			case 4:
				return uint64(binary.LittleEndian.Uint32(desc)), true
			case 8:
				return binary.LittleEndian.Uint64(desc), true
			}
		}
	}
	return 0, false
}

// VirtioMMIOArg returns the command-line fragment announcing a
// virtio-mmio device (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES).
func VirtioMMIOArg(base, size uint64, irq uint32) string {
	return fmt.Sprintf("virtio_mmio.device=%dK@%#x:%d", size>>10, base, irq)
}
