// Package virtio implements the virtio-mmio transport (modern, version 2)
// and split virtqueues shared by Cube's virtio devices (blk, net, vsock,
// rng in sub-packages).
//
// A Transport is the MMIODevice the VM core maps at a 4 KiB window and
// announces on the kernel command line (CmdlineArg). It owns the register
// state machine, feature negotiation and the queues; the Device it hosts
// only sees negotiated features and ready queues (Activate), notifications
// (QueueNotify) and Reset. Every value the guest provides (indices,
// lengths, addresses) is checked; a hostile guest can make its own device
// fail but never panic or hang the VMM.
//
// Concurrency: MMIO accesses may come from several vCPU threads, Notify
// from an ioeventfd goroutine, and devices run their own goroutines. The
// transport's mu guards registers; each Queue has its own lock. Lock order:
// device locks, then Queue.mu. Transport.mu is never held while calling
// into a device's queue handlers.
package virtio

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"

	"github.com/cubesandbox/cube/internal/vmm/devices"
)

// MMIO register offsets (virtio 1.2, 4.2.2).
const (
	RegMagic          = 0x000
	RegVersion        = 0x004
	RegDeviceID       = 0x008
	RegVendorID       = 0x00c
	RegDeviceFeatures = 0x010
	RegDeviceFeatSel  = 0x014
	RegDriverFeatures = 0x020
	RegDriverFeatSel  = 0x024
	RegQueueSel       = 0x030
	RegQueueNumMax    = 0x034
	RegQueueNum       = 0x038
	RegQueueReady     = 0x044
	RegQueueNotify    = 0x050
	RegInterruptStat  = 0x060
	RegInterruptACK   = 0x064
	RegStatus         = 0x070
	RegQueueDescLow   = 0x080
	RegQueueDescHigh  = 0x084
	RegQueueAvailLow  = 0x090
	RegQueueAvailHigh = 0x094
	RegQueueUsedLow   = 0x0a0
	RegQueueUsedHigh  = 0x0a4
	RegSHMSel         = 0x0ac
	RegSHMLenLow      = 0x0b0
	RegSHMLenHigh     = 0x0b4
	RegSHMBaseLow     = 0x0b8
	RegSHMBaseHigh    = 0x0bc
	RegConfigGen      = 0x0fc
	RegConfig         = 0x100

	// WindowSize is the size of one device's MMIO window.
	WindowSize = 0x1000

	Magic    = 0x74726976 // "virt"
	Version  = 2
	VendorID = 0x45425543 // "CUBE"
)

// Device status bits.
const (
	StatusAcknowledge      = 1
	StatusDriver           = 2
	StatusDriverOK         = 4
	StatusFeaturesOK       = 8
	StatusDeviceNeedsReset = 64
	StatusFailed           = 128
)

// Interrupt status bits.
const (
	IntUsedBuffer   = 1
	IntConfigChange = 2
)

// Transport feature bits.
const (
	FRingIndirectDesc = 1 << 28
	FRingEventIdx     = 1 << 29
	FVersion1         = 1 << 32
)

// Device IDs.
const (
	IDNet   = 1
	IDBlock = 2
	IDRNG   = 4
	IDVsock = 19
)

// Device is a virtio device model hosted by a Transport.
type Device interface {
	// DeviceID is the virtio device type.
	DeviceID() uint32
	// Features are the device-specific feature bits offered (the
	// transport adds VERSION_1, EVENT_IDX and INDIRECT_DESC).
	Features() uint64
	// QueueSizes lists the maximum size of each queue; all of them must
	// be made ready by the driver.
	QueueSizes() []uint16
	// ReadConfig and WriteConfig access the device config space; off is
	// relative to its start and may be out of range (the device ignores
	// or zero-fills).
	ReadConfig(off uint64, data []byte)
	WriteConfig(off uint64, data []byte)
	// Activate is called once the driver sets DRIVER_OK with every queue
	// ready, or after RestoreState of an active device.
	Activate(a *Active) error
	// QueueNotify is called when the driver notifies queue q of an active
	// device, on the notifying thread.
	QueueNotify(q int)
	// Reset stops all device work and forgets negotiated state. It must
	// be safe to call when the device was never activated.
	Reset()
}

