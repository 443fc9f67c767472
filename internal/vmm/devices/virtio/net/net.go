//go:build linux

// Package net is virtio-net on a tap file descriptor handed in by the
// node (opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR in the sandbox's
// network namespace). The tap's vnet header size is set to 12 bytes, the
// size of struct virtio_net_hdr_v1, so headers pass between guest and tap
// unchanged and checksum/TSO offloads need no translation.
//
// Transmit is served on the notifying thread with one writev per frame
// straight from guest memory. Receive runs a reader goroutine that reads
// a frame from the tap and waits for an rx buffer when the guest has none
// posted (the kernel queues further frames meanwhile).
package net

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
)

// Feature bits.
const (
	FCsum      = 1 << 0
	FGuestCsum = 1 << 1
	FMAC       = 1 << 5
	FMrgRxBuf  = 1 << 15
	FGuestTSO4 = 1 << 7
	FGuestTSO6 = 1 << 8
	FHostTSO4  = 1 << 11
	FHostTSO6  = 1 << 12

	// HdrSize is sizeof(struct virtio_net_hdr_v1).
	HdrSize = 12
	// maxFrame bounds one frame with its header (64 KiB GSO + header).
	maxFrame = 65536 + HdrSize + 64

	rxQ, txQ  = 0, 1
	queueSize = 256
)

// tun ioctls and offload flags.
const (
	tunSetOffload   = 0x400454d0
	tunSetVnetHdrSz = 0x400454d8
	tunFCsum        = 0x01
	tunFTSO4        = 0x02
	tunFTSO6        = 0x04
)

// Config configures a net device.
type Config struct {
	// Tap is the tap file (see OpenTapFD). The device owns it from now on.
	Tap *os.File
	MAC net.HardwareAddr
	Log *slog.Logger
}

// Device is a virtio-net device.
type Device struct {
	tap  *os.File
	raw  syscallConn
	mac  [6]byte
	log  *slog.Logger
	a    atomic.Pointer[virtio.Active]
	txMu sync.Mutex

	mu   sync.Mutex
	stop chan struct{}
	wg   sync.WaitGroup

	// Counters.
	RxFrames, TxFrames, RxDropped, TxDropped atomic.Uint64
}

type syscallConn interface {
	Control(func(fd uintptr)) error
	Write(func(fd uintptr) bool) error
}

// OpenTapFD wraps a tap fd handed in by the node: it is made
// non-blocking so reads go through Go's poller and can be interrupted.
func OpenTapFD(fd int) (*os.File, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("net: tap fd %d: %w", fd, err)
	}
	return os.NewFile(uintptr(fd), "tap"), nil
}

// New creates the device and sets the tap's vnet header size.
func New(cfg Config) (*Device, error) {
	if cfg.Tap == nil {
		return nil, errors.New("net: no tap")
	}
	if len(cfg.MAC) != 6 {
		return nil, fmt.Errorf("net: bad MAC %v", cfg.MAC)
	}
	rc, err := cfg.Tap.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("net: %w", err)
	}
	d := &Device{tap: cfg.Tap, raw: rc, log: cfg.Log}
	if d.log == nil {
		d.log = slog.New(slog.DiscardHandler)
	}
	copy(d.mac[:], cfg.MAC)
	sz := int32(HdrSize)
	if err := d.ioctl(tunSetVnetHdrSz, uintptr(unsafe.Pointer(&sz))); err != nil {
		return nil, fmt.Errorf("net: TUNSETVNETHDRSZ (is the tap IFF_VNET_HDR?): %w", err)
	}
	return d, nil
}

func (d *Device) ioctl(req, arg uintptr) error {
	var errno unix.Errno
	err := d.raw.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, req, arg)
	})
	if err != nil {
		return err
	}
	if errno != 0 {
		return errno
	}
	return nil
}

// Close resets the device and closes the tap.
func (d *Device) Close() error {
	d.Reset()
	return d.tap.Close()
}

func (d *Device) DeviceID() uint32 { return virtio.IDNet }

func (d *Device) Features() uint64 {
	return FCsum | FGuestCsum | FMAC | FGuestTSO4 | FGuestTSO6 | FHostTSO4 | FHostTSO6 | FMrgRxBuf
}

func (d *Device) QueueSizes() []uint16 { return []uint16{queueSize, queueSize} }

func (d *Device) ReadConfig(off uint64, p []byte) {
	if off < 6 {
		copy(p, d.mac[off:])
	}
}

func (d *Device) WriteConfig(uint64, []byte) {}

