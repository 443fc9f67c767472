package vsock_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/vsock"
)

const guestCID = 3

// guest is a minimal guest vsock driver on top of the test virtio driver.
type guest struct {
	t          testing.TB
	drv        *vt.Driver
	tr         *virtio.Transport
	dev        *vsock.Device
	path       string
	rx, tx, ev *vt.Queue
	backlog    []pkt
	// fwd is the guest's fwd_cnt per guest port: bytes it consumed.
	fwd map[uint32]uint32
}

type pkt struct {
	vsock.Hdr
	data []byte
}

func newGuest(t testing.TB) *guest {
	t.Helper()
	path := filepath.Join(t.TempDir(), "v.sock")
	dev, err := vsock.New(vsock.Config{GuestCID: guestCID, UDSPath: path})
	if err != nil {
		t.Fatal(err)
	}
	g := &guest{t: t, dev: dev, path: path, fwd: map[uint32]uint32{}}
	g.drv = vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		g.tr = virtio.NewTransport(dev, mem, irq, virtio.Options{})
		return g.tr
	})
	t.Cleanup(func() { g.tr.Reset(); dev.Close() })
	if cid := binary.LittleEndian.Uint64(g.drv.ReadConfig(0, 8)); cid != guestCID {
		t.Fatalf("config cid %d", cid)
	}
	if err := g.drv.Init(^uint64(0), 3, 128); err != nil {
		t.Fatal(err)
	}
	g.rx, g.tx, g.ev = g.drv.Queues[0], g.drv.Queues[1], g.drv.Queues[2]
	for i := 0; i < 64; i++ {
		g.rx.Add(vt.W(vsock.HdrSize + 4096))
	}
	g.rx.Kick()
	for i := 0; i < 4; i++ {
		g.ev.Add(vt.W(4))
	}
	g.ev.Kick()
	return g
}

func encode(h vsock.Hdr) []byte {
	b := make([]byte, vsock.HdrSize)
	h.Encode(b)
	return b
}

// send puts one packet on the tx queue.
func (g *guest) send(h vsock.Hdr, payload []byte) {
	g.t.Helper()
	h.SrcCID, h.DstCID, h.Type, h.Len = guestCID, vsock.HostCID, vsock.TypeStream, uint32(len(payload))
	if h.FwdCnt == 0 {
		h.FwdCnt = g.fwd[h.SrcPort] // like a real guest, every packet carries its fwd_cnt
	}
	segs := []vt.Seg{vt.R(encode(h))}
	if len(payload) > 0 {
		segs = append(segs, vt.R(payload))
	}
	if _, err := g.tx.Do(segs...); err != nil {
		g.t.Fatal(err)
	}
}

// poll collects rx packets and re-posts their buffers.
func (g *guest) poll() {
	us := g.rx.Collect()
	for _, u := range us {
		b := u.Data()
		if len(b) < vsock.HdrSize {
			g.t.Errorf("short rx packet (%d bytes)", len(b))
			continue
		}
		var p pkt
		p.Decode(b)
		p.data = append([]byte(nil), b[vsock.HdrSize:]...)
		if int(p.Len) != len(p.data) {
			g.t.Errorf("rx len field %d, payload %d", p.Len, len(p.data))
		}
		if p.SrcCID != vsock.HostCID || p.DstCID != guestCID || p.Type != vsock.TypeStream {
			g.t.Errorf("rx header %+v", p.Hdr)
		}
		g.backlog = append(g.backlog, p)
		g.rx.Add(vt.W(vsock.HdrSize + 4096))
	}
	if len(us) > 0 {
		g.rx.Kick()
	}
}

// expect waits for a packet matching f (others stay in the backlog).
func (g *guest) expect(what string, f func(p pkt) bool) pkt {
	g.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		g.poll()
		for i, p := range g.backlog {
			if f(p) {
				g.backlog = append(g.backlog[:i], g.backlog[i+1:]...)
				return p
			}
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("timed out waiting for %s; backlog %+v", what, g.backlog)
		}
		time.Sleep(time.Millisecond)
	}
}

