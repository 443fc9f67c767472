//go:build linux

package boot

import (
	"encoding/binary"
	"fmt"
	"strings"
	"testing"
)

// flatMem is a GuestMemory over a byte slice (RAM from 0).
type flatMem []byte

func (m flatMem) Size() uint64 { return uint64(len(m)) }
func (m flatMem) Slice(gpa, n uint64) ([]byte, error) {
	if gpa > uint64(len(m)) || n > uint64(len(m))-gpa {
		return nil, fmt.Errorf("out of range")
	}
	return m[gpa : gpa+n], nil
}

func fakeBzImage(payload []byte) []byte {
	k := make([]byte, 5*512+len(payload))
	k[bpSetupSects] = 4
	binary.LittleEndian.PutUint16(k[bpBootFlag:], 0xAA55)
	k[0x201] = 0x6a // setup header ends at 0x26c
	copy(k[bpHeader:], "HdrS")
	binary.LittleEndian.PutUint16(k[bpVersion:], 0x020f)
	k[bpLoadFlags] = loadedHigh
	k[bpRelocatable] = 1
	k[bpXLoadFlags] = xlfKernel64
	binary.LittleEndian.PutUint32(k[bpCmdlineSize:], 2047)
	binary.LittleEndian.PutUint32(k[bpInitrdMax:], 0x7fffffff)
	binary.LittleEndian.PutUint32(k[bpInitSize:], 0x10000)
	copy(k[5*512:], payload)
	return k
}

