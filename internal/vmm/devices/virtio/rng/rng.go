// Package rng is virtio-rng: it fills the guest's buffers from the host's
// crypto/rand (getrandom).
package rng

import (
	"crypto/rand"

	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
)

// MaxPerRequest bounds the bytes filled per buffer chain, so a guest
// cannot make one request take long.
const MaxPerRequest = 64 << 10

// Device is a virtio entropy device.
type Device struct {
	*virtio.Server
}

// New returns a virtio-rng device.
func New() *Device {
	d := &Device{}
	d.Server = virtio.NewServer(fill)
	return d
}

func (d *Device) DeviceID() uint32           { return virtio.IDRNG }
func (d *Device) Features() uint64           { return 0 }
func (d *Device) QueueSizes() []uint16       { return []uint16{256} }
func (d *Device) ReadConfig(uint64, []byte)  {}
func (d *Device) WriteConfig(uint64, []byte) {}

// fill writes random bytes into a chain's writable buffers.
func fill(c *virtio.Chain) uint32 {
	left := MaxPerRequest
	n := 0
	for _, b := range c.Writable {
		p := b.Data[:min(len(b.Data), left)]
		if _, err := rand.Read(p); err != nil {
			break
		}
		n += len(p)
		left -= len(p)
		if left == 0 {
			break
		}
	}
	return uint32(n)
}
