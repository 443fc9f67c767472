package virtio

import (
	"encoding/binary"
	"sync/atomic"
	"unsafe"

	"github.com/cubesandbox/cube/internal/vmm/devices"
)

// word returns the naturally aligned 32-bit word of guest memory that
// contains the u16 at gpa, and the shift of the u16 within it, or nil if
// the host address is odd or the word is not all in guest memory.
func word(mem devices.GuestMemory, gpa uint64) (*uint32, uint) {
	b, err := mem.Slice(gpa, 2)
	if err != nil {
		return nil, 0
	}
	switch uintptr(unsafe.Pointer(&b[0])) % 4 {
	case 0:
		if w, err := mem.Slice(gpa, 4); err == nil {
			return (*uint32)(unsafe.Pointer(&w[0])), 0
		}
	case 2:
		if gpa >= 2 {
			if w, err := mem.Slice(gpa-2, 4); err == nil {
				return (*uint32)(unsafe.Pointer(&w[0])), 16
			}
		}
	}
	return nil, 0
}

// Load16 reads the little-endian u16 at gpa with an atomic load (acquire
// ordering against the writer on another CPU). Out-of-range reads give 0.
func Load16(mem devices.GuestMemory, gpa uint64) uint16 {
	if w, sh := word(mem, gpa); w != nil {
		return uint16(atomic.LoadUint32(w) >> sh) // x86 hosts are little endian
	}
	b, err := mem.Slice(gpa, 2)
	if err != nil {
		return 0
	}
	return binary.LittleEndian.Uint16(b)
}

// Store16 writes the little-endian u16 at gpa atomically without touching
// the other half of its word (release ordering).
func Store16(mem devices.GuestMemory, gpa uint64, v uint16) {
	if w, sh := word(mem, gpa); w != nil {
		for {
			old := atomic.LoadUint32(w)
			nw := old&^(0xffff<<sh) | uint32(v)<<sh
			if atomic.CompareAndSwapUint32(w, old, nw) {
				return
			}
		}
	}
	if b, err := mem.Slice(gpa, 2); err == nil {
		binary.LittleEndian.PutUint16(b, v)
	}
}