func TestBzImage(t *testing.T) {
	mem := make(flatMem, 64<<20)
	k := fakeBzImage([]byte("KERNEL"))
	e, err := Load(mem, Params{Kernel: k, Initrd: []byte("INITRD"), Cmdline: "console=ttyS0", MemSize: mem.Size(), VCPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	if e.Mode != ModeLong64 || e.Regs.RIP != KernelAddr+0x200 || e.Regs.RSI != ZeroPageAddr {
		t.Fatalf("entry %+v", e)
	}
	if string(mem[KernelAddr:KernelAddr+6]) != "KERNEL" {
		t.Fatal("kernel not loaded at 1 MiB")
	}
	zp := mem[ZeroPageAddr:]
	if string(zp[bpHeader:bpHeader+4]) != "HdrS" || zp[bpTypeOfLoader] != 0xff {
		t.Fatal("setup header not copied / loader type unset")
	}
	if a := binary.LittleEndian.Uint32(zp[bpCmdLinePtr:]); a != CmdlineAddr || !strings.HasPrefix(string(mem[a:]), "console=ttyS0\x00") {
		t.Fatalf("cmdline at %#x", a)
	}
	ird := binary.LittleEndian.Uint32(zp[bpRamdiskImage:])
	if binary.LittleEndian.Uint32(zp[bpRamdiskSize:]) != 6 || string(mem[ird:ird+6]) != "INITRD" || ird%4096 != 0 {
		t.Fatalf("initrd at %#x", ird)
	}
	if zp[bpE820Entries] != 3 {
		t.Fatalf("e820 entries %d", zp[bpE820Entries])
	}
	if binary.LittleEndian.Uint64(mem[PML4Addr:])&^0xfff != PDPTAddr {
		t.Fatal("page tables not written")
	}
	// Refusals: bad magic, too-long command line, initrd too big.
	if _, err := Load(mem, Params{Kernel: []byte("nope"), MemSize: mem.Size(), VCPUs: 1}); err == nil {
		t.Fatal("garbage kernel accepted")
	}
	if _, err := Load(mem, Params{Kernel: k, Cmdline: strings.Repeat("x", 3000), MemSize: mem.Size(), VCPUs: 1}); err == nil {
		t.Fatal("over-long cmdline accepted")
	}
	if _, err := Load(mem, Params{Kernel: k, Initrd: make([]byte, 70<<20), MemSize: mem.Size(), VCPUs: 1}); err == nil {
		t.Fatal("oversized initrd accepted")
	}
}

// fakeVmlinux builds an ELF64 with one PT_LOAD at 16 MiB and a PVH note.
func fakeVmlinux(entry uint32) []byte {
	le := binary.LittleEndian
	code := []byte("VMLINUX")
	note := make([]byte, 12+4+4)
	le.PutUint32(note[0:], 4)
	le.PutUint32(note[4:], 4)
	le.PutUint32(note[8:], xenElfNotePhys32Entry)
	copy(note[12:], "Xen\x00")
	le.PutUint32(note[16:], entry)
	const phoff, phnum = 64, 2
	dataOff := phoff + phnum*56
	b := make([]byte, dataOff+len(note)+len(code))
	copy(b, "\x7fELF")
	b[4], b[5], b[6] = 2, 1, 1
	le.PutUint16(b[16:], 2)  // ET_EXEC
	le.PutUint16(b[18:], 62) // EM_X86_64
	le.PutUint32(b[20:], 1)
	le.PutUint64(b[32:], phoff)
	le.PutUint16(b[52:], 64)
	le.PutUint16(b[54:], 56)
	le.PutUint16(b[56:], phnum)
	ph := b[phoff:]
	le.PutUint32(ph[0:], 4) // PT_NOTE
	le.PutUint64(ph[8:], uint64(dataOff))
	le.PutUint64(ph[32:], uint64(len(note)))
	le.PutUint64(ph[40:], uint64(len(note)))
	ph = b[phoff+56:]
	le.PutUint32(ph[0:], 1) // PT_LOAD
	le.PutUint64(ph[8:], uint64(dataOff+len(note)))
	le.PutUint64(ph[24:], 0x1000000)
	le.PutUint64(ph[32:], uint64(len(code)))
	le.PutUint64(ph[40:], 0x2000)
	copy(b[dataOff:], note)
	copy(b[dataOff+len(note):], code)
	return b
}

func TestPVH(t *testing.T) {
	mem := make(flatMem, 64<<20)
	mem[0x1000000+100] = 0xEE // must be cleared as BSS
	e, err := Load(mem, Params{Kernel: fakeVmlinux(0x1000123), Initrd: []byte("RD"), Cmdline: "root=/dev/vda", MemSize: mem.Size(), VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	if e.Mode != ModeProtected32 || e.Regs.RIP != 0x1000123 || e.Regs.RBX != PVHInfoAddr {
		t.Fatalf("entry %+v", e)
	}
	if string(mem[0x1000000:0x1000007]) != "VMLINUX" || mem[0x1000000+100] != 0 {
		t.Fatal("segment not loaded / bss not cleared")
	}
	le := binary.LittleEndian
	info := mem[PVHInfoAddr:]
	if le.Uint32(info) != pvhMagic || le.Uint64(info[24:]) != CmdlineAddr || le.Uint32(info[12:]) != 1 || le.Uint32(info[48:]) != 3 {
		t.Fatalf("start info %x", info[:56])
	}
	mod := le.Uint64(mem[le.Uint64(info[16:]):])
	if string(mem[mod:mod+2]) != "RD" {
		t.Fatal("initrd module")
	}
	if _, err := Load(mem, Params{Kernel: fakeVmlinux(0)[:200], MemSize: mem.Size(), VCPUs: 1}); err == nil {
		t.Fatal("truncated ELF accepted")
	}
}

func TestMPTable(t *testing.T) {
	mem := make(flatMem, 2<<20)
	for _, n := range []int{1, 4, 64} {
		if err := WriteMPTable(mem, n); err != nil {
			t.Fatal(err)
		}
		fp := mem[EBDAStart : EBDAStart+16]
		if string(fp[:4]) != "_MP_" || checksum(fp) != 0 {
			t.Fatal("floating pointer")
		}
		ct := mem[EBDAStart+16:]
		l := binary.LittleEndian.Uint16(ct[4:])
		if string(ct[:4]) != "PCMP" || checksum(ct[:l]) != 0 || int(l)+16 != MPTableSize(n) {
			t.Fatalf("config table n=%d len %d", n, l)
		}
		if c := binary.LittleEndian.Uint16(ct[34:]); int(c) != n+2+mpIRQs+2 {
			t.Fatalf("entries %d", c)
		}
	}
}

func TestE820(t *testing.T) {
	r := E820(MMIOGapStart + (1 << 30))
	if len(r) != 4 || r[2].Addr+r[2].Size != MMIOGapStart || r[3].Addr != MMIOGapEnd || r[3].Size != 1<<30 {
		t.Fatalf("%+v", r)
	}
	if VirtioMMIOArg(0xd0000000, 0x1000, 5) != "virtio_mmio.device=4K@0xd0000000:5" {
		t.Fatal(VirtioMMIOArg(0xd0000000, 0x1000, 5))
	}
}

func FuzzLoadKernel(f *testing.F) {
	f.Add(fakeBzImage([]byte("x")))
	f.Add(fakeVmlinux(0x1000000))
	f.Add([]byte("\x7fELF"))
	f.Fuzz(func(t *testing.T, k []byte) {
		mem := make(flatMem, 32<<20)
		Load(mem, Params{Kernel: k, Cmdline: "a", MemSize: mem.Size(), VCPUs: 1}) // must not panic
	})
}
