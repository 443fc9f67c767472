package vsock_test

import (
	"io"
	"net"
	"os"
	"syscall"
	"testing"

	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/vsock"
)

const benchChunk = 64 << 10

// BenchmarkStream measures stream throughput through the device between
// a host unix socket and the in-process guest driver (4 KiB rx buffers,
// like Linux; 64 KiB tx packets), against a plain unix socket pair in the
// same run.
func BenchmarkStream(b *testing.B) {
	b.Run("host-to-guest", func(b *testing.B) {
		g := newGuest(b)
		hc, br, gp, hp := benchConnect(b, g)
		_ = br
		const bufAlloc = 256 << 10
		g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpCreditUpdate, BufAlloc: bufAlloc}, nil)
		total := b.N * benchChunk
		b.SetBytes(benchChunk)
		b.ResetTimer()
		go func() {
			chunk := make([]byte, benchChunk)
			for i := 0; i < b.N; i++ {
				if _, err := hc.Write(chunk); err != nil {
					return
				}
			}
		}()
		got, acked := 0, 0
		for got < total {
			us := g.rx.Collect()
			if len(us) == 0 {
				<-g.drv.IRQ.C()
				continue
			}
			for _, u := range us {
				got += int(u.Len) - vsock.HdrSize
				g.rx.Add(vt.W(vsock.HdrSize + 4096))
			}
			g.rx.Kick()
			if got-acked >= bufAlloc/2 {
				acked = got
				g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpCreditUpdate, BufAlloc: bufAlloc, FwdCnt: uint32(acked)}, nil)
			}
		}
	})
	b.Run("guest-to-host", func(b *testing.B) {
		g := newGuest(b)
		hc, br, gp, hp := benchConnect(b, g)
		_ = hc
		done := make(chan struct{})
		total := b.N * benchChunk
		go func() {
			io.CopyN(io.Discard, br, int64(total))
			close(done)
		}()
		b.SetBytes(benchChunk)
		b.ResetTimer()
		chunk := make([]byte, benchChunk)
		var sent, peerFwd uint32
		for i := 0; i < b.N; i++ {
			for vsock.TxBufSize-(sent-peerFwd) < benchChunk {
				for _, u := range g.rx.Collect() {
					var h vsock.Hdr
					h.Decode(u.Data())
					peerFwd = h.FwdCnt
					g.rx.Add(vt.W(vsock.HdrSize + 4096))
				}
				g.rx.Kick()
				if vsock.TxBufSize-(sent-peerFwd) < benchChunk {
					<-g.drv.IRQ.C()
				}
			}
			g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpRW, BufAlloc: 256 << 10}, chunk)
			sent += benchChunk
		}
		<-done
	})
	b.Run("unix-socketpair", func(b *testing.B) {
		fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		if err != nil {
			b.Fatal(err)
		}
		a, _ := net.FileConn(fdFile(fds[0]))
		c, _ := net.FileConn(fdFile(fds[1]))
		defer a.Close()
		defer c.Close()
		total := b.N * benchChunk
		b.SetBytes(benchChunk)
		b.ResetTimer()
		go func() {
			chunk := make([]byte, benchChunk)
			for i := 0; i < b.N; i++ {
				a.Write(chunk)
			}
		}()
		io.CopyN(io.Discard, c, int64(total))
	})
}

func benchConnect(b *testing.B, g *guest) (*net.UnixConn, io.Reader, uint32, uint32) {
	const gp = 7000
	hc, br := hostConnect(b, g, gp)
	req := g.expect("REQUEST", op(vsock.OpRequest, gp))
	g.send(vsock.Hdr{SrcPort: gp, DstPort: req.SrcPort, Op: vsock.OpResponse, BufAlloc: 256 << 10}, nil)
	if _, err := br.ReadString('\n'); err != nil {
		b.Fatal(err)
	}
	return hc, br, gp, req.SrcPort
}

func fdFile(fd int) *os.File { return os.NewFile(uintptr(fd), "sock") }
