package virtio

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/cubesandbox/cube/internal/vmm/devices"
)

// Descriptor flags (split virtqueue).
const (
	descFNext     = 1
	descFWrite    = 2
	descFIndirect = 4

	availFNoInterrupt = 1

	descSize = 16
	// maxIndirect bounds an indirect table: the spec allows at most the
	// queue size for direct chains; indirect tables are bounded here.
	maxIndirect = 1024
	// maxChainBytes bounds the total buffer length of one chain.
	maxChainBytes = 1 << 32
)

// Errors a guest can provoke. They never panic the VMM; a queue that
// returns ErrQueueBroken needs a device reset.
var (
	ErrQueueBroken = errors.New("virtqueue: avail index out of range")
	ErrBadChain    = errors.New("virtqueue: malformed descriptor chain")
)

// Buf is one guest buffer of a descriptor chain, already translated to
// host memory.
type Buf struct {
	GPA  uint64
	Data []byte
}

// Chain is one available descriptor chain: device-readable buffers
// followed by device-writable ones.
type Chain struct {
	Head     uint16
	Readable []Buf
	Writable []Buf
}

// ReadableLen is the total length of the device-readable buffers.
func (c *Chain) ReadableLen() int {
	n := 0
	for _, b := range c.Readable {
		n += len(b.Data)
	}
	return n
}

// WritableLen is the total length of the device-writable buffers.
func (c *Chain) WritableLen() int {
	n := 0
	for _, b := range c.Writable {
		n += len(b.Data)
	}
	return n
}

// ReadAt copies readable bytes starting at byte offset off of the
// readable stream into p; it returns how many were copied.
func (c *Chain) ReadAt(p []byte, off int) int {
	return gather(c.Readable, p, off)
}

// WriteAt copies p into the writable stream at byte offset off; it
// returns how many bytes fit.
func (c *Chain) WriteAt(p []byte, off int) int {
	return scatter(c.Writable, p, off)
}

func gather(bufs []Buf, p []byte, off int) int {
	n := 0
	for _, b := range bufs {
		if len(p) == 0 {
			break
		}
		if off >= len(b.Data) {
			off -= len(b.Data)
			continue
		}
		k := copy(p, b.Data[off:])
		off = 0
		p = p[k:]
		n += k
	}
	return n
}

func scatter(bufs []Buf, p []byte, off int) int {
	n := 0
	for _, b := range bufs {
		if len(p) == 0 {
			break
		}
		if off >= len(b.Data) {
			off -= len(b.Data)
			continue
		}
		k := copy(b.Data[off:], p)
		off = 0
		p = p[k:]
		n += k
	}
	return n
}

// Slice returns the sub-buffers covering [off, off+n) of bufs (n may be
// cut short if bufs is shorter).
func Slice(bufs []Buf, off, n int) []Buf {
	var out []Buf
	for _, b := range bufs {
		if n <= 0 {
			break
		}
		if off >= len(b.Data) {
			off -= len(b.Data)
			continue
		}
		d := b.Data[off:]
		if len(d) > n {
			d = d[:n]
		}
		out = append(out, Buf{GPA: b.GPA + uint64(off), Data: d})
		n -= len(d)
		off = 0
	}
	return out
}

// QueueState is the snapshot form of a queue.
type QueueState struct {
	Size      uint16 `json:"size"`
	Ready     bool   `json:"ready"`
	Desc      uint64 `json:"desc"`
	Avail     uint64 `json:"avail"`
	Used      uint64 `json:"used"`
	LastAvail uint16 `json:"last_avail"`
	NextUsed  uint16 `json:"next_used"`
	Signalled uint16 `json:"signalled"`
}

// Queue is a split virtqueue. All methods are safe for concurrent use; the
// device handler passed to Drain runs with the queue locked.
type Queue struct {
	index  int
	max    uint16
	mem    devices.GuestMemory
	signal func(q *Queue) // raises the used-buffer interrupt
	// onBroken is told (on its own goroutine) when the queue breaks.
	onBroken func(q *Queue)

	notified chan struct{} // a token on every guest notification

	mu sync.Mutex
	// Guarded by mu.
	QueueState
	eventIdx bool
	broken   bool
	paused   bool       // Pop and Drain hand out nothing
	inflight int        // chains popped and not yet pushed
	idle     *sync.Cond // on mu: inflight reached 0
}

