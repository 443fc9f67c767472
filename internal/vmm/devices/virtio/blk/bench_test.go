package blk_test

import (
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/blk"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

const benchSize = 64 << 20

func benchFiles(b *testing.B) (base string, ov *blk.Overlay, plain *os.File) {
	dir := b.TempDir()
	base = filepath.Join(dir, "base.img")
	data := make([]byte, benchSize)
	for i := range data {
		data[i] = byte(i >> 12)
	}
	if err := os.WriteFile(base, data, 0o644); err != nil {
		b.Fatal(err)
	}
	ov = scratchOverlay(b, base)
	plain, err := os.OpenFile(base, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	// Start every variant with the image written back, so no variant
	// waits on writeback of the set-up data.
	if err := plain.Sync(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { plain.Close() })
	return base, ov, plain
}

// Benchmark4K compares 4 KiB random I/O through the virtio-blk device and
// overlay (the full guest request path, in process), through the overlay
// alone, and the peer in the same run: pread on the image file, pwrite
// into a sparse file of the same size.
func Benchmark4K(b *testing.B) {
	for _, write := range []bool{false, true} {
		op := "read"
		if write {
			op = "write"
		}
		b.Run(op+"/device+overlay", func(b *testing.B) {
			_, ov, _ := benchFiles(b)
			d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
				return virtio.NewTransport(blk.New(ov, "b"), mem, irq, virtio.Options{})
			})
			if err := d.Init(^uint64(0), 1, 0); err != nil {
				b.Fatal(err)
			}
			// One chain built once (header, 4 KiB data, status), re-published
			// every iteration with a new sector: the loop is the device's
			// request path plus the ring updates a guest driver makes.
			q := d.Queues[0]
			hdrA, dataA, stA := d.Alloc(16), d.Alloc(4096), d.Alloc(1)
			typ, dataFlags := uint32(blk.TIn), uint64(1|2)
			if write {
				typ, dataFlags = blk.TOut, 1
			}
			descs := [][5]uint64{{0, hdrA, 16, 1, 1}, {1, dataA, 4096, dataFlags, 2}, {2, stA, 1, 2, 0}}
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s := uint64(rand.IntN(benchSize/4096)) * 8
				copy(d.Mem.B[hdrA:], hdr(typ, s))
				q.AddRaw(0, descs)
				q.Kick()
				if u := q.Collect(); len(u) != 1 || d.Mem.B[stA] != blk.SOK {
					b.Fatalf("request failed: %v status %d", u, d.Mem.B[stA])
				}
			}
		})
		b.Run(op+"/overlay", func(b *testing.B) {
			_, ov, _ := benchFiles(b)
			random4K(b, ov, write)
		})
		b.Run(op+"/pread-pwrite-file", func(b *testing.B) {
			_, _, f := benchFiles(b)
			if write {
				// The peer of overlay writes is pwrite into a fresh sparse
				// file of the same size: what the overlay does underneath.
				var err error
				f, err = os.Create(filepath.Join(b.TempDir(), "sparse.img"))
				if err != nil {
					b.Fatal(err)
				}
				defer f.Close()
				if err := f.Truncate(benchSize); err != nil {
					b.Fatal(err)
				}
			}
			random4K(b, f, write)
		})
	}
}

// random4K times 4 KiB reads (or writes) at random aligned offsets of f.
func random4K(b *testing.B, f interface {
	io.ReaderAt
	io.WriterAt
}, write bool) {
	buf := make([]byte, 4096)
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := int64(rand.IntN(benchSize/4096)) * 4096
		var err error
		if write {
			_, err = f.WriteAt(buf, off)
		} else {
			_, err = f.ReadAt(buf, off)
		}
		if err != nil {
			b.Fatal(err)
		}
	}
}