func op(o uint16, port uint32) func(pkt) bool {
	return func(p pkt) bool { return p.Op == o && p.DstPort == port }
}

// hostConnect dials the device's socket and sends CONNECT port.
func hostConnect(t testing.TB, g *guest, port uint32) (*net.UnixConn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: g.path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	fmt.Fprintf(c, "CONNECT %d\n", port)
	return c, bufio.NewReader(c)
}

// recvStream receives n bytes on (guest port gp), granting bufAlloc
// credit and checking the device never exceeds it.
func (g *guest) recvStream(gp, hp uint32, n int, bufAlloc uint32) []byte {
	g.t.Helper()
	var got []byte
	var acked uint32
	for len(got) < n {
		p := g.expect("RW", func(p pkt) bool { return p.DstPort == gp && (p.Op == vsock.OpRW || p.Op == vsock.OpShutdown) })
		if p.Op != vsock.OpRW {
			g.t.Fatalf("got op %d after %d bytes", p.Op, len(got))
		}
		got = append(got, p.data...)
		if uint32(len(got))-acked > bufAlloc {
			g.t.Fatalf("device sent %d bytes beyond the guest's %d credit", uint32(len(got))-acked, bufAlloc)
		}
		if uint32(len(got))-acked >= bufAlloc/2 {
			acked = uint32(len(got))
			g.fwd[gp] = acked
			g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpCreditUpdate, BufAlloc: bufAlloc, FwdCnt: acked}, nil)
		}
	}
	return got
}

// sendStream sends data on (gp, hp) within the host's advertised credit.
func (g *guest) sendStream(gp, hp uint32, data []byte, bufAlloc uint32, peer *pkt) {
	g.t.Helper()
	var sent uint32
	peerAlloc, peerFwd := peer.BufAlloc, peer.FwdCnt
	for len(data) > 0 {
		credit := peerAlloc - (sent - peerFwd)
		if credit == 0 {
			p := g.expect("credit", func(p pkt) bool {
				return p.DstPort == gp && (p.Op == vsock.OpCreditUpdate || p.Op == vsock.OpRW)
			})
			if p.Op == vsock.OpRW {
				g.t.Fatalf("unexpected data while sending")
			}
			peerAlloc, peerFwd = p.BufAlloc, p.FwdCnt
			continue
		}
		n := min(int(credit), 4096, len(data))
		g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpRW, BufAlloc: bufAlloc}, data[:n])
		data = data[n:]
		sent += uint32(n)
	}
}

func random(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

func TestHostToGuestStreamWithCredit(t *testing.T) {
	g := newGuest(t)
	const gp = 1234
	hc, br := hostConnect(t, g, gp)
	req := g.expect("REQUEST", op(vsock.OpRequest, gp))
	if req.BufAlloc != vsock.TxBufSize {
		t.Errorf("REQUEST buf_alloc %d", req.BufAlloc)
	}
	hp := req.SrcPort
	const guestBuf = 32 << 10
	g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpResponse, BufAlloc: guestBuf}, nil)
	line, err := br.ReadString('\n')
	if err != nil || line != fmt.Sprintf("OK %d\n", hp) {
		t.Fatalf("handshake reply %q %v", line, err)
	}
	// Host -> guest, 1 MiB through a 32 KiB guest buffer.
	want := random(1 << 20)
	go hc.Write(want)
	if got := g.recvStream(gp, hp, len(want), guestBuf); !bytes.Equal(got, want) {
		t.Fatalf("guest received %d bytes, differing", len(got))
	}
	// Guest -> host, 1 MiB within the host's credit.
	back := random(1 << 20)
	done := make(chan []byte)
	go func() {
		b := make([]byte, len(back))
		io.ReadFull(br, b)
		done <- b
	}()
	g.sendStream(gp, hp, back, guestBuf, &req)
	if got := <-done; !bytes.Equal(got, back) {
		t.Fatalf("host received different bytes")
	}
	// Host half-closes: the guest gets SHUTDOWN(SEND). The guest closes:
	// SHUTDOWN(both) is answered with RST and the host sees EOF.
	hc.CloseWrite()
	sh := g.expect("SHUTDOWN", op(vsock.OpShutdown, gp))
	if sh.Flags != vsock.ShutdownSend {
		t.Errorf("shutdown flags %d", sh.Flags)
	}
	g.send(vsock.Hdr{SrcPort: gp, DstPort: hp, Op: vsock.OpShutdown, Flags: vsock.ShutdownRcv | vsock.ShutdownSend}, nil)
	g.expect("RST", op(vsock.OpRST, gp))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("host read after close: %v", err)
	}
}

