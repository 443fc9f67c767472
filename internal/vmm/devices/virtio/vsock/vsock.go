// Package vsock is virtio-vsock with an in-VMM backend bridged to host
// unix sockets, in the style of Firecracker's hybrid vsock:
//
//   - Host to guest: a host process connects to the unix socket at
//     Config.UDSPath and writes "CONNECT <port>\n". The device sends the
//     guest a REQUEST to <port> from a fresh host port; when the guest
//     accepts (RESPONSE) the host reads "OK <hostport>\n" and from then on
//     the unix stream carries the connection's bytes both ways.
//   - Guest to host: a guest connection to host CID 2 port P is bridged to
//     the unix socket "<UDSPath>_<P>" (a host process listens there).
//
// The device speaks the full stream protocol: REQUEST, RESPONSE, RW,
// SHUTDOWN, RST, CREDIT_UPDATE and CREDIT_REQUEST, with credit-based flow
// control both ways: it never sends the guest more than the guest's
// advertised buffer space, and advertises its own per-connection buffer
// (TxBufSize) so a guest that overruns it is reset. After RestoreState the
// device tells the guest VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event
// queue, so guest sockets from before the snapshot are closed cleanly.
//
// Threads: the tx queue is served on the notifying thread; one pump
// goroutine fills rx buffers; each connection has a reader (host to guest)
// and a writer (guest to host) goroutine. Lock order: tx Queue.mu, then
// Device.mu, then rx/event Queue.mu.
package vsock

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
)

// Protocol constants (virtio 1.2, 5.10).
const (
	HostCID = 2

	HdrSize = 44

	TypeStream = 1

	OpInvalid       = 0
	OpRequest       = 1
	OpResponse      = 2
	OpRST           = 3
	OpShutdown      = 4
	OpRW            = 5
	OpCreditUpdate  = 6
	OpCreditRequest = 7

	ShutdownRcv  = 1
	ShutdownSend = 2

	EventTransportReset = 0

	rxQ, txQ, evQ = 0, 1, 2

	// TxBufSize is the per-connection buffer advertised to the guest
	// (buf_alloc): bytes the guest may send before the host reads them.
	TxBufSize = 256 << 10
	// MaxPayload bounds one packet's payload in either direction.
	MaxPayload = 64 << 10
	// firstHostPort is where ports for host-initiated connections start.
	firstHostPort = 1 << 30
	// HandshakeTimeout bounds CONNECT line reading and the guest's answer.
	HandshakeTimeout = 10 * time.Second
)

// Hdr is struct virtio_vsock_hdr.
type Hdr struct {
	SrcCID, DstCID   uint64
	SrcPort, DstPort uint32
	Len              uint32
	Type, Op         uint16
	Flags            uint32
	BufAlloc, FwdCnt uint32
}

// Encode writes h into b (at least HdrSize bytes).
func (h *Hdr) Encode(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], h.SrcCID)
	binary.LittleEndian.PutUint64(b[8:], h.DstCID)
	binary.LittleEndian.PutUint32(b[16:], h.SrcPort)
	binary.LittleEndian.PutUint32(b[20:], h.DstPort)
	binary.LittleEndian.PutUint32(b[24:], h.Len)
	binary.LittleEndian.PutUint16(b[28:], h.Type)
	binary.LittleEndian.PutUint16(b[30:], h.Op)
	binary.LittleEndian.PutUint32(b[32:], h.Flags)
	binary.LittleEndian.PutUint32(b[36:], h.BufAlloc)
	binary.LittleEndian.PutUint32(b[40:], h.FwdCnt)
}

// Decode reads h from b (at least HdrSize bytes).
func (h *Hdr) Decode(b []byte) {
	h.SrcCID = binary.LittleEndian.Uint64(b[0:])
	h.DstCID = binary.LittleEndian.Uint64(b[8:])
	h.SrcPort = binary.LittleEndian.Uint32(b[16:])
	h.DstPort = binary.LittleEndian.Uint32(b[20:])
	h.Len = binary.LittleEndian.Uint32(b[24:])
	h.Type = binary.LittleEndian.Uint16(b[28:])
	h.Op = binary.LittleEndian.Uint16(b[30:])
	h.Flags = binary.LittleEndian.Uint32(b[32:])
	h.BufAlloc = binary.LittleEndian.Uint32(b[36:])
	h.FwdCnt = binary.LittleEndian.Uint32(b[40:])
}