func newQueue(index int, max uint16, mem devices.GuestMemory, signal func(*Queue)) *Queue {
	q := &Queue{index: index, max: max, mem: mem, signal: signal, notified: make(chan struct{}, 1)}
	q.QueueState.Size = max
	q.idle = sync.NewCond(&q.mu)
	return q
}

// Index is the queue's number within its device.
func (q *Queue) Index() int { return q.index }

// Notified returns a channel that receives a token whenever the guest
// notifies this queue (for devices waiting for buffers in a goroutine).
func (q *Queue) Notified() <-chan struct{} { return q.notified }

func (q *Queue) poke() {
	select {
	case q.notified <- struct{}{}:
	default:
	}
}

func (q *Queue) reset() {
	q.mu.Lock()
	q.QueueState = QueueState{Size: q.max}
	q.eventIdx = false
	q.broken = false
	q.inflight = 0
	q.idle.Broadcast()
	q.mu.Unlock()
}

// markBroken records a ring the driver corrupted. Called with mu held.
func (q *Queue) markBroken() {
	if !q.broken && q.onBroken != nil {
		go q.onBroken(q)
	}
	q.broken = true
}

// pause stops the queue handing out chains and waits until every chain
// handed out has been returned, so guest memory and the queue state stay
// still for a snapshot.
func (q *Queue) pause() {
	q.mu.Lock()
	q.paused = true
	for q.inflight > 0 {
		q.idle.Wait()
	}
	q.mu.Unlock()
}

func (q *Queue) resume() {
	q.mu.Lock()
	q.paused = false
	q.mu.Unlock()
	q.poke()
}

// done accounts for a returned chain. Called with mu held.
func (q *Queue) done() {
	if q.inflight > 0 {
		q.inflight--
		if q.inflight == 0 {
			q.idle.Broadcast()
		}
	}
}

func (q *Queue) state() QueueState {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.QueueState
}

// validate checks the queue layout against guest memory. Called with mu held.
func (q *Queue) validate() error {
	s := q.Size
	if s == 0 || s > q.max || s&(s-1) != 0 {
		return fmt.Errorf("queue %d: bad size %d (max %d)", q.index, s, q.max)
	}
	if q.Desc%16 != 0 || q.Avail%2 != 0 || q.Used%4 != 0 {
		return fmt.Errorf("queue %d: misaligned rings", q.index)
	}
	n := uint64(s)
	for _, r := range [][2]uint64{{q.Desc, 16 * n}, {q.Avail, 6 + 2*n}, {q.Used, 6 + 8*n}} {
		if _, err := q.mem.Slice(r[0], r[1]); err != nil {
			return fmt.Errorf("queue %d: ring outside guest memory: %w", q.index, err)
		}
	}
	return nil
}

// barrier is a full memory fence (an atomic read-modify-write).
var fence atomic.Uint32

func barrier() { fence.Add(1) }

func (q *Queue) ring(addr, off, n uint64) []byte {
	b, err := q.mem.Slice(addr+off, n)
	if err != nil {
		return nil
	}
	return b
}

func (q *Queue) availIdx() uint16   { return Load16(q.mem, q.Avail+2) }
func (q *Queue) availFlags() uint16 { return Load16(q.mem, q.Avail) }
func (q *Queue) usedEvent() uint16  { return Load16(q.mem, q.Avail+4+2*uint64(q.Size)) }

func (q *Queue) setAvailEvent(v uint16) { Store16(q.mem, q.Used+4+8*uint64(q.Size), v) }

// pending reports whether the driver has made chains available. Called
// with mu held; a bogus index marks the queue broken.
func (q *Queue) pending() (bool, error) {
	if q.broken {
		return false, ErrQueueBroken
	}
	idx := q.availIdx()
	if d := idx - q.LastAvail; d > q.Size {
		q.markBroken()
		return false, ErrQueueBroken
	} else if d > 0 {
		return true, nil
	}
	if q.eventIdx {
		// Ask to be notified of the next buffer, then look again so a
		// buffer added meanwhile is not missed.
		q.setAvailEvent(q.LastAvail)
		barrier()
		return q.availIdx() != q.LastAvail, nil
	}
	return false, nil
}