func TestGuestToHost(t *testing.T) {
	g := newGuest(t)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: g.path + "_5000", Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const gp = 40001
	g.send(vsock.Hdr{SrcPort: gp, DstPort: 5000, Op: vsock.OpRequest, BufAlloc: 64 << 10}, nil)
	hc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	resp := g.expect("RESPONSE", op(vsock.OpResponse, gp))
	if resp.SrcPort != 5000 || resp.BufAlloc != vsock.TxBufSize {
		t.Errorf("RESPONSE %+v", resp.Hdr)
	}
	msg := random(600 << 10)
	done := make(chan []byte)
	go func() {
		b := make([]byte, len(msg))
		io.ReadFull(hc, b)
		done <- b
	}()
	g.sendStream(gp, 5000, msg, 64<<10, &resp)
	if got := <-done; !bytes.Equal(got, msg) {
		t.Fatalf("host got different bytes")
	}
	reply := random(300 << 10)
	go hc.Write(reply)
	if got := g.recvStream(gp, 5000, len(reply), 64<<10); !bytes.Equal(got, reply) {
		t.Fatalf("guest got different bytes")
	}
	// Guest RST: the host connection ends.
	g.send(vsock.Hdr{SrcPort: gp, DstPort: 5000, Op: vsock.OpRST}, nil)
	hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := hc.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("host read after guest RST: %v", err)
	}
}

func TestRefusals(t *testing.T) {
	g := newGuest(t)
	// No listener on the host port: RST.
	g.send(vsock.Hdr{SrcPort: 7, DstPort: 9999, Op: vsock.OpRequest, BufAlloc: 4096}, nil)
	g.expect("RST for unbound port", op(vsock.OpRST, 7))
	// Data on an unknown connection: RST.
	g.send(vsock.Hdr{SrcPort: 8, DstPort: 1, Op: vsock.OpRW}, []byte("x"))
	g.expect("RST for unknown conn", op(vsock.OpRST, 8))
	// Guest refuses a host connect: the host connection is closed.
	hc, br := hostConnect(t, g, 77)
	req := g.expect("REQUEST", op(vsock.OpRequest, 77))
	g.send(vsock.Hdr{SrcPort: 77, DstPort: req.SrcPort, Op: vsock.OpRST}, nil)
	if _, err := br.ReadString('\n'); err == nil {
		t.Errorf("host got a reply after the guest refused")
	}
	hc.Close()
	// Bad CONNECT line.
	c, err := net.Dial("unix", g.path)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintf(c, "HELLO\n")
	l, _ := bufio.NewReader(c).ReadString('\n')
	if !strings.HasPrefix(l, "ERR") {
		t.Errorf("bad CONNECT answered %q", l)
	}
	c.Close()
}

func TestGuestOverrunningCreditIsReset(t *testing.T) {
	g := newGuest(t)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: g.path + "_6000", Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.send(vsock.Hdr{SrcPort: 50, DstPort: 6000, Op: vsock.OpRequest, BufAlloc: 4096}, nil)
	hc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	g.expect("RESPONSE", op(vsock.OpResponse, 50))
	// The host does not read; the guest ignores credit.
	chunk := random(32 << 10)
	for i := 0; i < vsock.TxBufSize/len(chunk)+20; i++ {
		g.send(vsock.Hdr{SrcPort: 50, DstPort: 6000, Op: vsock.OpRW, BufAlloc: 4096}, chunk)
		g.poll()
		for _, p := range g.backlog {
			if p.Op == vsock.OpRST && p.DstPort == 50 {
				return
			}
		}
	}
	g.expect("RST after overrun", op(vsock.OpRST, 50))
}

