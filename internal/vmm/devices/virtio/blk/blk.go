// Package blk is virtio-blk over a Disk: usually an Overlay (a read-only
// base image plus a per-sandbox sparse copy-on-write overlay file), or a
// read-only FileDisk when the sandbox has no overlay.
//
// Requests the guest gets wrong (short headers, lengths that are not
// whole sectors, sectors past the end, writes to a read-only disk) are
// answered with VIRTIO_BLK_S_IOERR; unknown types with UNSUPP.
package blk

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"sync/atomic"

	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
)

// Feature bits.
const (
	FSegMax  = 1 << 2
	FRO      = 1 << 5
	FBlkSize = 1 << 6
	FFlush   = 1 << 9
)

// Request types and status values.
const (
	TIn    = 0
	TOut   = 1
	TFlush = 4
	TGetID = 8

	SOK     = 0
	SIOErr  = 1
	SUnsupp = 2

	SectorSize = 512
	// IDLen is the length of the GET_ID serial.
	IDLen = 20
	// QueueSize is the request queue size.
	QueueSize = 256
)

// Device is a virtio block device.
type Device struct {
	*virtio.Server
	disk Disk
	id   string
	// counters
	Reads, Writes, Flushes, Errors atomic.Uint64
}

// New returns a virtio-blk device on disk, reporting id for GET_ID.
func New(disk Disk, id string) *Device {
	d := &Device{disk: disk, id: id}
	d.Server = virtio.NewServer(d.serve)
	return d
}

func (d *Device) DeviceID() uint32 { return virtio.IDBlock }

func (d *Device) Features() uint64 {
	f := uint64(FSegMax | FBlkSize | FFlush)
	if d.disk.ReadOnly() {
		f |= FRO
	}
	return f
}

func (d *Device) QueueSizes() []uint16 { return []uint16{QueueSize} }

// config is struct virtio_blk_config up to blk_size.
func (d *Device) config() []byte {
	c := make([]byte, 24)
	binary.LittleEndian.PutUint64(c[0:], uint64(d.disk.Size()/SectorSize))
	binary.LittleEndian.PutUint32(c[12:], QueueSize-2) // seg_max
	binary.LittleEndian.PutUint32(c[20:], SectorSize)  // blk_size
	return c
}

func (d *Device) ReadConfig(off uint64, p []byte) {
	c := d.config()
	if off < uint64(len(c)) {
		copy(p, c[off:])
	}
}

func (d *Device) WriteConfig(uint64, []byte) {}

// serve handles one request and returns the bytes written to the chain.
func (d *Device) serve(c *virtio.Chain) uint32 {
	wl := c.WritableLen()
	if wl < 1 {
		d.Errors.Add(1)
		return 0 // nowhere to put a status byte
	}
	dataIn := virtio.Slice(c.Writable, 0, wl-1)
	status := func(s byte, data int) uint32 {
		if s != SOK {
			d.Errors.Add(1)
		}
		c.WriteAt([]byte{s}, wl-1)
		return uint32(data + 1)
	}
	var hdr [16]byte
	if c.ReadAt(hdr[:], 0) < len(hdr) {
		return status(SIOErr, 0)
	}
	typ := binary.LittleEndian.Uint32(hdr[0:])
	sector := binary.LittleEndian.Uint64(hdr[8:])
	switch typ {
	case TIn:
		n := wl - 1
		off, ok := d.span(sector, n)
		if !ok {
			return status(SIOErr, 0)
		}
		for _, b := range dataIn {
			if _, err := d.disk.ReadAt(b.Data, off); err != nil {
				return status(SIOErr, 0)
			}
			off += int64(len(b.Data))
		}
		d.Reads.Add(1)
		return status(SOK, n)
	case TOut:
		n := c.ReadableLen() - len(hdr)
		off, ok := d.span(sector, n)
		if !ok || d.disk.ReadOnly() {
			return status(SIOErr, 0)
		}
		for _, b := range virtio.Slice(c.Readable, len(hdr), n) {
			if _, err := d.disk.WriteAt(b.Data, off); err != nil {
				return status(SIOErr, 0)
			}
			off += int64(len(b.Data))
		}
		d.Writes.Add(1)
		return status(SOK, 0)
	case TFlush:
		d.Flushes.Add(1)
		if err := d.disk.Flush(); err != nil {
			return status(SIOErr, 0)
		}
		return status(SOK, 0)
	case TGetID:
		id := make([]byte, IDLen)
		copy(id, d.id)
		n := min(wl-1, IDLen)
		c.WriteAt(id[:n], 0)
		return status(SOK, n)
	}
	return status(SUnsupp, 0)
}

// span checks a request of n bytes at sector and returns its byte offset.
func (d *Device) span(sector uint64, n int) (int64, bool) {
	if n%SectorSize != 0 {
		return 0, false
	}
	total := uint64(d.disk.Size())
	if sector > total/SectorSize || uint64(n) > total-sector*SectorSize {
		return 0, false
	}
	return int64(sector * SectorSize), true
}

type state struct {
	V        int    `json:"v"`
	ID       string `json:"id"`
	Capacity int64  `json:"capacity"`
}

// SaveState flushes the disk (the overlay file holds the data and its
// block map) and records the device identity.
func (d *Device) SaveState() ([]byte, error) {
	if err := d.disk.Flush(); err != nil {
		return nil, fmt.Errorf("blk: flushing disk for snapshot: %w", err)
	}
	return json.Marshal(state{V: 1, ID: d.id, Capacity: d.disk.Size()})
}

// RestoreState checks the saved disk matches the one attached.
func (d *Device) RestoreState(b []byte) error {
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("blk state: %w", err)
	}
	if s.V != 1 {
		return fmt.Errorf("blk state: unsupported version %d", s.V)
	}
	if s.Capacity != d.disk.Size() {
		return fmt.Errorf("blk state: disk was %d bytes, attached disk is %d", s.Capacity, d.disk.Size())
	}
	return nil
}
