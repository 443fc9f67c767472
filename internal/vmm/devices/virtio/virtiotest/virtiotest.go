// Package virtiotest is a test virtio driver: it owns a fake guest memory
// and a counting interrupt line, negotiates features over a device's MMIO
// registers, builds descriptor chains in guest memory and kicks the device,
// the way a guest kernel's virtio-mmio driver would.
package virtiotest

import (
	"encoding/binary"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
)

// Mem is guest memory backed by a byte slice.
type Mem struct{ B []byte }

// NewMem allocates size bytes of guest memory.
func NewMem(size int) *Mem { return &Mem{B: make([]byte, size)} }

// Slice implements devices.GuestMemory.
func (m *Mem) Slice(gpa, n uint64) ([]byte, error) {
	end := gpa + n
	if end < gpa || end > uint64(len(m.B)) {
		return nil, fmt.Errorf("guest range [%#x,+%#x) outside %#x bytes of RAM", gpa, n, len(m.B))
	}
	return m.B[gpa:end:end], nil
}

// Size implements devices.GuestMemory.
func (m *Mem) Size() uint64 { return uint64(len(m.B)) }

// IRQ counts triggers.
type IRQ struct {
	n  atomic.Int64
	ch chan struct{}
}

// NewIRQ returns a counting interrupt line.
func NewIRQ() *IRQ { return &IRQ{ch: make(chan struct{}, 1)} }

// Trigger implements devices.IRQLine.
func (i *IRQ) Trigger() error {
	i.n.Add(1)
	select {
	case i.ch <- struct{}{}:
	default:
	}
	return nil
}

// C receives a token after triggers (coalesced), to wait for interrupts.
func (i *IRQ) C() <-chan struct{} { return i.ch }

// Count is the number of triggers so far.
func (i *IRQ) Count() int64 { return i.n.Load() }

// Layout of the fake guest memory used by Driver.
const (
	ringBase = 0x10000  // rings of all queues
	ringSpan = 0x40000  // per queue
	dataBase = 0x400000 // buffers
	MemSize  = 64 << 20 // default memory size
)

// Driver drives one virtio-mmio device.
type Driver struct {
	Dev    devices.MMIODevice
	Mem    *Mem
	IRQ    *IRQ
	Queues []*Queue
	// Features negotiated by Init.
	Features uint64

	allocMu sync.Mutex
	next    uint64
}

// New builds a device with mk on fresh memory and a counting IRQ.
func New(mk func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice) *Driver {
	d := &Driver{Mem: NewMem(MemSize), IRQ: NewIRQ(), next: dataBase}
	d.Dev = mk(d.Mem, d.IRQ)
	return d
}

// Read32 reads a register.
func (d *Driver) Read32(off uint64) uint32 {
	b := make([]byte, 4)
	d.Dev.MMIORead(off, b)
	return binary.LittleEndian.Uint32(b)
}

// Write32 writes a register.
func (d *Driver) Write32(off uint64, v uint32) {
	b := make([]byte, 4)
	binary.LittleEndian.PutUint32(b, v)
	d.Dev.MMIOWrite(off, b)
}

// ReadConfig reads n bytes of device config at off.
func (d *Driver) ReadConfig(off uint64, n int) []byte {
	b := make([]byte, n)
	d.Dev.MMIORead(virtio.RegConfig+off, b)
	return b
}

// DeviceFeatures reads the 64-bit offered feature set.
func (d *Driver) DeviceFeatures() uint64 {
	d.Write32(virtio.RegDeviceFeatSel, 0)
	lo := d.Read32(virtio.RegDeviceFeatures)
	d.Write32(virtio.RegDeviceFeatSel, 1)
	hi := d.Read32(virtio.RegDeviceFeatures)
	return uint64(hi)<<32 | uint64(lo)
}

// WriteFeatures writes the driver feature set.
func (d *Driver) WriteFeatures(f uint64) {
	d.Write32(virtio.RegDriverFeatSel, 0)
	d.Write32(virtio.RegDriverFeatures, uint32(f))
	d.Write32(virtio.RegDriverFeatSel, 1)
	d.Write32(virtio.RegDriverFeatures, uint32(f>>32))
}

// Status reads the status register.
func (d *Driver) Status() uint32 { return d.Read32(virtio.RegStatus) }