// pop takes the next available chain. Called with mu held.
func (q *Queue) pop() (*Chain, error) {
	ok, err := q.pending()
	if err != nil || !ok {
		return nil, err
	}
	barrier()
	slot := uint64(q.LastAvail % q.Size)
	head := Load16(q.mem, q.Avail+4+2*slot)
	if head >= q.Size {
		// There is no descriptor to give back: the ring is unusable.
		q.markBroken()
		return nil, ErrQueueBroken
	}
	q.LastAvail++
	c, err := q.walk(head)
	if err != nil {
		// Return the chain to the driver with nothing written so it is
		// not leaked; the device treats it as failed.
		q.pushLocked(head, 0)
		return &Chain{Head: head}, err
	}
	return c, nil
}

// walk resolves the chain starting at head, including indirect tables.
// Every step is bounded by the queue size or the table length, so cycles
// are rejected rather than followed.
func (q *Queue) walk(head uint16) (*Chain, error) {
	c := &Chain{Head: head}
	if head >= q.Size {
		return nil, fmt.Errorf("%w: head %d >= size %d", ErrBadChain, head, q.Size)
	}
	table, err := q.mem.Slice(q.Desc, uint64(q.Size)*descSize)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrBadChain, err)
	}
	var total uint64
	idx := head
	for steps := 0; ; steps++ {
		if steps >= int(q.Size) {
			return nil, fmt.Errorf("%w: chain longer than queue (cycle?)", ErrBadChain)
		}
		d := table[uint64(idx)*descSize : uint64(idx)*descSize+descSize]
		addr := binary.LittleEndian.Uint64(d[0:])
		ln := binary.LittleEndian.Uint32(d[8:])
		flags := binary.LittleEndian.Uint16(d[12:])
		next := binary.LittleEndian.Uint16(d[14:])
		if flags&descFIndirect != 0 {
			if flags&descFNext != 0 || steps != 0 {
				return nil, fmt.Errorf("%w: indirect descriptor must be the only one", ErrBadChain)
			}
			if err := q.walkIndirect(c, addr, ln, &total); err != nil {
				return nil, err
			}
			return c, nil
		}
		if err := q.addBuf(c, addr, ln, flags, &total); err != nil {
			return nil, err
		}
		if flags&descFNext == 0 {
			return c, nil
		}
		if next >= q.Size {
			return nil, fmt.Errorf("%w: next %d >= size %d", ErrBadChain, next, q.Size)
		}
		idx = next
	}
}

func (q *Queue) walkIndirect(c *Chain, addr uint64, ln uint32, total *uint64) error {
	if ln == 0 || ln%descSize != 0 || ln/descSize > maxIndirect {
		return fmt.Errorf("%w: indirect table length %d", ErrBadChain, ln)
	}
	n := ln / descSize
	table, err := q.mem.Slice(addr, uint64(ln))
	if err != nil {
		return fmt.Errorf("%w: indirect table: %v", ErrBadChain, err)
	}
	idx := uint32(0)
	for steps := uint32(0); ; steps++ {
		if steps >= n {
			return fmt.Errorf("%w: indirect chain longer than table (cycle?)", ErrBadChain)
		}
		d := table[idx*descSize : idx*descSize+descSize]
		flags := binary.LittleEndian.Uint16(d[12:])
		if flags&descFIndirect != 0 {
			return fmt.Errorf("%w: nested indirect table", ErrBadChain)
		}
		if err := q.addBuf(c, binary.LittleEndian.Uint64(d[0:]), binary.LittleEndian.Uint32(d[8:]), flags, total); err != nil {
			return err
		}
		if flags&descFNext == 0 {
			return nil
		}
		next := uint32(binary.LittleEndian.Uint16(d[14:]))
		if next >= n {
			return fmt.Errorf("%w: indirect next %d >= %d", ErrBadChain, next, n)
		}
		idx = next
	}
}

func (q *Queue) addBuf(c *Chain, addr uint64, ln uint32, flags uint16, total *uint64) error {
	*total += uint64(ln)
	if *total > maxChainBytes {
		return fmt.Errorf("%w: chain too long", ErrBadChain)
	}
	if ln == 0 {
		return nil
	}
	b, err := q.mem.Slice(addr, uint64(ln))
	if err != nil {
		return fmt.Errorf("%w: buffer: %v", ErrBadChain, err)
	}
	if flags&descFWrite != 0 {
		c.Writable = append(c.Writable, Buf{GPA: addr, Data: b})
		return nil
	}
	if len(c.Writable) > 0 {
		return fmt.Errorf("%w: readable descriptor after writable one", ErrBadChain)
	}
	c.Readable = append(c.Readable, Buf{GPA: addr, Data: b})
	return nil
}