// Config configures a vsock device.
type Config struct {
	GuestCID uint64
	// UDSPath is the host unix socket the device listens on; guest
	// connections to host port P go to UDSPath + "_" + P.
	UDSPath string
	Log     *slog.Logger
}

type key struct{ local, peer uint32 } // host port, guest port

const (
	stConnecting = iota
	stEstablished
)

type conn struct {
	key      key
	uc       *net.UnixConn
	state    int
	hostInit bool
	estab    chan struct{} // closed when the guest answers a host connect
	done     chan struct{} // closed when the connection is gone
	cond     *sync.Cond    // on Device.mu

	// host -> guest
	rxBuf        []byte
	rxCnt        uint32 // bytes taken from the host for the guest, total
	peerBufAlloc uint32
	peerFwdCnt   uint32
	inReady      bool
	eof          bool // host closed its side; SHUTDOWN after rxBuf drains
	peerShut     uint32

	// guest -> host
	txBuf         []byte
	txCnt         uint32 // bytes received from the guest, total
	fwdCnt        uint32 // bytes written to the host, total
	lastFwdSent   uint32
	creditPending bool
	closed        bool
}

// credit is how many more bytes the guest can take. Called with mu held.
func (c *conn) credit() uint32 {
	inflight := c.rxCnt - c.peerFwdCnt
	if inflight >= c.peerBufAlloc {
		return 0
	}
	return c.peerBufAlloc - inflight
}

// Device is a virtio-vsock device.
type Device struct {
	cfg Config
	log *slog.Logger
	ln  *net.UnixListener

	kick chan struct{}

	mu sync.Mutex
	// Guarded by mu.
	act       *virtio.Active
	stop      chan struct{}
	conns     map[key]*conn
	ctrl      []Hdr
	ready     []*conn
	nextPort  uint32
	evPending bool
	closed    bool
	handshake map[*net.UnixConn]bool // host conns still sending CONNECT

	wg     sync.WaitGroup // connection goroutines
	pumpWG sync.WaitGroup
}

// New creates the device and starts listening on cfg.UDSPath.
func New(cfg Config) (*Device, error) {
	if cfg.GuestCID < 3 || cfg.GuestCID > 0xffffffff {
		return nil, fmt.Errorf("vsock: bad guest CID %d", cfg.GuestCID)
	}
	// Host ports start at a random point: clones restored from one
	// snapshot must not reuse the ports the parent's guest may still
	// hold (lingering sockets refuse a new connection with the same
	// tuple).
	d := &Device{cfg: cfg, log: cfg.Log, kick: make(chan struct{}, 1), conns: map[key]*conn{},
		nextPort: firstHostPort + rand.Uint32N(1<<29), handshake: map[*net.UnixConn]bool{}}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	if cfg.UDSPath != "" {
		os.Remove(cfg.UDSPath)
		ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.UDSPath, Net: "unix"})
		if err != nil {
			return nil, fmt.Errorf("vsock: %w", err)
		}
		d.ln = ln
		go d.acceptLoop()
	}
	return d, nil
}

// Close stops the listener and drops every connection.
func (d *Device) Close() error {
	d.mu.Lock()
	d.closed = true
	for uc := range d.handshake {
		uc.Close()
	}
	d.mu.Unlock()
	if d.ln != nil {
		d.ln.Close()
	}
	d.Reset()
	return nil
}

func (d *Device) DeviceID() uint32     { return virtio.IDVsock }
func (d *Device) Features() uint64     { return 0 }
func (d *Device) QueueSizes() []uint16 { return []uint16{256, 256, 256} }

func (d *Device) ReadConfig(off uint64, p []byte) {
	var c [8]byte
	binary.LittleEndian.PutUint64(c[:], d.cfg.GuestCID)
	if off < 8 {
		copy(p, c[off:])
	}
}

func (d *Device) WriteConfig(uint64, []byte) {}

// Activate starts the rx pump; after a restore it queues the transport
// reset event.
func (d *Device) Activate(a *virtio.Active) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.act = a
	d.stop = make(chan struct{})
	d.evPending = a.Restored
	d.pumpWG.Add(1)
	go d.pump(a, d.stop)
	d.poke()
	return nil
}