// SetStatus writes the status register.
func (d *Driver) SetStatus(s uint32) { d.Write32(virtio.RegStatus, s) }

// Negotiate runs the feature handshake up to FEATURES_OK with the
// features in want that the device offers (plus VERSION_1). It fails if
// the device refuses FEATURES_OK.
func (d *Driver) Negotiate(want uint64) error {
	if m := d.Read32(virtio.RegMagic); m != virtio.Magic {
		return fmt.Errorf("bad magic %#x", m)
	}
	if v := d.Read32(virtio.RegVersion); v != 2 {
		return fmt.Errorf("bad version %d", v)
	}
	d.SetStatus(0)
	d.SetStatus(virtio.StatusAcknowledge)
	d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver)
	f := d.DeviceFeatures() & (want | virtio.FVersion1)
	d.WriteFeatures(f)
	d.SetStatus(virtio.StatusAcknowledge | virtio.StatusDriver | virtio.StatusFeaturesOK)
	if d.Status()&virtio.StatusFeaturesOK == 0 {
		return fmt.Errorf("device refused features %#x", f)
	}
	d.Features = f
	return nil
}

// SetupQueues makes n queues of the given size ready (size 0: the
// device's maximum).
func (d *Driver) SetupQueues(n int, size uint16) error {
	d.Queues = nil
	for i := 0; i < n; i++ {
		d.Write32(virtio.RegQueueSel, uint32(i))
		max := uint16(d.Read32(virtio.RegQueueNumMax))
		if max == 0 {
			return fmt.Errorf("queue %d not available", i)
		}
		s := size
		if s == 0 || s > max {
			s = max
		}
		base := uint64(ringBase + i*ringSpan)
		q := &Queue{d: d, idx: i, size: s, desc: base, avail: base + 16*uint64(s),
			heads: map[uint16][]uint16{}}
		q.used = (q.avail + 6 + 2*uint64(s) + 4095) &^ 4095
		if q.used+6+8*uint64(s) > base+ringSpan {
			return fmt.Errorf("queue %d too large for the test layout", i)
		}
		clear(d.Mem.B[base : base+ringSpan])
		for j := s; j > 0; j-- {
			q.free = append(q.free, j-1)
		}
		d.Write32(virtio.RegQueueNum, uint32(s))
		d.Write32(virtio.RegQueueDescLow, uint32(q.desc))
		d.Write32(virtio.RegQueueDescHigh, uint32(q.desc>>32))
		d.Write32(virtio.RegQueueAvailLow, uint32(q.avail))
		d.Write32(virtio.RegQueueAvailHigh, uint32(q.avail>>32))
		d.Write32(virtio.RegQueueUsedLow, uint32(q.used))
		d.Write32(virtio.RegQueueUsedHigh, uint32(q.used>>32))
		d.Write32(virtio.RegQueueReady, 1)
		if d.Read32(virtio.RegQueueReady) != 1 {
			return fmt.Errorf("queue %d refused", i)
		}
		d.Queues = append(d.Queues, q)
	}
	return nil
}

// Init negotiates want, sets up nq queues of size qsize and sets DRIVER_OK.
func (d *Driver) Init(want uint64, nq int, qsize uint16) error {
	if err := d.Negotiate(want); err != nil {
		return err
	}
	if err := d.SetupQueues(nq, qsize); err != nil {
		return err
	}
	d.SetStatus(d.Status() | virtio.StatusDriverOK)
	if s := d.Status(); s&virtio.StatusDriverOK == 0 || s&virtio.StatusDeviceNeedsReset != 0 {
		return fmt.Errorf("device did not accept DRIVER_OK: status %#x", s)
	}
	return nil
}

// Alloc reserves n bytes of guest memory for buffers (a wrapping bump
// allocator: tests keep far less in flight than the area holds).
func (d *Driver) Alloc(n int) uint64 {
	d.allocMu.Lock()
	defer d.allocMu.Unlock()
	n = (n + 63) &^ 63
	if d.next+uint64(n) > uint64(len(d.Mem.B)) {
		d.next = dataBase
	}
	a := d.next
	d.next += uint64(n)
	return a
}

