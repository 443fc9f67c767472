//go:build linux

package machine

import (
	"encoding/binary"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/synth"
)

// BenchmarkQueueNotify measures what one virtio QueueNotify write costs
// the guest (ns per write, the vCPU's time away from guest code): an
// MMIO exit to the VMM against its peer, an ioeventfd signalled inside
// the kernel, in the same run. The guest, at CPL 3, writes the register
// and counts its writes in RAM.
func BenchmarkQueueNotify(b *testing.B) {
	if !kvm.Available() {
		b.Skip("no usable /dev/kvm on this host")
	}
	const counter = 0x7F000
	for _, mode := range []struct {
		name string
		noFD bool
	}{{"mmio-exit", true}, {"ioeventfd", false}} {
		b.Run(mode.name, func(b *testing.B) {
			code := synth.New(synth.LoadAddr).ToUser(0x80000, false).
				StoreCountForever(boot.VirtioMMIOBase+virtio.RegQueueNotify, counter).Bytes()
			m, err := New(Spec{
				Kernel: code, KernelFormat: boot.FormatRaw, MemSize: 32 << 20, VCPUs: 1, NoIOEventFD: mode.noFD,
				Virtio: []VirtioDevice{{Name: "rng", Build: func(mem devices.GuestMemory, irq devices.IRQLine) (devices.MMIODevice, error) {
					return virtio.NewTransport(rng.New(), mem, irq, virtio.Options{}), nil
				}}},
			})
			if err != nil {
				b.Fatal(err)
			}
			defer m.VM.Close()
			cnt, _ := m.VM.Mem.Slice(counter, 8)
			read := func() uint64 { return binary.LittleEndian.Uint64(cnt) }
			if err := m.VM.Start(); err != nil {
				b.Fatal(err)
			}
			for read() == 0 {
				time.Sleep(100 * time.Microsecond)
			}
			b.ResetTimer()
			start := read()
			for read()-start < uint64(b.N) {
				time.Sleep(50 * time.Microsecond)
			}
			b.StopTimer()
			m.VM.Stop()
		})
	}
}
