package vsock_test

import (
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/vsock"
)

// FuzzVsockPacket feeds arbitrary packets (header and payload, split over
// one or two descriptors) to the device's tx queue. Whatever the guest
// sends, the device must not panic or hang, and everything it puts on the
// rx queue must be a well-formed packet to the guest.
func FuzzVsockPacket(f *testing.F) {
	pk := func(h vsock.Hdr, payload []byte) []byte {
		b := encode(h)
		return append(b, payload...)
	}
	base := vsock.Hdr{SrcCID: guestCID, DstCID: vsock.HostCID, SrcPort: 1000, DstPort: 5000, Type: vsock.TypeStream}
	for _, op := range []uint16{vsock.OpRequest, vsock.OpResponse, vsock.OpRST, vsock.OpShutdown,
		vsock.OpRW, vsock.OpCreditUpdate, vsock.OpCreditRequest, 99} {
		h := base
		h.Op, h.BufAlloc = op, 4096
		var payload []byte
		if op == vsock.OpRW {
			payload = []byte("hello")
			h.Len = 5
		}
		f.Add(pk(h, payload), uint8(0))
	}
	h := base
	h.Op, h.Len = vsock.OpRW, 1<<20
	f.Add(pk(h, nil), uint8(20))
	h = base
	h.Type = 2
	f.Add(pk(h, nil), uint8(44))

	g := newGuest(f)
	f.Fuzz(func(t *testing.T, in []byte, split uint8) {
		var segs []vt.Seg
		s := min(int(split), len(in))
		if s > 0 {
			segs = append(segs, vt.R(in[:s]))
		}
		if len(in) > s {
			segs = append(segs, vt.R(in[s:]))
		}
		if len(segs) == 0 {
			segs = append(segs, vt.W(8))
		}
		if _, err := g.tx.Do(segs...); err != nil {
			t.Fatal(err)
		}
		if g.tr.Status()&virtio.StatusDeviceNeedsReset != 0 {
			t.Fatalf("device broken by a packet")
		}
		for _, u := range g.rx.Collect() {
			b := u.Data()
			if len(b) < vsock.HdrSize {
				t.Fatalf("short rx packet")
			}
			var r vsock.Hdr
			r.Decode(b)
			if r.DstCID != guestCID || r.SrcCID != vsock.HostCID || int(r.Len) != len(b)-vsock.HdrSize {
				t.Fatalf("bad rx packet %+v", r)
			}
			g.rx.Add(vt.W(vsock.HdrSize + 4096))
		}
		g.rx.Kick()
	})
}