// Seg is one buffer of a chain: readable data, or Len writable bytes.
type Seg struct {
	Data  []byte
	Len   int
	Write bool
	// Addr, if non-zero, is used verbatim (for malformed-chain tests).
	Addr uint64
}

// R is a readable segment holding b.
func R(b []byte) Seg { return Seg{Data: b} }

// W is a writable segment of n bytes.
func W(n int) Seg { return Seg{Len: n, Write: true} }

// Queue is the driver side of one split virtqueue.
type Queue struct {
	d                 *Driver
	idx               int
	size              uint16
	desc, avail, used uint64

	mu       sync.Mutex
	free     []uint16
	heads    map[uint16][]uint16
	availIdx uint16
	lastUsed uint16
}

// Size is the queue size.
func (q *Queue) Size() uint16 { return q.size }

func (q *Queue) writeDesc(table uint64, i uint16, addr uint64, ln uint32, flags, next uint16) {
	b := q.d.Mem.B[table+16*uint64(i):]
	binary.LittleEndian.PutUint64(b[0:], addr)
	binary.LittleEndian.PutUint32(b[8:], ln)
	binary.LittleEndian.PutUint16(b[12:], flags)
	binary.LittleEndian.PutUint16(b[14:], next)
}

func (q *Queue) place(s Seg) (uint64, uint32, uint16) {
	n := len(s.Data)
	if s.Write {
		n = s.Len
	}
	addr := s.Addr
	if addr == 0 {
		addr = q.d.Alloc(n)
		if !s.Write {
			copy(q.d.Mem.B[addr:], s.Data)
		} else {
			clear(q.d.Mem.B[addr : addr+uint64(n)])
		}
	}
	var fl uint16
	if s.Write {
		fl = 2
	}
	return addr, uint32(n), fl
}

// Add builds a direct chain of segs and makes it available (without a
// kick). It returns the head, or false if the ring is full.
func (q *Queue) Add(segs ...Seg) (uint16, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(segs) == 0 || len(q.free) < len(segs) {
		return 0, false
	}
	ids := q.free[len(q.free)-len(segs):]
	q.free = q.free[:len(q.free)-len(segs)]
	ids = append([]uint16(nil), ids...)
	for i, s := range segs {
		addr, n, fl := q.place(s)
		var next uint16
		if i+1 < len(segs) {
			fl |= 1
			next = ids[i+1]
		}
		q.writeDesc(q.desc, ids[i], addr, n, fl, next)
	}
	q.publish(ids[0], ids)
	return ids[0], true
}

// AddIndirect builds the chain as an indirect table behind one descriptor.
func (q *Queue) AddIndirect(segs ...Seg) (uint16, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if len(segs) == 0 || len(q.free) < 1 {
		return 0, false
	}
	id := q.free[len(q.free)-1]
	q.free = q.free[:len(q.free)-1]
	table := q.d.Alloc(16 * len(segs))
	for i, s := range segs {
		addr, n, fl := q.place(s)
		var next uint16
		if i+1 < len(segs) {
			fl |= 1
			next = uint16(i + 1)
		}
		q.writeDesc(table, uint16(i), addr, n, fl, next)
	}
	q.writeDesc(q.desc, id, table, uint32(16*len(segs)), 4, 0)
	q.publish(id, []uint16{id})
	return id, true
}

// AddRaw writes raw descriptors (index, addr, len, flags, next) into the
// table and publishes head, for malformed-chain tests.
func (q *Queue) AddRaw(head uint16, descs [][5]uint64) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for _, d := range descs {
		q.writeDesc(q.desc, uint16(d[0]), d[1], uint32(d[2]), uint16(d[3]), uint16(d[4]))
	}
	q.publish(head, nil)
}

func (q *Queue) publish(head uint16, ids []uint16) {
	q.heads[head] = ids
	slot := q.avail + 4 + 2*uint64(q.availIdx%q.size)
	virtio.Store16(q.d.Mem, slot, head)
	q.availIdx++
	virtio.Store16(q.d.Mem, q.avail+2, q.availIdx)
}

// SetAvailIdx overwrites the avail index (for hostile-driver tests).
func (q *Queue) SetAvailIdx(v uint16) {
	virtio.Store16(q.d.Mem, q.avail+2, v)
}