// Active is what an activated device works with.
type Active struct {
	Features uint64
	Queues   []*Queue
	// Restored is set when Activate follows RestoreState.
	Restored bool
	t        *Transport
}

// Has reports whether feature bit f was negotiated.
func (a *Active) Has(f uint64) bool { return a.Features&f == f }

// ConfigChanged bumps the config generation and raises the config
// change interrupt. It takes the transport's lock: call it from a device
// goroutine, not from Activate or a queue handler.
func (a *Active) ConfigChanged() { a.t.ConfigChanged() }

// Options tune a Transport.
type Options struct {
	// NoEventIdx and NoIndirect withhold those ring features.
	NoEventIdx bool
	NoIndirect bool
	Log        *slog.Logger
}

// Transport is a virtio-mmio v2 device: an devices.MMIODevice and a
// devices.Stateful.
type Transport struct {
	dev    Device
	mem    devices.GuestMemory
	irq    devices.IRQLine
	log    *slog.Logger
	offer  uint64
	queues []*Queue

	intStatus atomic.Uint32
	active    atomic.Bool

	mu sync.Mutex
	// Guarded by mu.
	status      uint32
	devFeatSel  uint32
	drvFeatSel  uint32
	drvFeatures uint64
	queueSel    uint32
	configGen   uint32
	shmSel      uint32
	act         *Active
	resetWarns  int
}

var (
	_ devices.MMIODevice = (*Transport)(nil)
	_ devices.Stateful   = (*Transport)(nil)
)

// NewTransport hosts dev on guest memory mem, raising irq for interrupts.
func NewTransport(dev Device, mem devices.GuestMemory, irq devices.IRQLine, o Options) *Transport {
	t := &Transport{dev: dev, mem: mem, irq: irq, log: o.Log}
	if t.log == nil {
		t.log = slog.New(slog.DiscardHandler)
	}
	t.offer = dev.Features() | FVersion1
	if !o.NoEventIdx {
		t.offer |= FRingEventIdx
	}
	if !o.NoIndirect {
		t.offer |= FRingIndirectDesc
	}
	for i, max := range dev.QueueSizes() {
		q := newQueue(i, max, mem, t.queueSignal)
		q.onBroken = t.queueBroken
		t.queues = append(t.queues, q)
	}
	return t
}

// CmdlineArg is the kernel command line fragment announcing a device at
// base with interrupt line irq.
func CmdlineArg(base uint64, irq uint32) string {
	return fmt.Sprintf("virtio_mmio.device=4K@%#x:%d", base, irq)
}

// Device returns the hosted device.
func (t *Transport) Device() Device { return t.dev }

// OfferedFeatures is the full feature set the transport offers.
func (t *Transport) OfferedFeatures() uint64 { return t.offer }

// Status returns the device status register.
func (t *Transport) Status() uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.status
}

// InterruptStatus returns the pending interrupt bits.
func (t *Transport) InterruptStatus() uint32 { return t.intStatus.Load() }

func (t *Transport) raise(bit uint32) {
	t.intStatus.Or(bit)
	if err := t.irq.Trigger(); err != nil {
		t.log.Warn("virtio: raising interrupt failed", "device", t.dev.DeviceID(), "err", err)
	}
}

func (t *Transport) queueSignal(*Queue) { t.raise(IntUsedBuffer) }

// ConfigChanged bumps the config generation and interrupts the driver.
func (t *Transport) ConfigChanged() {
	t.mu.Lock()
	t.configGen++
	t.mu.Unlock()
	t.raise(IntConfigChange)
}