// Reset drops every connection (host sockets are closed) and stops the pump.
func (d *Device) Reset() {
	d.mu.Lock()
	for _, c := range d.conns {
		d.kill(c, false)
	}
	d.ctrl, d.ready = nil, nil
	if d.stop != nil {
		close(d.stop)
		d.stop = nil
	}
	d.act = nil
	d.mu.Unlock()
	d.pumpWG.Wait()
	d.wg.Wait()
}

func (d *Device) poke() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// QueueNotify serves the tx queue on the caller; rx and event
// notifications wake the pump.
func (d *Device) QueueNotify(q int) {
	d.mu.Lock()
	a := d.act
	d.mu.Unlock()
	if a == nil {
		return
	}
	if q != txQ {
		d.poke()
		return
	}
	a.Queues[txQ].Drain(func(c *virtio.Chain) uint32 {
		var hb [HdrSize]byte
		if c.ReadAt(hb[:], 0) < HdrSize {
			return 0
		}
		var h Hdr
		h.Decode(hb[:])
		if int(h.Len) > c.ReadableLen()-HdrSize || h.Len > MaxPayload {
			d.mu.Lock()
			d.rstReply(&h)
			d.mu.Unlock()
			return 0
		}
		d.mu.Lock()
		d.handleTx(&h, c)
		d.mu.Unlock()
		return 0
	})
}

// queueCtrl adds a control packet for the guest. Called with mu held.
func (d *Device) queueCtrl(h Hdr) {
	if len(d.ctrl) > 4096 {
		return // a guest that never posts rx buffers cannot grow this
	}
	d.ctrl = append(d.ctrl, h)
	d.poke()
}

func (d *Device) hdrTo(c *conn, op uint16) Hdr {
	return Hdr{SrcCID: HostCID, DstCID: d.cfg.GuestCID, SrcPort: c.key.local, DstPort: c.key.peer,
		Type: TypeStream, Op: op}
}

// rstReply answers a packet with RST. Called with mu held.
func (d *Device) rstReply(h *Hdr) {
	if h.Op == OpRST || h.SrcCID != d.cfg.GuestCID {
		return
	}
	d.queueCtrl(Hdr{SrcCID: HostCID, DstCID: d.cfg.GuestCID, SrcPort: h.DstPort, DstPort: h.SrcPort,
		Type: TypeStream, Op: OpRST})
}

// kill ends a connection, optionally telling the guest. Called with mu held.
func (d *Device) kill(c *conn, rst bool) {
	if c.closed {
		return
	}
	c.closed = true
	delete(d.conns, c.key)
	if rst {
		d.queueCtrl(d.hdrTo(c, OpRST))
	}
	if c.uc != nil {
		c.uc.Close()
	}
	close(c.done)
	c.cond.Broadcast()
}

// handleTx processes one guest packet. Called with mu held.
func (d *Device) handleTx(h *Hdr, ch *virtio.Chain) {
	if d.act == nil {
		return // reset while this notification was being served
	}
	if h.SrcCID != d.cfg.GuestCID || h.DstCID != HostCID {
		return // not addressed to us: drop
	}
	if h.Type != TypeStream {
		d.rstReply(h)
		return
	}
	k := key{local: h.DstPort, peer: h.SrcPort}
	c := d.conns[k]
	if h.Op == OpRequest {
		if c != nil || d.cfg.UDSPath == "" || len(d.conns) >= 1024 {
			d.rstReply(h)
			return
		}
		c = d.newConn(k, false)
		c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
		d.wg.Add(1)
		go d.dialHost(c)
		return
	}
	if c == nil {
		d.rstReply(h)
		return
	}
	c.peerBufAlloc, c.peerFwdCnt = h.BufAlloc, h.FwdCnt
	c.cond.Broadcast()
	switch h.Op {
	case OpResponse:
		if !c.hostInit || c.state != stConnecting {
			d.kill(c, true)
			return
		}
		c.state = stEstablished
		close(c.estab)
	case OpRW:
		if c.state != stEstablished || c.peerShut&ShutdownSend != 0 {
			d.kill(c, true)
			return
		}
		if len(c.txBuf)+int(h.Len) > TxBufSize || int(c.txCnt-c.fwdCnt)+int(h.Len) > TxBufSize {
			d.log.Debug("vsock: guest overran its credit", "port", c.key.local)
			d.kill(c, true)
			return
		}
		if h.Len > 0 {
			start := len(c.txBuf)
			c.txBuf = slices.Grow(c.txBuf, int(h.Len))[:start+int(h.Len)]
			ch.ReadAt(c.txBuf[start:], HdrSize)
			c.txCnt += h.Len
		}
	case OpCreditUpdate:
	case OpCreditRequest:
		d.creditUpdate(c)
	case OpShutdown:
		c.peerShut |= h.Flags & (ShutdownRcv | ShutdownSend)
		if c.peerShut&ShutdownRcv != 0 {
			c.rxBuf = nil
		}
	case OpRST:
		d.kill(c, false)
	default:
		d.kill(c, true)
	}
}

