package rng_test

import (
	"bytes"
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

func TestRNG(t *testing.T) {
	d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		return virtio.NewTransport(rng.New(), mem, irq, virtio.Options{})
	})
	if err := d.Init(^uint64(0), 1, 0); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	a, err := q.Do(vt.W(256))
	if err != nil {
		t.Fatal(err)
	}
	b, err := q.Do(vt.W(256))
	if err != nil {
		t.Fatal(err)
	}
	if a.Len != 256 || b.Len != 256 || bytes.Equal(a.Data(), b.Data()) || bytes.Equal(a.Data(), make([]byte, 256)) {
		t.Errorf("rng output not random: %x / %x", a.Data()[:16], b.Data()[:16])
	}
	// A huge request is capped, readable-only chains get nothing.
	big, err := q.Do(vt.W(rng.MaxPerRequest), vt.W(4096))
	if err != nil {
		t.Fatal(err)
	}
	if big.Len != rng.MaxPerRequest {
		t.Errorf("big request filled %d bytes", big.Len)
	}
	ro, err := q.Do(vt.R([]byte("x")))
	if err != nil || ro.Len != 0 {
		t.Errorf("readable-only chain: %v %v", ro.Len, err)
	}
}