// needsReset flags the device as broken for the driver. Called with mu held.
func (t *Transport) needsReset(why error) {
	// A guest can provoke this at will: only the first few are warnings.
	lvl := slog.LevelDebug
	if t.resetWarns < 5 {
		t.resetWarns++
		lvl = slog.LevelWarn
	}
	t.log.Log(context.Background(), lvl, "virtio: device needs reset", "device", t.dev.DeviceID(), "err", why)
	t.status |= StatusDeviceNeedsReset
	t.configGen++
	t.raise(IntConfigChange)
}

// queueBroken flags DEVICE_NEEDS_RESET for a ring found corrupt by a
// device goroutine (the notify path checks synchronously as well).
func (t *Transport) queueBroken(*Queue) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.status&StatusDriverOK != 0 && t.status&StatusDeviceNeedsReset == 0 {
		t.needsReset(ErrQueueBroken)
	}
}

// Notify is the QueueNotify entry point: the MMIO handler calls it, and
// the VM core may call it from an ioeventfd goroutine. It runs the
// device's handler on the calling goroutine.
func (t *Transport) Notify(q int) {
	if !t.active.Load() || q < 0 || q >= len(t.queues) {
		return
	}
	t.queues[q].poke()
	t.dev.QueueNotify(q)
	if t.queues[q].isBroken() {
		t.queueBroken(t.queues[q])
	}
}

func (q *Queue) isBroken() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.broken
}

// MMIORead implements devices.MMIODevice.
func (t *Transport) MMIORead(off uint64, data []byte) {
	clear(data)
	if off >= RegConfig {
		t.dev.ReadConfig(off-RegConfig, data)
		return
	}
	if len(data) != 4 || off%4 != 0 {
		return
	}
	binary.LittleEndian.PutUint32(data, t.readReg(off))
}

func (t *Transport) readReg(off uint64) uint32 {
	t.mu.Lock()
	defer t.mu.Unlock()
	switch off {
	case RegMagic:
		return Magic
	case RegVersion:
		return Version
	case RegDeviceID:
		return t.dev.DeviceID()
	case RegVendorID:
		return VendorID
	case RegDeviceFeatures:
		if t.devFeatSel < 2 {
			return uint32(t.offer >> (32 * t.devFeatSel))
		}
		return 0
	case RegQueueNumMax:
		if q := t.selected(); q != nil {
			return uint32(q.max)
		}
		return 0
	case RegQueueReady:
		if q := t.selected(); q != nil {
			q.mu.Lock()
			defer q.mu.Unlock()
			if q.Ready {
				return 1
			}
		}
		return 0
	case RegInterruptStat:
		return t.intStatus.Load()
	case RegStatus:
		return t.status
	case RegSHMLenLow, RegSHMLenHigh:
		return 0xffffffff // no shared memory regions
	case RegSHMBaseLow, RegSHMBaseHigh:
		return 0xffffffff
	case RegConfigGen:
		return t.configGen
	}
	return 0
}

func (t *Transport) selected() *Queue {
	if int(t.queueSel) < len(t.queues) {
		return t.queues[t.queueSel]
	}
	return nil
}

