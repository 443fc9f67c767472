// Package synth assembles tiny synthetic x86-64 guests (a few bytes of
// machine code) for tests and benchmarks of the VMM where no Linux guest
// can boot (KVM-PVM hosts run guest user mode natively and emulate guest
// kernel mode). Images are flat code loaded at boot.KernelAddr and entered
// in 64-bit mode at CPL 0 with user-accessible identity paging (see
// boot.LoadRaw); ToUser drops to CPL 3.
package synth

import "encoding/binary"

// LoadAddr is where raw images are loaded and entered (boot.KernelAddr).
const LoadAddr = 0x100000

// User-mode selectors of the boot GDT (boot.SelUCode, boot.SelUData).
const (
	selUCode = 0x3B
	selUData = 0x33
)

// Asm builds machine code for a given load address.
type Asm struct {
	b    []byte
	base uint64
}

// New starts code that will live at base.
func New(base uint64) *Asm { return &Asm{base: base} }

// Bytes returns the code.
func (a *Asm) Bytes() []byte { return append([]byte(nil), a.b...) }

// PC is the address of the next instruction.
func (a *Asm) PC() uint64 { return a.base + uint64(len(a.b)) }

func (a *Asm) emit(b ...byte) *Asm { a.b = append(a.b, b...); return a }

func (a *Asm) imm32(v uint32) *Asm {
	return a.emit(byte(v), byte(v>>8), byte(v>>16), byte(v>>24))
}

// MovEAX loads eax (zero-extended into rax).
func (a *Asm) MovEAX(v uint32) *Asm { return a.emit(0xB8).imm32(v) }

// OutStr writes s byte by byte to port (out dx, al).
func (a *Asm) OutStr(port uint16, s string) *Asm {
	a.emit(0x66, 0xBA, byte(port), byte(port>>8))
	for i := 0; i < len(s); i++ {
		a.emit(0xB0, s[i], 0xEE)
	}
	return a
}

// RepOutsb writes the n bytes at addr to port with one string
// instruction (rep outsb): the VMM sees I/O exits with count > 1.
func (a *Asm) RepOutsb(port uint16, addr, n uint32) *Asm {
	a.emit(0xBE).imm32(addr) // mov esi, addr
	a.emit(0xB9).imm32(n)    // mov ecx, n
	a.emit(0x66, 0xBA, byte(port), byte(port>>8))
	return a.emit(0xF3, 0x6E) // rep outsb
}

// InByte reads port into al.
func (a *Asm) InByte(port uint16) *Asm {
	return a.emit(0x66, 0xBA, byte(port), byte(port>>8), 0xEC)
}

// Store32 writes v to the 32-bit address addr.
func (a *Asm) Store32(addr, v uint32) *Asm {
	return a.MovEAX(addr).emit(0xC7, 0x00).imm32(v)
}

// Copy32 reads 32 bits at src and writes them to dst.
func (a *Asm) Copy32(src, dst uint32) *Asm {
	a.MovEAX(src).emit(0x8B, 0x18) // mov ebx, [rax]
	return a.MovEAX(dst).emit(0x89, 0x18)
}

// OutMMIO32 reads 32 bits at addr and writes them, low byte first, to
// port (so an MMIO read's result shows up on the console).
func (a *Asm) OutMMIO32(port uint16, addr uint32) *Asm {
	a.MovEAX(addr).emit(0x8B, 0x00) // mov eax, [rax]
	a.emit(0x66, 0xBA, byte(port), byte(port>>8))
	for i := 0; i < 4; i++ {
		a.emit(0xEE, 0xC1, 0xE8, 0x08) // out dx, al; shr eax, 8
	}
	return a
}

// ToUser continues at the next instruction at CPL 3 (IOPL 3, IF as
// given) with stack rsp, through iretq.
func (a *Asm) ToUser(rsp uint32, interrupts bool) *Asm {
	flags := uint32(0x3002)
	if interrupts {
		flags |= 0x200
	}
	a.emit(0x6A, selUData)    // push ss
	a.emit(0x68).imm32(rsp)   // push rsp
	a.emit(0x68).imm32(flags) // push rflags
	a.emit(0x6A, selUCode)    // push cs
	next := a.PC() + 5 + 2    // after push imm32 and iretq
	a.emit(0x68).imm32(uint32(next))
	return a.emit(0x48, 0xCF) // iretq
}

// Sti enables interrupts.
func (a *Asm) Sti() *Asm { return a.emit(0xFB) }

// Spin loops forever.
func (a *Asm) Spin() *Asm { return a.emit(0xEB, 0xFE) }

// CountForever increments the 64-bit counter at addr forever.
func (a *Asm) CountForever(addr uint32) *Asm {
	a.MovEAX(addr)
	return a.emit(0x48, 0xFF, 0x00, 0xEB, 0xFB) // l: inc qword [rax]; jmp l
}

// StoreCountForever writes 0 to the 32-bit address addr and increments
// the 64-bit counter at counter, forever (a guest hammering a device
// register, e.g. virtio QueueNotify, that counts its own writes).
func (a *Asm) StoreCountForever(addr, counter uint32) *Asm {
	a.emit(0xB9).imm32(counter) // mov ecx, counter
	a.MovEAX(addr)
	return a.emit(0xC7, 0x00, 0, 0, 0, 0, // l: mov dword [rax], 0
		0x48, 0xFF, 0x01, // inc qword [rcx]
		0xEB, 0xF5) // jmp l
}

// UD2 raises #UD.
func (a *Asm) UD2() *Asm { return a.emit(0x0F, 0x0B) }

// Hlt halts.
func (a *Asm) Hlt() *Asm { return a.emit(0xF4) }

// EOI acknowledges the local APIC (write to the EOI register).
func (a *Asm) EOI() *Asm { return a.Store32(0xFEE000B0, 0) }

// Iretq returns from an interrupt.
func (a *Asm) Iretq() *Asm { return a.emit(0x48, 0xCF) }

// IDTGate returns a 16-byte 64-bit interrupt gate to handler (code
// selector 0x10, DPL 0).
func IDTGate(handler uint64) []byte {
	g := make([]byte, 16)
	binary.LittleEndian.PutUint16(g[0:], uint16(handler))
	binary.LittleEndian.PutUint16(g[2:], 0x10)
	g[5] = 0x8E
	binary.LittleEndian.PutUint16(g[6:], uint16(handler>>16))
	binary.LittleEndian.PutUint32(g[8:], uint32(handler>>32))
	return g
}

// CounterAddr is where Hello's guest keeps its loop counter.
const CounterAddr = 0x7F000

// Hello is the standard synthetic guest: it writes msg to COM1 (port
// 0x3F8) from CPL 0, drops to CPL 3 and counts at CounterAddr forever.
func Hello(msg string) []byte {
	return New(LoadAddr).OutStr(0x3F8, msg).ToUser(0x80000, false).CountForever(CounterAddr).Bytes()
}

// TripleFault is a guest that prints msg and then raises #UD at CPL 3
// with no IDT: the fault cannot be delivered and the vCPU shuts down.
func TripleFault(msg string) []byte {
	return New(LoadAddr).OutStr(0x3F8, msg).ToUser(0x80000, false).UD2().Bytes()
}