func (d *Device) creditUpdate(c *conn) {
	if !c.creditPending {
		c.creditPending = true
		h := d.hdrTo(c, OpCreditUpdate)
		d.queueCtrl(h)
	}
}

func (d *Device) newConn(k key, hostInit bool) *conn {
	c := &conn{key: k, hostInit: hostInit, estab: make(chan struct{}), done: make(chan struct{}),
		cond: sync.NewCond(&d.mu)}
	d.conns[k] = c
	return c
}

// dialHost bridges a guest-initiated connection to <UDSPath>_<port>.
func (d *Device) dialHost(c *conn) {
	defer d.wg.Done()
	path := d.cfg.UDSPath + "_" + strconv.FormatUint(uint64(c.key.local), 10)
	nc, err := (&net.Dialer{Timeout: 2 * time.Second}).Dial("unix", path)
	d.mu.Lock()
	defer d.mu.Unlock()
	if err != nil {
		d.log.Debug("vsock: guest connect to host port failed", "port", c.key.local, "err", err)
		d.kill(c, true)
		return
	}
	if c.closed {
		nc.Close()
		return
	}
	c.uc = nc.(*net.UnixConn)
	c.state = stEstablished
	d.queueCtrl(d.hdrTo(c, OpResponse))
	d.startIO(c)
}

// startIO starts the connection's reader and writer. Called with mu held.
func (d *Device) startIO(c *conn) {
	d.wg.Add(2)
	go d.reader(c)
	go d.writer(c)
}

func (d *Device) acceptLoop() {
	for {
		uc, err := d.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go d.hostConnect(uc)
	}
}

// readLine reads "CONNECT <port>\n" byte by byte so no payload is consumed.
func readLine(r io.Reader) (string, error) {
	var b [1]byte
	var line []byte
	for len(line) < 64 {
		if _, err := io.ReadFull(r, b[:]); err != nil {
			return "", err
		}
		if b[0] == '\n' {
			return string(line), nil
		}
		line = append(line, b[0])
	}
	return "", errors.New("line too long")
}

// ParseConnect parses a host's "CONNECT <port>" line (without newline).
func ParseConnect(line string) (uint32, error) {
	f := strings.Fields(line)
	if len(f) != 2 || f[0] != "CONNECT" {
		return 0, fmt.Errorf("vsock: expected \"CONNECT <port>\", got %q", line)
	}
	p, err := strconv.ParseUint(f[1], 10, 32)
	if err != nil {
		return 0, fmt.Errorf("vsock: bad port %q", f[1])
	}
	return uint32(p), nil
}

