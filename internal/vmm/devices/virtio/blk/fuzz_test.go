package blk_test

import (
	"fmt"
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/blk"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

// memDisk is a Disk in memory, for fuzzing the request parser.
type memDisk struct{ b []byte }

func (m *memDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return 0, fmt.Errorf("out of range")
	}
	return copy(p, m.b[off:]), nil
}

func (m *memDisk) WriteAt(p []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(p)) > int64(len(m.b)) {
		return 0, fmt.Errorf("out of range")
	}
	return copy(m.b[off:], p), nil
}

func (m *memDisk) Flush() error   { return nil }
func (m *memDisk) Size() int64    { return int64(len(m.b)) }
func (m *memDisk) ReadOnly() bool { return false }
func (m *memDisk) Close() error   { return nil }

// FuzzBlkRequest sends arbitrary request bytes (header and data, split
// over descriptors as the fuzzer likes) with a writable area of any size.
// The device must answer every request with a valid status and never
// write past the disk or the chain.
func FuzzBlkRequest(f *testing.F) {
	for _, typ := range []uint32{blk.TIn, blk.TOut, blk.TFlush, blk.TGetID, 77} {
		f.Add(append(hdr(typ, 3), make([]byte, 512)...), uint16(513), uint8(16))
	}
	f.Add(hdr(blk.TIn, ^uint64(0)), uint16(1025), uint8(0))
	f.Add([]byte{1, 2, 3}, uint16(1), uint8(1))
	disk := &memDisk{b: make([]byte, 64<<10)}
	d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		return virtio.NewTransport(blk.New(disk, "fuzz"), mem, irq, virtio.Options{})
	})
	if err := d.Init(^uint64(0), 1, 0); err != nil {
		f.Fatal(err)
	}
	q := d.Queues[0]
	f.Fuzz(func(t *testing.T, in []byte, wlen uint16, split uint8) {
		var segs []vt.Seg
		s := min(int(split), len(in))
		if s > 0 {
			segs = append(segs, vt.R(in[:s]))
		}
		if len(in) > s {
			segs = append(segs, vt.R(in[s:]))
		}
		w := int(wlen % 8192)
		if w > 0 {
			segs = append(segs, vt.W(w))
		}
		if len(segs) == 0 {
			return
		}
		u, err := q.Do(segs...)
		if err != nil {
			t.Fatal(err)
		}
		if int(u.Len) > w {
			t.Fatalf("used len %d > writable %d", u.Len, w)
		}
		if w > 0 && u.Len > 0 {
			last := u.Writable[len(u.Writable)-1]
			if st := last[len(last)-1]; st > blk.SUnsupp {
				t.Fatalf("status %d", st)
			}
		}
		if len(disk.b) != 64<<10 {
			t.Fatal("disk resized")
		}
	})
}
