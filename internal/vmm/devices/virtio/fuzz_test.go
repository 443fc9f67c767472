package virtio_test

import (
	"encoding/binary"
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

// echo is a device that copies each chain's readable bytes into its
// writable ones, so fuzzing exercises both directions of every chain.
type echo struct{ a *virtio.Active }

func (e *echo) DeviceID() uint32                 { return 42 }
func (e *echo) Features() uint64                 { return 1 }
func (e *echo) QueueSizes() []uint16             { return []uint16{16, 8} }
func (e *echo) ReadConfig(off uint64, p []byte)  { copy(p, []byte("echo-config")[min(off, 11):]) }
func (e *echo) WriteConfig(off uint64, p []byte) {}
func (e *echo) Activate(a *virtio.Active) error  { e.a = a; return nil }
func (e *echo) Reset()                           { e.a = nil }
func (e *echo) QueueNotify(q int) {
	if e.a == nil {
		return
	}
	e.a.Queues[q].Drain(func(c *virtio.Chain) uint32 {
		buf := make([]byte, min(c.ReadableLen(), 1<<16))
		n := c.ReadAt(buf, 0)
		return uint32(c.WriteAt(buf[:n], 0))
	})
}

// Fuzz memory layout: a 64 KiB guest with queue 0 (size 16) rings at
// fixed places; the fuzzer owns the descriptor table, the avail ring and
// the rest of memory (buffers and indirect tables).
const (
	fzDesc  = 0x1000
	fzAvail = 0x2000
	fzUsed  = 0x3000
	fzData  = 0x4000
	fzMem   = 0x10000
)

func fuzzRig(opts virtio.Options) (*vt.Driver, *virtio.Transport) {
	mem := vt.NewMem(fzMem)
	irq := vt.NewIRQ()
	tr := virtio.NewTransport(&echo{}, mem, irq, opts)
	d := &vt.Driver{Dev: tr, Mem: mem, IRQ: irq}
	d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	d.WriteFeatures(tr.OfferedFeatures())
	d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	for q, sz := range []uint32{16, 8} {
		base := uint64(q) * 0x400
		d.Write32(virtio.RegQueueSel, uint32(q))
		d.Write32(virtio.RegQueueNum, sz)
		d.Write32(virtio.RegQueueDescLow, uint32(fzDesc+base))
		d.Write32(virtio.RegQueueAvailLow, uint32(fzAvail+base))
		d.Write32(virtio.RegQueueUsedLow, uint32(fzUsed+base))
		d.Write32(virtio.RegQueueReady, 1)
	}
	d.SetStatus(d.Status() | virtio.StatusDriverOK)
	return d, tr
}

func putDesc(b []byte, i int, addr uint64, ln uint32, flags, next uint16) {
	binary.LittleEndian.PutUint64(b[16*i:], addr)
	binary.LittleEndian.PutUint32(b[16*i+8:], ln)
	binary.LittleEndian.PutUint16(b[16*i+12:], flags)
	binary.LittleEndian.PutUint16(b[16*i+14:], next)
}

// chainSeed builds a fuzz input: descriptor table (256 bytes), avail ring
// (flags, idx, 16 entries, used_event: 38 bytes), then data memory.
func chainSeed(build func(desc, avail, data []byte)) []byte {
	b := make([]byte, 256+38+512)
	build(b[:256], b[256:294], b[294:])
	return b
}

func FuzzDescriptorChain(f *testing.F) {
	// A direct chain: readable 8 bytes, writable 8 bytes.
	f.Add(chainSeed(func(desc, avail, data []byte) {
		putDesc(desc, 0, fzData, 8, 1, 1)
		putDesc(desc, 1, fzData+64, 8, 2, 0)
		binary.LittleEndian.PutUint16(avail[2:], 1)
	}))
	// An indirect chain of three.
	f.Add(chainSeed(func(desc, avail, data []byte) {
		putDesc(desc, 3, fzData, 48, 4, 0)
		putDesc(data, 0, fzData+128, 16, 1, 1)
		putDesc(data, 1, fzData+160, 16, 3, 2)
		putDesc(data, 2, fzData+192, 16, 2, 0)
		binary.LittleEndian.PutUint16(avail[2:], 1)
		binary.LittleEndian.PutUint16(avail[4:], 3)
	}))
	// A cycle and a head out of range.
	f.Add(chainSeed(func(desc, avail, data []byte) {
		putDesc(desc, 0, fzData, 8, 1, 1)
		putDesc(desc, 1, fzData, 8, 1, 0)
		binary.LittleEndian.PutUint16(avail[2:], 2)
		binary.LittleEndian.PutUint16(avail[6:], 99)
	}))
	f.Fuzz(func(t *testing.T, in []byte) {
		d, tr := fuzzRig(virtio.Options{})
		copy(d.Mem.B[fzDesc:fzDesc+256], in)
		if len(in) > 256 {
			copy(d.Mem.B[fzAvail:fzAvail+38], in[256:])
		}
		if len(in) > 294 {
			copy(d.Mem.B[fzData:], in[294:])
		}
		before := binary.LittleEndian.Uint16(d.Mem.B[fzAvail+2:])
		tr.Notify(0)
		tr.Notify(0)
		used := binary.LittleEndian.Uint16(d.Mem.B[fzUsed+2:])
		// Either the ring was broken (nothing used) or every published
		// chain, and no more, went back to the driver.
		if tr.Status()&virtio.StatusDeviceNeedsReset != 0 {
			if used > before {
				t.Fatalf("broken ring but %d of %d chains used", used, before)
			}
			return
		}
		if used != before {
			t.Fatalf("avail idx %d, used idx %d", before, used)
		}
		for i := uint16(0); i < used; i++ {
			e := d.Mem.B[fzUsed+4+8*uint64(i%16):]
			if id := binary.LittleEndian.Uint32(e); id >= 16 {
				t.Fatalf("used id %d out of range", id)
			}
		}
	})
}

func FuzzMMIOWrites(f *testing.F) {
	op := func(off uint16, width uint8, v uint32) []byte {
		b := make([]byte, 7)
		binary.LittleEndian.PutUint16(b, off)
		b[2] = width
		binary.LittleEndian.PutUint32(b[3:], v)
		return b
	}
	seq := func(ops ...[]byte) []byte {
		var out []byte
		for _, o := range ops {
			out = append(out, o...)
		}
		return out
	}
	f.Add(seq(op(virtio.RegStatus, 4, 1), op(virtio.RegStatus, 4, 3), op(virtio.RegDriverFeatSel, 4, 1),
		op(virtio.RegDriverFeatures, 4, 1), op(virtio.RegStatus, 4, 11), op(virtio.RegQueueNum, 4, 16),
		op(virtio.RegQueueDescLow, 4, 0x1000), op(virtio.RegQueueAvailLow, 4, 0x2000),
		op(virtio.RegQueueUsedLow, 4, 0x3000), op(virtio.RegQueueReady, 4, 1), op(virtio.RegStatus, 4, 15),
		op(virtio.RegQueueNotify, 4, 0)))
	f.Add(seq(op(virtio.RegStatus, 4, 0xff), op(virtio.RegQueueSel, 4, 0xffffffff), op(virtio.RegQueueNum, 4, 0xffffffff),
		op(virtio.RegQueueReady, 4, 1), op(0x100, 1, 7), op(0xfff, 8, 1), op(virtio.RegStatus, 4, 0)))
	f.Add(seq(op(virtio.RegInterruptACK, 4, 3), op(virtio.RegQueueNotify, 4, 0xffff), op(virtio.RegConfigGen, 2, 1)))
	f.Fuzz(func(t *testing.T, in []byte) {
		mem := vt.NewMem(fzMem)
		tr := virtio.NewTransport(&echo{}, mem, vt.NewIRQ(), virtio.Options{})
		buf := make([]byte, 8)
		for len(in) >= 7 {
			off := uint64(binary.LittleEndian.Uint16(in)) % 0x200
			w := []int{1, 2, 4, 8}[in[2]%4]
			binary.LittleEndian.PutUint32(buf, binary.LittleEndian.Uint32(in[3:]))
			in = in[7:]
			if in2 := len(in); in2%3 == 0 {
				tr.MMIORead(off, buf[:w])
			}
			tr.MMIOWrite(off, buf[:w])
			s := tr.Status()
			if s&virtio.StatusDriverOK != 0 && s&virtio.StatusFeaturesOK == 0 {
				t.Fatalf("DRIVER_OK without FEATURES_OK: %#x", s)
			}
			if s&virtio.StatusFeaturesOK != 0 {
				st, _ := tr.SaveState()
				if len(st) == 0 {
					t.Fatal("no state")
				}
			}
		}
		// Whatever happened, a reset brings the device back.
		tr.Reset()
		if tr.Status() != 0 || tr.InterruptStatus() != 0 {
			t.Fatalf("reset left status %#x", tr.Status())
		}
	})
}