// hostConnect runs the host side of a CONNECT handshake.
func (d *Device) hostConnect(uc *net.UnixConn) {
	d.mu.Lock()
	if d.closed {
		d.mu.Unlock()
		uc.Close()
		return
	}
	d.handshake[uc] = true
	d.mu.Unlock()
	uc.SetDeadline(time.Now().Add(HandshakeTimeout))
	line, err := readLine(uc)
	d.mu.Lock()
	delete(d.handshake, uc)
	d.mu.Unlock()
	if err != nil {
		uc.Close()
		return
	}
	port, err := ParseConnect(line)
	if err != nil {
		fmt.Fprintf(uc, "ERR %v\n", err)
		uc.Close()
		return
	}
	d.mu.Lock()
	if d.act == nil || d.closed || len(d.conns) >= 1024 {
		d.mu.Unlock()
		uc.Write([]byte("ERR device not ready\n"))
		uc.Close()
		return
	}
	k := key{peer: port}
	for {
		k.local = d.nextPort
		d.nextPort++
		if d.nextPort == 0 {
			d.nextPort = firstHostPort
		}
		if d.conns[k] == nil {
			break
		}
	}
	c := d.newConn(k, true)
	c.uc = uc
	d.queueCtrl(Hdr{SrcCID: HostCID, DstCID: d.cfg.GuestCID, SrcPort: k.local, DstPort: k.peer,
		Type: TypeStream, Op: OpRequest, BufAlloc: TxBufSize})
	d.mu.Unlock()

	timer := time.NewTimer(HandshakeTimeout)
	defer timer.Stop()
	select {
	case <-c.estab:
	case <-c.done:
		return // the guest refused (RST) or the device reset
	case <-timer.C:
		d.mu.Lock()
		d.kill(c, true)
		d.mu.Unlock()
		return
	}
	uc.SetDeadline(time.Time{})
	if _, err := fmt.Fprintf(uc, "OK %d\n", k.local); err != nil {
		d.mu.Lock()
		d.kill(c, true)
		d.mu.Unlock()
		return
	}
	d.mu.Lock()
	if !c.closed {
		d.startIO(c)
	}
	d.mu.Unlock()
}

// reader moves host bytes towards the guest, within the guest's credit.
func (d *Device) reader(c *conn) {
	defer d.wg.Done()
	buf := make([]byte, MaxPayload)
	for {
		d.mu.Lock()
		for !c.closed && c.peerShut&ShutdownRcv == 0 && (c.credit() == 0 || len(c.rxBuf) >= MaxPayload) {
			c.cond.Wait()
		}
		if c.closed || c.peerShut&ShutdownRcv != 0 {
			d.mu.Unlock()
			return
		}
		n := min(int(c.credit()), len(buf))
		d.mu.Unlock()
		k, err := c.uc.Read(buf[:n])
		d.mu.Lock()
		if c.closed {
			d.mu.Unlock()
			return
		}
		if k > 0 {
			c.rxBuf = append(c.rxBuf, buf[:k]...)
			c.rxCnt += uint32(k)
			d.markReady(c)
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				c.eof = true
				d.markReady(c)
			} else {
				d.kill(c, true)
			}
			d.mu.Unlock()
			return
		}
		d.mu.Unlock()
	}
}

func (d *Device) markReady(c *conn) {
	if !c.inReady {
		c.inReady = true
		d.ready = append(d.ready, c)
	}
	d.poke()
}

// writer moves guest bytes to the host and returns credit to the guest.
// When the guest shuts down its sending side the host gets a half-close;
// when it shuts down both, the connection ends with RST (which is what a
// Linux guest waits for on close).
func (d *Device) writer(c *conn) {
	defer d.wg.Done()
	var spare []byte
	halfClosed := false
	for {
		d.mu.Lock()
		for !c.closed && len(c.txBuf) == 0 && c.peerShut != ShutdownRcv|ShutdownSend &&
			(c.peerShut&ShutdownSend == 0 || halfClosed) {
			c.cond.Wait()
		}
		if c.closed {
			d.mu.Unlock()
			return
		}
		if len(c.txBuf) == 0 {
			if c.peerShut == ShutdownRcv|ShutdownSend {
				d.kill(c, true)
				d.mu.Unlock()
				return
			}
			c.uc.CloseWrite()
			halfClosed = true
			d.mu.Unlock()
			continue
		}
		data := c.txBuf
		c.txBuf = spare[:0]
		d.mu.Unlock()
		_, err := c.uc.Write(data)
		d.mu.Lock()
		if err != nil {
			d.kill(c, true)
			d.mu.Unlock()
			return
		}
		c.fwdCnt += uint32(len(data))
		spare = data
		// Tell the guest about freed space once its view of our buffer
		// is less than half free.
		if c.txCnt-c.lastFwdSent > TxBufSize/2 {
			d.creditUpdate(c)
		}
		d.mu.Unlock()
	}
}

// pump fills rx buffers with control packets, data and events.
func (d *Device) pump(a *virtio.Active, stop chan struct{}) {
	defer d.pumpWG.Done()
	rx := a.Queues[rxQ]
	for {
		select {
		case <-stop:
			return
		case <-d.kick:
		case <-rx.Notified():
		case <-a.Queues[evQ].Notified():
		}
		d.mu.Lock()
		if d.act != a {
			d.mu.Unlock()
			return
		}
		d.sendEvent(a)
		d.deliver(rx)
		d.mu.Unlock()
		rx.Interrupt()
	}
}