func TestTransportResetOnRestore(t *testing.T) {
	g := newGuest(t)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: g.path + "_5001", Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	g.send(vsock.Hdr{SrcPort: 60, DstPort: 5001, Op: vsock.OpRequest, BufAlloc: 4096}, nil)
	hc, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	defer hc.Close()
	g.expect("RESPONSE", op(vsock.OpResponse, 60))
	st, err := g.tr.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	// Restore in place: the open connection is closed on the host side
	// and the guest is told through the event queue.
	if err := g.tr.RestoreState(st); err != nil {
		t.Fatal(err)
	}
	hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := hc.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("host conn after restore: %v", err)
	}
	ev, err := g.ev.Wait(1, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if ev[0].Len != 4 || binary.LittleEndian.Uint32(ev[0].Data()) != vsock.EventTransportReset {
		t.Errorf("event %+v", ev[0])
	}
	// The restored device serves new connections.
	g.send(vsock.Hdr{SrcPort: 61, DstPort: 5001, Op: vsock.OpRequest, BufAlloc: 4096}, nil)
	hc2, err := ln.AcceptUnix()
	if err != nil {
		t.Fatal(err)
	}
	hc2.Close()
	g.expect("RESPONSE after restore", op(vsock.OpResponse, 61))
}

func TestPauseHoldsDelivery(t *testing.T) {
	g := newGuest(t)
	const gp = 900
	hc, br := hostConnect(t, g, gp)
	req := g.expect("REQUEST", op(vsock.OpRequest, gp))
	g.send(vsock.Hdr{SrcPort: gp, DstPort: req.SrcPort, Op: vsock.OpResponse, BufAlloc: 64 << 10}, nil)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	g.tr.Pause()
	before := g.rx.UsedIdx()
	hc.Write([]byte("while paused"))
	time.Sleep(50 * time.Millisecond)
	if g.rx.UsedIdx() != before {
		t.Fatalf("device wrote to guest memory while paused")
	}
	g.tr.Resume()
	p := g.expect("RW after resume", op(vsock.OpRW, gp))
	if string(p.data) != "while paused" {
		t.Errorf("got %q", p.data)
	}
}

func TestCorruptRxRingFlagsNeedsReset(t *testing.T) {
	g := newGuest(t)
	// The device finds the corrupt ring while delivering the REQUEST from
	// its pump goroutine, not on a guest notification.
	g.rx.SetAvailIdx(g.rx.UsedIdx() + 1000)
	hostConnect(t, g, 4242)
	deadline := time.Now().Add(5 * time.Second)
	for g.tr.Status()&virtio.StatusDeviceNeedsReset == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("corrupt rx ring not flagged (status %#x)", g.tr.Status())
		}
		time.Sleep(time.Millisecond)
	}
	if g.drv.Read32(virtio.RegInterruptStat)&virtio.IntConfigChange == 0 {
		t.Errorf("no config-change interrupt")
	}
}

func TestDriverResetClosesConnections(t *testing.T) {
	g := newGuest(t)
	const gp = 1300
	hc, br := hostConnect(t, g, gp)
	req := g.expect("REQUEST", op(vsock.OpRequest, gp))
	g.send(vsock.Hdr{SrcPort: gp, DstPort: req.SrcPort, Op: vsock.OpResponse, BufAlloc: 4096}, nil)
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	// The driver resets the device mid-connection: the host side closes.
	g.drv.SetStatus(0)
	hc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadByte(); err != io.EOF {
		t.Errorf("host conn after reset: %v", err)
	}
	// Re-initialised, the device takes new connections.
	if err := g.drv.Init(^uint64(0), 3, 128); err != nil {
		t.Fatal(err)
	}
	g.rx, g.tx, g.ev = g.drv.Queues[0], g.drv.Queues[1], g.drv.Queues[2]
	g.backlog = nil
	for i := 0; i < 8; i++ {
		g.rx.Add(vt.W(vsock.HdrSize + 4096))
	}
	g.rx.Kick()
	hostConnect(t, g, gp+1)
	g.expect("REQUEST after reset", op(vsock.OpRequest, gp+1))
}
