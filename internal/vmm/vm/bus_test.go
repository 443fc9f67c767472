//go:build linux

package vm

import (
	"encoding/binary"
	"testing"
)

// rangeDev checks every access it gets stays inside its window.
type rangeDev struct {
	t          testing.TB
	base, size uint64
	pio        bool
	hits       int
}

func (d *rangeDev) check(addr uint64, n int) {
	if !d.pio {
		addr += d.base // MMIO devices get offsets
	}
	if n != 1 && n != 2 && n != 4 && n != 8 {
		d.t.Fatalf("device got access of size %d", n)
	}
	if addr < d.base || addr+uint64(n) > d.base+d.size {
		d.t.Fatalf("device [%#x,+%#x) got access at %#x size %d", d.base, d.size, addr, n)
	}
	d.hits++
}
func (d *rangeDev) PIORead(port uint16, data []byte)  { d.check(uint64(port), len(data)) }
func (d *rangeDev) PIOWrite(port uint16, data []byte) { d.check(uint64(port), len(data)) }
func (d *rangeDev) MMIORead(off uint64, data []byte)  { d.check(off, len(data)) }
func (d *rangeDev) MMIOWrite(off uint64, data []byte) { d.check(off, len(data)) }

func TestBusOverlapAndDispatch(t *testing.T) {
	var b Bus
	d := &rangeDev{t: t, base: 0x1000, size: 0x100}
	if err := b.AddMMIO("a", 0x1000, 0x100, d); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]uint64{{0x10ff, 1}, {0xf00, 0x101}, {0x1050, 0x10}, {0, 0}, {^uint64(0), 2}} {
		if err := b.AddMMIO("b", r[0], r[1], d); err == nil {
			t.Errorf("range %#x+%#x accepted", r[0], r[1])
		}
	}
	if err := b.AddMMIO("c", 0x1100, 0x100, &rangeDev{t: t, base: 0x1100, size: 0x100}); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if !b.Read(0x10fc, buf) || d.hits != 1 {
		t.Fatal("in-range read not dispatched")
	}
	if b.Read(0x10fe, buf) { // straddles a and c
		t.Fatal("straddling read dispatched")
	}
	if binary.LittleEndian.Uint32(buf) != 0xffffffff {
		t.Fatalf("unclaimed read = %x, want all ones", buf)
	}
	if b.Write(0x10fc, make([]byte, 3)) {
		t.Fatal("size-3 write dispatched")
	}
	if b.Unhandled.Load() != 2 {
		t.Fatalf("unhandled = %d", b.Unhandled.Load())
	}
}

func FuzzBusDispatch(f *testing.F) {
	f.Add(uint64(0x3f8), uint8(1), true, true)
	f.Add(uint64(0x3ff), uint8(2), false, true)
	f.Add(uint64(0xd0000ffc), uint8(8), true, false)
	f.Add(^uint64(0), uint8(8), false, false)
	f.Add(uint64(0xcfffffff), uint8(4), true, false)
	f.Add(uint64(0x10000), uint8(0), true, true)
	f.Fuzz(func(t *testing.T, addr uint64, n uint8, write, pio bool) {
		var b Bus
		devs := []*rangeDev{
			{t: t, base: 0x3f8, size: 8, pio: true},
			{t: t, base: 0x60, size: 1, pio: true},
			{t: t, base: 0xfff0, size: 0x10, pio: true},
		}
		mdevs := []*rangeDev{
			{t: t, base: 0xd0000000, size: 0x1000},
			{t: t, base: 0xd0001000, size: 0x1000},
			{t: t, base: 0xffffffffffffe000, size: 0x1000},
		}
		if pio {
			for _, d := range devs {
				if err := b.AddPIO("d", uint16(d.base), uint16(d.size), d); err != nil {
					t.Fatal(err)
				}
			}
			addr &= 0xffff
		} else {
			for _, d := range mdevs {
				if err := b.AddMMIO("d", d.base, d.size, d); err != nil {
					t.Fatal(err)
				}
			}
		}
		data := make([]byte, int(n)%17)
		var ok bool
		if write {
			ok = b.Write(addr, data)
		} else {
			ok = b.Read(addr, data)
			if !ok {
				for _, c := range data {
					if c != 0xff {
						t.Fatalf("unclaimed read returned %x", data)
					}
				}
			}
		}
		if !ok && b.Unhandled.Load() != 1 {
			t.Fatal("unclaimed access not counted")
		}
	})
}