// sendEvent posts a pending transport reset. Called with mu held.
func (d *Device) sendEvent(a *virtio.Active) {
	if !d.evPending {
		return
	}
	q := a.Queues[evQ]
	for {
		c, err := q.Pop()
		if c == nil && err == nil {
			return // no buffer yet: retried on the next event notify
		}
		if err != nil {
			continue
		}
		var ev [4]byte
		binary.LittleEndian.PutUint32(ev[:], EventTransportReset)
		if c.WriteAt(ev[:], 0) == 4 {
			q.Push(c, 4)
			d.evPending = false
			return
		}
		q.Push(c, 0)
	}
}

// deliver moves queued packets into rx buffers. Called with mu held.
func (d *Device) deliver(rx *virtio.Queue) {
	for {
		// Drop connections with nothing left to send from the front.
		for len(d.ready) > 0 {
			c := d.ready[0]
			if !c.closed && (len(c.rxBuf) > 0 || c.eof) {
				break
			}
			c.inReady = false
			d.ready = d.ready[1:]
		}
		if len(d.ctrl) == 0 && len(d.ready) == 0 {
			return
		}
		ch, err := rx.Pop()
		if err != nil {
			if errors.Is(err, virtio.ErrQueueBroken) {
				return
			}
			continue // a malformed chain, already returned empty
		}
		if ch == nil {
			return // no rx buffers: the guest's next rx notify resumes us
		}
		room := ch.WritableLen()
		if room < HdrSize {
			rx.Put(ch, 0)
			continue
		}
		var pkt [HdrSize]byte
		if len(d.ctrl) > 0 {
			h := d.ctrl[0]
			d.ctrl = d.ctrl[1:]
			if c := d.conns[key{h.SrcPort, h.DstPort}]; c != nil && h.Op != OpRST {
				h.BufAlloc, h.FwdCnt = TxBufSize, c.fwdCnt
				c.lastFwdSent = c.fwdCnt
				if h.Op == OpCreditUpdate {
					c.creditPending = false
				}
			}
			h.Encode(pkt[:])
			ch.WriteAt(pkt[:], 0)
			rx.Put(ch, HdrSize)
			continue
		}
		c := d.ready[0]
		d.ready = d.ready[1:]
		h := d.hdrTo(c, OpRW)
		h.BufAlloc, h.FwdCnt = TxBufSize, c.fwdCnt
		c.lastFwdSent = c.fwdCnt
		if n := min(len(c.rxBuf), room-HdrSize, MaxPayload); n > 0 {
			h.Len = uint32(n)
			ch.WriteAt(c.rxBuf[:n], HdrSize)
			c.rxBuf = c.rxBuf[n:]
			if len(c.rxBuf) == 0 {
				c.rxBuf = nil
			}
			c.cond.Broadcast()
		} else {
			// Host EOF, after all its data: SHUTDOWN(SEND).
			h.Op, h.Flags = OpShutdown, ShutdownSend
			c.eof = false
		}
		h.Encode(pkt[:])
		ch.WriteAt(pkt[:], 0)
		rx.Put(ch, HdrSize+h.Len)
		if len(c.rxBuf) > 0 || c.eof {
			d.ready = append(d.ready, c)
		} else {
			c.inReady = false
		}
	}
}

type state struct {
	V        int    `json:"v"`
	GuestCID uint64 `json:"guest_cid"`
}

// SaveState records the guest CID. Connections are not saved: after a
// restore the guest is told to reset its transport.
func (d *Device) SaveState() ([]byte, error) {
	return json.Marshal(state{V: 1, GuestCID: d.cfg.GuestCID})
}

// RestoreState checks the CID; the transport then re-activates the device
// with Restored set, which queues VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.
func (d *Device) RestoreState(b []byte) error {
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("vsock state: %w", err)
	}
	if s.V != 1 {
		return fmt.Errorf("vsock state: unsupported version %d", s.V)
	}
	if s.GuestCID != d.cfg.GuestCID {
		return fmt.Errorf("vsock state: guest CID %d, device has %d", s.GuestCID, d.cfg.GuestCID)
	}
	return nil
}
