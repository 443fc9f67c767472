package blk_test

import (
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
	ov, err := blk.OpenOverlay(base, filepath.Join(dir, "x.cow"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ov.Close() })
	plain, err = os.OpenFile(base, os.O_RDWR, 0)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { plain.Close() })
	return base, ov, plain
}

// Benchmark4K compares 4 KiB random I/O through the virtio-blk device and
// overlay (the full guest request path, in process), through the overlay
// alone, and pread/pwrite on a plain file: the peer, in the same run.
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
			q := d.Queues[0]
			buf := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s := uint64(rand.IntN(benchSize/4096)) * 8
				var segs []vt.Seg
				if write {
					segs = []vt.Seg{vt.R(hdr(blk.TOut, s)), vt.R(buf), vt.W(1)}
				} else {
					segs = []vt.Seg{vt.R(hdr(blk.TIn, s)), vt.W(4096), vt.W(1)}
				}
				q.Add(segs...)
				q.Kick()
				q.Collect()
			}
		})
		b.Run(op+"/overlay", func(b *testing.B) {
			_, ov, _ := benchFiles(b)
			buf := make([]byte, 4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				off := int64(rand.IntN(benchSize/4096)) * 4096
				var err error
				if write {
					_, err = ov.WriteAt(buf, off)
				} else {
					_, err = ov.ReadAt(buf, off)
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(op+"/pread-pwrite-file", func(b *testing.B) {
			_, _, f := benchFiles(b)
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
		})
	}
}