// SetUsedEvent writes used_event (EVENT_IDX).
func (q *Queue) SetUsedEvent(v uint16) {
	virtio.Store16(q.d.Mem, q.avail+4+2*uint64(q.size), v)
}

// AvailEvent reads avail_event (EVENT_IDX).
func (q *Queue) AvailEvent() uint16 {
	return virtio.Load16(q.d.Mem, q.used+4+8*uint64(q.size))
}

// SetNoInterrupt sets or clears VIRTQ_AVAIL_F_NO_INTERRUPT.
func (q *Queue) SetNoInterrupt(on bool) {
	var v uint16
	if on {
		v = 1
	}
	virtio.Store16(q.d.Mem, q.avail, v)
}

// Kick notifies the device of this queue through the QueueNotify register.
func (q *Queue) Kick() { q.d.Write32(virtio.RegQueueNotify, uint32(q.idx)) }

// Used is one returned chain.
type Used struct {
	Head uint16
	Len  uint32
	// Writable holds the chain's writable buffers (views of guest memory).
	Writable [][]byte
}

// Data concatenates the first Len bytes written by the device.
func (u Used) Data() []byte {
	var out []byte
	left := int(u.Len)
	for _, b := range u.Writable {
		if left <= 0 {
			break
		}
		k := min(left, len(b))
		out = append(out, b[:k]...)
		left -= k
	}
	return out
}

// UsedIdx reads the device's used index.
func (q *Queue) UsedIdx() uint16 {
	return virtio.Load16(q.d.Mem, q.used+2)
}

// Collect returns the chains the device has used since the last call and
// frees their descriptors.
func (q *Queue) Collect() []Used {
	q.mu.Lock()
	defer q.mu.Unlock()
	var out []Used
	for q.lastUsed != q.UsedIdx() {
		e := q.d.Mem.B[q.used+4+8*uint64(q.lastUsed%q.size):]
		u := Used{Head: uint16(binary.LittleEndian.Uint32(e)), Len: binary.LittleEndian.Uint32(e[4:])}
		u.Writable = q.writable(u.Head)
		q.free = append(q.free, q.heads[u.Head]...)
		delete(q.heads, u.Head)
		q.lastUsed++
		out = append(out, u)
	}
	if q.d.Features&virtio.FRingEventIdx != 0 {
		q.SetUsedEvent(q.lastUsed)
	}
	return out
}

// writable walks the chain at head and returns its writable buffers
// (bounds-checked: tests also publish malformed chains).
func (q *Queue) writable(head uint16) [][]byte {
	var out [][]byte
	table, i, tlen := q.desc, head, uint64(q.size)
	for n := 0; n < 64; n++ {
		if uint64(i) >= tlen {
			break
		}
		b, err := q.d.Mem.Slice(table+16*uint64(i), 16)
		if err != nil {
			break
		}
		addr, ln := binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint32(b[8:])
		fl, next := binary.LittleEndian.Uint16(b[12:]), binary.LittleEndian.Uint16(b[14:])
		if fl&4 != 0 {
			table, i, tlen = addr, 0, uint64(ln/16)
			continue
		}
		if fl&2 != 0 {
			if buf, err := q.d.Mem.Slice(addr, uint64(ln)); err == nil {
				out = append(out, buf)
			}
		}
		if fl&1 == 0 {
			break
		}
		i = next
	}
	return out
}

// Wait collects until n chains are used or timeout passes.
func (q *Queue) Wait(n int, timeout time.Duration) ([]Used, error) {
	deadline := time.Now().Add(timeout)
	var out []Used
	for {
		out = append(out, q.Collect()...)
		if len(out) >= n {
			return out, nil
		}
		if time.Now().After(deadline) {
			return out, fmt.Errorf("queue %d: %d of %d buffers used after %v", q.idx, len(out), n, timeout)
		}
		select {
		case <-q.d.IRQ.ch:
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// Do adds a chain, kicks, and waits for it to be used.
func (q *Queue) Do(segs ...Seg) (Used, error) {
	if _, ok := q.Add(segs...); !ok {
		return Used{}, fmt.Errorf("queue %d full", q.idx)
	}
	q.Kick()
	u, err := q.Wait(1, 5*time.Second)
	if err != nil {
		return Used{}, err
	}
	return u[0], nil
}