// Activate turns on the tap offloads the guest accepted and starts the
// receive goroutine.
func (d *Device) Activate(a *virtio.Active) error {
	var off uintptr
	if a.Has(FGuestCsum) {
		off |= tunFCsum
		if a.Has(FGuestTSO4) {
			off |= tunFTSO4
		}
		if a.Has(FGuestTSO6) {
			off |= tunFTSO6
		}
	}
	if err := d.ioctl(tunSetOffload, off); err != nil {
		return fmt.Errorf("net: TUNSETOFFLOAD: %w", err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.a.Store(a)
	d.stop = make(chan struct{})
	d.tap.SetReadDeadline(time.Time{})
	d.wg.Add(1)
	go d.receive(a, d.stop)
	return nil
}

// Reset stops the receive goroutine.
func (d *Device) Reset() {
	d.mu.Lock()
	d.a.Store(nil)
	if d.stop != nil {
		close(d.stop)
		d.stop = nil
		d.tap.SetReadDeadline(time.Now()) // wakes a blocked Read
	}
	d.mu.Unlock()
	d.wg.Wait()
}

// QueueNotify transmits on tx notifications; rx notifications wake the
// receive goroutine through the queue's Notified channel.
func (d *Device) QueueNotify(q int) {
	a := d.a.Load()
	if a == nil || q != txQ {
		return
	}
	d.txMu.Lock()
	defer d.txMu.Unlock()
	iov := make([][]byte, 0, 8)
	a.Queues[txQ].Drain(func(c *virtio.Chain) uint32 {
		n := c.ReadableLen()
		if n < HdrSize+14 || n > maxFrame {
			d.TxDropped.Add(1)
			return 0
		}
		iov = iov[:0]
		for _, b := range c.Readable {
			iov = append(iov, b.Data)
		}
		var werr error
		err := d.raw.Write(func(fd uintptr) bool {
			_, werr = unix.Writev(int(fd), iov)
			return werr != unix.EAGAIN
		})
		if err != nil || werr != nil {
			d.TxDropped.Add(1)
		} else {
			d.TxFrames.Add(1)
		}
		return 0
	})
}

// receive reads frames from the tap and copies each into an rx chain.
func (d *Device) receive(a *virtio.Active, stop chan struct{}) {
	defer d.wg.Done()
	rx := a.Queues[rxQ]
	buf := make([]byte, maxFrame)
	for {
		n, err := d.tap.Read(buf)
		if err != nil {
			select {
			case <-stop:
				return
			default:
			}
			if errors.Is(err, os.ErrDeadlineExceeded) {
				continue
			}
			if errors.Is(err, os.ErrClosed) {
				return
			}
			d.log.Warn("net: tap read failed", "err", err)
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		if n < HdrSize {
			continue
		}
		if !d.put(a, rx, buf[:n], stop) {
			return
		}
	}
}

// put delivers one frame, waiting for buffers; false means stop. With
// VIRTIO_NET_F_MRG_RXBUF a frame may span several chains (num_buffers in
// the header says how many); without it, it must fit in one.
func (d *Device) put(a *virtio.Active, rx *virtio.Queue, frame []byte, stop chan struct{}) bool {
	mrg := a.Has(FMrgRxBuf)
	for {
		var chains []*virtio.Chain
		room := 0
		for room < len(frame) {
			c, err := rx.Pop()
			if err != nil {
				if errors.Is(err, virtio.ErrQueueBroken) {
					rx.Unpop(len(chains))
					d.RxDropped.Add(1)
					return d.wait(rx, stop)
				}
				continue // a malformed chain, already returned empty
			}
			if c == nil {
				break
			}
			chains = append(chains, c)
			room += c.WritableLen()
			if !mrg {
				break
			}
		}
		if mrg && room < len(frame) && len(chains) >= rx.Len() {
			// Even the whole ring would not hold this frame: drop it.
			rx.Unpop(len(chains))
			d.RxDropped.Add(1)
			return true
		}
		if len(chains) == 0 || (mrg && room < len(frame)) {
			// Not enough buffers: give back what we took and wait.
			rx.Unpop(len(chains))
			if !d.wait(rx, stop) {
				return false
			}
			continue
		}
		if room < len(frame) {
			rx.Push(chains[0], 0) // the guest posted a buffer too small: drop
			d.RxDropped.Add(1)
			return true
		}
		if mrg {
			binary.LittleEndian.PutUint16(frame[10:], uint16(len(chains)))
		}
		off := 0
		for _, c := range chains {
			n := c.WriteAt(frame[off:], 0)
			off += n
			rx.Put(c, uint32(n))
		}
		rx.Interrupt()
		d.RxFrames.Add(1)
		return true
	}
}

func (d *Device) wait(rx *virtio.Queue, stop chan struct{}) bool {
	select {
	case <-stop:
		return false
	case <-rx.Notified():
		return true
	}
}

type state struct {
	V   int    `json:"v"`
	MAC string `json:"mac"`
}

// SaveState records the MAC; frames in flight are not saved (the network
// may drop frames).
func (d *Device) SaveState() ([]byte, error) {
	return json.Marshal(state{V: 1, MAC: net.HardwareAddr(d.mac[:]).String()})
}

// RestoreState checks the version; the MAC in use stays the configured one.
func (d *Device) RestoreState(b []byte) error {
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("net state: %w", err)
	}
	if s.V != 1 {
		return fmt.Errorf("net state: unsupported version %d", s.V)
	}
	return nil
}