// pushLocked returns a chain to the driver with written bytes. Called
// with mu held.
func (q *Queue) pushLocked(head uint16, written uint32) {
	slot := uint64(q.NextUsed % q.Size)
	if e := q.ring(q.Used, 4+8*slot, 8); e != nil {
		binary.LittleEndian.PutUint32(e[0:], uint32(head))
		binary.LittleEndian.PutUint32(e[4:], written)
	}
	q.NextUsed++
	Store16(q.mem, q.Used+2, q.NextUsed)
}

// needInterrupt decides whether the driver wants an interrupt for the
// used entries added since the last one. Called with mu held.
func (q *Queue) needInterrupt() bool {
	old, now := q.Signalled, q.NextUsed
	if old == now {
		return false
	}
	if q.eventIdx {
		ev := q.usedEvent()
		q.Signalled = now
		return now-ev-1 < now-old
	}
	q.Signalled = now
	return q.availFlags()&availFNoInterrupt == 0
}

// Pop takes the next available chain, or returns nil if there is none
// (or the queue is paused). Every chain Pop returns must be given back
// with Push or Put promptly: Pause waits for them.
// On a malformed chain it returns the (already returned) chain's head in
// a Chain with no buffers and an error wrapping ErrBadChain.
func (q *Queue) Pop() (*Chain, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.Ready || q.paused {
		return nil, nil
	}
	c, err := q.pop()
	if c != nil && err == nil {
		q.inflight++
	}
	return c, err
}

// Push returns a chain to the driver and raises the interrupt if the
// driver wants one.
func (q *Queue) Push(c *Chain, written uint32) {
	q.mu.Lock()
	if !q.Ready {
		q.mu.Unlock()
		return
	}
	q.pushLocked(c.Head, written)
	q.done()
	need := q.needInterrupt()
	q.mu.Unlock()
	if need {
		q.signal(q)
	}
}

// Handler serves one chain; it returns the number of bytes written to the
// chain's writable buffers.
type Handler func(c *Chain) uint32

// Drain serves every available chain with h, returns them to the driver
// and raises one interrupt at the end if the driver wants it. Malformed
// chains are returned with zero length and counted in the error result.
// The loop is bounded by the queue size per pass over the ring.
func (q *Queue) Drain(h Handler) (served int, err error) {
	q.mu.Lock()
	if !q.Ready || q.paused {
		q.mu.Unlock()
		return 0, nil
	}
	for {
		c, perr := q.pop()
		if perr != nil {
			err = perr
			if errors.Is(perr, ErrQueueBroken) {
				break
			}
			continue
		}
		if c == nil {
			break
		}
		n := h(c)
		q.pushLocked(c.Head, n)
		served++
	}
	need := q.needInterrupt()
	q.mu.Unlock()
	if need {
		q.signal(q)
	}
	return served, err
}

// Put returns a chain to the driver without raising the interrupt; call
// Interrupt after a batch.
func (q *Queue) Put(c *Chain, written uint32) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.Ready {
		q.pushLocked(c.Head, written)
		q.done()
	}
}

// Interrupt raises the used-buffer interrupt if the driver wants one for
// the chains returned since the last interrupt.
func (q *Queue) Interrupt() {
	q.mu.Lock()
	need := q.Ready && q.needInterrupt()
	q.mu.Unlock()
	if need {
		q.signal(q)
	}
}

// Unpop gives back the last n chains taken with Pop and not yet pushed,
// in reverse order of popping, as if they had never been taken (the
// driver still owns them and has not been told anything). Only a device
// that is the sole consumer of the queue may use it, e.g. to wait for
// enough buffers for one frame without holding some.
func (q *Queue) Unpop(n int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if n <= 0 || n > q.inflight {
		return
	}
	q.LastAvail -= uint16(n)
	for i := 0; i < n; i++ {
		q.done()
	}
}

// Len is the queue size the driver chose.
func (q *Queue) Len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return int(q.Size)
}