// MMIOWrite implements devices.MMIODevice.
func (t *Transport) MMIOWrite(off uint64, data []byte) {
	if off >= RegConfig {
		t.dev.WriteConfig(off-RegConfig, data)
		return
	}
	if len(data) != 4 || off%4 != 0 {
		return
	}
	v := binary.LittleEndian.Uint32(data)
	if off == RegQueueNotify {
		t.Notify(int(v & 0xffff))
		return
	}
	if off == RegInterruptACK {
		t.intStatus.And(^v)
		return
	}
	if off == RegStatus && v == 0 {
		t.Reset()
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch off {
	case RegDeviceFeatSel:
		t.devFeatSel = v
	case RegDriverFeatSel:
		t.drvFeatSel = v
	case RegDriverFeatures:
		if t.status&StatusDriver == 0 || t.status&StatusFeaturesOK != 0 || t.drvFeatSel > 1 {
			return
		}
		sh := 32 * t.drvFeatSel
		t.drvFeatures = t.drvFeatures&^(0xffffffff<<sh) | uint64(v)<<sh
	case RegQueueSel:
		t.queueSel = v
	case RegSHMSel:
		t.shmSel = v
	case RegStatus:
		t.setStatus(v)
	case RegQueueNum, RegQueueReady, RegQueueDescLow, RegQueueDescHigh,
		RegQueueAvailLow, RegQueueAvailHigh, RegQueueUsedLow, RegQueueUsedHigh:
		t.writeQueueReg(off, v)
	}
}

func (t *Transport) writeQueueReg(off uint64, v uint32) {
	q := t.selected()
	if q == nil || t.status&StatusDriverOK != 0 || t.status&StatusFeaturesOK == 0 {
		return
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if off == RegQueueReady {
		if v == 0 {
			q.Ready = false
			return
		}
		if err := q.validate(); err != nil {
			t.log.Debug("virtio: queue not made ready", "device", t.dev.DeviceID(), "err", err)
			return
		}
		q.Ready = true
		return
	}
	if q.Ready {
		return // a ready queue's layout is fixed
	}
	lo := func(x uint64) uint64 { return x&^0xffffffff | uint64(v) }
	hi := func(x uint64) uint64 { return x&0xffffffff | uint64(v)<<32 }
	switch off {
	case RegQueueNum:
		q.Size = uint16(v)
		if v > 0xffff {
			q.Size = 0
		}
	case RegQueueDescLow:
		q.Desc = lo(q.Desc)
	case RegQueueDescHigh:
		q.Desc = hi(q.Desc)
	case RegQueueAvailLow:
		q.Avail = lo(q.Avail)
	case RegQueueAvailHigh:
		q.Avail = hi(q.Avail)
	case RegQueueUsedLow:
		q.Used = lo(q.Used)
	case RegQueueUsedHigh:
		q.Used = hi(q.Used)
	}
}

// setStatus applies a non-zero status write. Called with mu held.
func (t *Transport) setStatus(v uint32) {
	old := t.status
	if v&old != old&^StatusDeviceNeedsReset {
		// The driver may only add bits; clearing needs a reset.
		return
	}
	v |= old & StatusDeviceNeedsReset
	added := v &^ old
	if added&StatusFeaturesOK != 0 {
		f := t.drvFeatures
		if old&StatusDriver == 0 || f&^t.offer != 0 || f&FVersion1 == 0 {
			v &^= StatusFeaturesOK
		}
	}
	if added&StatusDriverOK != 0 {
		if v&StatusFeaturesOK == 0 {
			v &^= StatusDriverOK
		} else {
			t.status = v
			if err := t.activate(false); err != nil {
				t.needsReset(err)
			}
			return
		}
	}
	t.status = v
}

// activate hands the queues to the device. Called with mu held.
func (t *Transport) activate(restored bool) error {
	for _, q := range t.queues {
		q.mu.Lock()
		ready := q.Ready
		q.eventIdx = t.drvFeatures&FRingEventIdx != 0
		q.mu.Unlock()
		if !ready {
			return fmt.Errorf("queue %d not ready", q.index)
		}
	}
	t.act = &Active{Features: t.drvFeatures, Queues: t.queues, Restored: restored, t: t}
	if err := t.dev.Activate(t.act); err != nil {
		return err
	}
	t.active.Store(true)
	return nil
}

// Pause quiesces the device for a snapshot: the queues stop handing out
// chains and Pause returns once every chain a device goroutine was
// working on has been returned. With the vCPUs stopped, guest memory and
// the queue state then stay still until Resume. Guest notifications
// arriving meanwhile are remembered and served on Resume.
func (t *Transport) Pause() {
	for _, q := range t.queues {
		q.pause()
	}
}

// Resume undoes Pause and lets devices look at their queues again.
func (t *Transport) Resume() {
	for _, q := range t.queues {
		q.resume()
	}
	if t.active.Load() {
		for i := range t.queues {
			t.dev.QueueNotify(i)
		}
	}
}

// Reset returns the device to its initial state (driver wrote 0 to
// Status, or the VM is reset).
func (t *Transport) Reset() {
	t.active.Store(false)
	t.dev.Reset()
	for _, q := range t.queues {
		q.reset()
	}
	t.mu.Lock()
	t.status, t.devFeatSel, t.drvFeatSel, t.drvFeatures, t.queueSel, t.shmSel = 0, 0, 0, 0, 0, 0
	t.act = nil
	t.mu.Unlock()
	t.intStatus.Store(0)
}

// transportState is the snapshot encoding (version 1).
type transportState struct {
	V           int          `json:"v"`
	DeviceID    uint32       `json:"device_id"`
	Status      uint32       `json:"status"`
	DevFeatSel  uint32       `json:"dev_feat_sel"`
	DrvFeatSel  uint32       `json:"drv_feat_sel"`
	DrvFeatures uint64       `json:"drv_features"`
	QueueSel    uint32       `json:"queue_sel"`
	ConfigGen   uint32       `json:"config_gen"`
	IntStatus   uint32       `json:"int_status"`
	Queues      []QueueState `json:"queues"`
	Device      []byte       `json:"device,omitempty"`
}

// SaveState implements devices.Stateful: registers, queues, pending
// interrupts and the device's own state (if it is Stateful). The VM must
// be paused.
func (t *Transport) SaveState() ([]byte, error) {
	t.mu.Lock()
	s := transportState{V: 1, DeviceID: t.dev.DeviceID(), Status: t.status, DevFeatSel: t.devFeatSel,
		DrvFeatSel: t.drvFeatSel, DrvFeatures: t.drvFeatures, QueueSel: t.queueSel,
		ConfigGen: t.configGen, IntStatus: t.intStatus.Load()}
	t.mu.Unlock()
	for _, q := range t.queues {
		s.Queues = append(s.Queues, q.state())
	}
	if sd, ok := t.dev.(devices.Stateful); ok {
		b, err := sd.SaveState()
		if err != nil {
			return nil, fmt.Errorf("virtio device %d state: %w", t.dev.DeviceID(), err)
		}
		s.Device = b
	}
	return json.Marshal(s)
}

// RestoreState implements devices.Stateful. The device is reset first;
// if the saved device was active it is re-activated with Restored set.
// Bad input returns an error and leaves the device reset.
func (t *Transport) RestoreState(b []byte) error {
	var s transportState
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("virtio state: %w", err)
	}
	if s.V != 1 {
		return fmt.Errorf("virtio state: unsupported version %d", s.V)
	}
	if s.DeviceID != t.dev.DeviceID() || len(s.Queues) != len(t.queues) {
		return fmt.Errorf("virtio state: device %d with %d queues does not match device %d",
			s.DeviceID, len(s.Queues), t.dev.DeviceID())
	}
	t.Reset()
	if sd, ok := t.dev.(devices.Stateful); ok && s.Device != nil {
		if err := sd.RestoreState(s.Device); err != nil {
			return fmt.Errorf("virtio device %d state: %w", t.dev.DeviceID(), err)
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for i, qs := range s.Queues {
		q := t.queues[i]
		q.mu.Lock()
		q.QueueState = qs
		err := error(nil)
		if qs.Ready {
			err = q.validate()
		}
		if err != nil {
			q.QueueState = QueueState{Size: q.max}
		}
		q.mu.Unlock()
		if err != nil {
			return fmt.Errorf("virtio state: %w", err)
		}
	}
	t.status, t.devFeatSel, t.drvFeatSel = s.Status, s.DevFeatSel, s.DrvFeatSel
	t.drvFeatures, t.queueSel, t.configGen = s.DrvFeatures&t.offer, s.QueueSel, s.ConfigGen
	if s.Status&StatusDriverOK != 0 && s.Status&StatusDeviceNeedsReset == 0 {
		if err := t.activate(true); err != nil {
			t.needsReset(err)
		}
	}
	if s.IntStatus != 0 {
		t.intStatus.Store(s.IntStatus)
		t.raise(0)
	}
	return nil
}
