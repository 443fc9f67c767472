package vsock_test

import (
	"encoding/binary"
	"io"
	"net"
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

// FuzzVsockSession plays sequences of well-addressed packets against a
// device whose host side has an echo server on port 5000, so connection
// set-up, data, credit, shutdown and reset paths all get exercised. Each
// record is op, src port, dst port selector, flags, u16 buf_alloc, u16
// fwd_cnt, u8 payload length, payload.
func FuzzVsockSession(f *testing.F) {
	rec := func(op, sp, dp, fl uint8, alloc, fwd uint16, payload string) []byte {
		b := []byte{op, sp, dp, fl, byte(alloc), byte(alloc >> 8), byte(fwd), byte(fwd >> 8), byte(len(payload))}
		return append(b, payload...)
	}
	f.Add(append(append(append(rec(vsock.OpRequest, 1, 0, 0, 4096, 0, ""),
		rec(vsock.OpRW, 1, 0, 0, 4096, 0, "ping")...),
		rec(vsock.OpCreditUpdate, 1, 0, 0, 8192, 4, "")...),
		rec(vsock.OpShutdown, 1, 0, 3, 4096, 4, "")...))
	f.Add(append(rec(vsock.OpRequest, 2, 0, 0, 1, 0, ""), rec(vsock.OpRW, 2, 0, 0, 1, 0, "overrun-credit")...))
	f.Add(append(rec(vsock.OpRequest, 3, 1, 0, 0, 0, ""), rec(vsock.OpRST, 3, 1, 0, 0, 0, "")...))

	g := newGuest(f)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: g.path + "_5000", Net: "unix"})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	f.Fuzz(func(t *testing.T, in []byte) {
		g.t = t
		for len(in) >= 9 {
			n := min(int(in[8]), len(in)-9)
			h := vsock.Hdr{Op: uint16(in[0] % 9), SrcPort: 100 + uint32(in[1]), DstPort: 5000 + uint32(in[2]%2),
				Flags: uint32(in[3] % 4), BufAlloc: uint32(binary.LittleEndian.Uint16(in[4:])),
				FwdCnt: uint32(binary.LittleEndian.Uint16(in[6:]))}
			g.send(h, in[9:9+n])
			in = in[9+n:]
			g.poll()
			g.backlog = g.backlog[:0]
		}
		if g.tr.Status()&virtio.StatusDeviceNeedsReset != 0 {
			t.Fatal("device broken by well-formed rings")
		}
	})
}
