package virtio_test

import (
	"bytes"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/rng"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

func newRNG(t *testing.T, o virtio.Options) (*vt.Driver, *virtio.Transport) {
	t.Helper()
	var tr *virtio.Transport
	d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		tr = virtio.NewTransport(rng.New(), mem, irq, o)
		return tr
	})
	return d, tr
}

const all = ^uint64(0)

func TestIdentityRegisters(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{})
	for _, c := range []struct {
		off  uint64
		want uint32
	}{{virtio.RegMagic, 0x74726976}, {virtio.RegVersion, 2}, {virtio.RegDeviceID, 4}, {virtio.RegVendorID, virtio.VendorID},
		{virtio.RegSHMLenLow, 0xffffffff}} {
		if got := d.Read32(c.off); got != c.want {
			t.Errorf("reg %#x = %#x, want %#x", c.off, got, c.want)
		}
	}
	f := d.DeviceFeatures()
	if f&virtio.FVersion1 == 0 || f&virtio.FRingEventIdx == 0 || f&virtio.FRingIndirectDesc == 0 {
		t.Errorf("features %#x lack VERSION_1/EVENT_IDX/INDIRECT_DESC", f)
	}
	// Wrong widths and unaligned offsets read as zero and are ignored.
	b := []byte{0xff, 0xff}
	d.Dev.MMIORead(virtio.RegMagic, b)
	if b[0] != 0 || b[1] != 0 {
		t.Errorf("2-byte register read = %v", b)
	}
	d.Dev.MMIOWrite(virtio.RegStatus+1, []byte{1, 0, 0, 0})
	d.Dev.MMIOWrite(virtio.RegStatus, []byte{1})
	if s := d.Status(); s != 0 {
		t.Errorf("odd writes changed status to %#x", s)
	}
}

func TestNegotiateAcceptAndServe(t *testing.T) {
	for _, o := range []virtio.Options{{}, {NoEventIdx: true, NoIndirect: true}} {
		d, tr := newRNG(t, o)
		if err := d.Init(all, 1, 0); err != nil {
			t.Fatal(err)
		}
		if d.Features != tr.OfferedFeatures() {
			t.Errorf("negotiated %#x, offered %#x", d.Features, tr.OfferedFeatures())
		}
		q := d.Queues[0]
		u, err := q.Do(vt.W(64), vt.W(64))
		if err != nil {
			t.Fatal(err)
		}
		if u.Len != 128 || bytes.Equal(u.Data()[:64], make([]byte, 64)) {
			t.Errorf("rng used len %d data %x", u.Len, u.Data())
		}
		if d.IRQ.Count() == 0 || tr.InterruptStatus()&virtio.IntUsedBuffer == 0 {
			t.Errorf("no used-buffer interrupt")
		}
		d.Write32(virtio.RegInterruptACK, virtio.IntUsedBuffer)
		if s := d.Read32(virtio.RegInterruptStat); s != 0 {
			t.Errorf("interrupt status after ACK = %#x", s)
		}
	}
}

func TestIndirectChain(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 0); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	q.AddIndirect(vt.W(16), vt.W(16), vt.W(16))
	q.Kick()
	u, err := q.Wait(1, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if u[0].Len != 48 {
		t.Errorf("indirect chain len %d", u[0].Len)
	}
}

func TestRefuseUnsupportedFeatures(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{NoEventIdx: true})
	base := uint32(virtio.StatusAcknowledge | virtio.StatusDriver)
	for name, f := range map[string]uint64{
		"unoffered device bit":  virtio.FVersion1 | 1<<3,
		"withheld EVENT_IDX":    virtio.FVersion1 | virtio.FRingEventIdx,
		"legacy (no VERSION_1)": 0,
	} {
		d.SetStatus(0)
		d.SetStatus(virtio.StatusAcknowledge)
		d.SetStatus(base)
		d.WriteFeatures(f)
		d.SetStatus(base | virtio.StatusFeaturesOK)
		if s := d.Status(); s&virtio.StatusFeaturesOK != 0 {
			t.Errorf("%s: FEATURES_OK accepted (status %#x)", name, s)
		}
		// Without FEATURES_OK, queues cannot be set up and DRIVER_OK is refused.
		d.Write32(virtio.RegQueueNum, 16)
		d.Write32(virtio.RegQueueReady, 1)
		if d.Read32(virtio.RegQueueReady) != 0 {
			t.Errorf("%s: queue ready without FEATURES_OK", name)
		}
		d.SetStatus(base | virtio.StatusDriverOK)
		if s := d.Status(); s&virtio.StatusDriverOK != 0 {
			t.Errorf("%s: DRIVER_OK without FEATURES_OK (status %#x)", name, s)
		}
	}
}

func TestFeaturesFrozenAfterFeaturesOK(t *testing.T) {
	d, tr := newRNG(t, virtio.Options{})
	if err := d.Negotiate(0); err != nil {
		t.Fatal(err)
	}
	d.WriteFeatures(virtio.FVersion1 | virtio.FRingEventIdx)
	if err := d.SetupQueues(1, 0); err != nil {
		t.Fatal(err)
	}
	d.SetStatus(d.Status() | virtio.StatusDriverOK)
	st, _ := tr.SaveState()
	if bytes.Contains(st, []byte(`"drv_features":6`)) {
		t.Errorf("features changed after FEATURES_OK: %s", st)
	}
	// The driver may not clear status bits without a reset.
	d.SetStatus(virtio.StatusAcknowledge)
	if d.Status()&virtio.StatusDriverOK == 0 {
		t.Errorf("status bits cleared without reset")
	}
}

func TestDriverOKWithoutQueuesNeedsReset(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{})
	if err := d.Negotiate(all); err != nil {
		t.Fatal(err)
	}
	gen := d.Read32(virtio.RegConfigGen)
	d.SetStatus(d.Status() | virtio.StatusDriverOK)
	if s := d.Status(); s&virtio.StatusDeviceNeedsReset == 0 {
		t.Errorf("status %#x lacks DEVICE_NEEDS_RESET", s)
	}
	if d.Read32(virtio.RegInterruptStat)&virtio.IntConfigChange == 0 || d.Read32(virtio.RegConfigGen) == gen {
		t.Errorf("no config change signalled")
	}
	// A reset clears it and the device works again.
	if err := d.Init(all, 1, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Queues[0].Do(vt.W(8)); err != nil {
		t.Fatal(err)
	}
}

func TestQueueValidation(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{})
	if err := d.Negotiate(all); err != nil {
		t.Fatal(err)
	}
	set := func(num uint32, desc, avail, used uint64) uint32 {
		d.Write32(virtio.RegQueueReady, 0)
		d.Write32(virtio.RegQueueNum, num)
		d.Write32(virtio.RegQueueDescLow, uint32(desc))
		d.Write32(virtio.RegQueueDescHigh, uint32(desc>>32))
		d.Write32(virtio.RegQueueAvailLow, uint32(avail))
		d.Write32(virtio.RegQueueAvailHigh, uint32(avail>>32))
		d.Write32(virtio.RegQueueUsedLow, uint32(used))
		d.Write32(virtio.RegQueueUsedHigh, uint32(used>>32))
		d.Write32(virtio.RegQueueReady, 1)
		return d.Read32(virtio.RegQueueReady)
	}
	for name, c := range map[string][4]uint64{
		"size 0":            {0, 0x10000, 0x11000, 0x12000},
		"size not pow2":     {100, 0x10000, 0x11000, 0x12000},
		"size above max":    {512, 0x10000, 0x11000, 0x12000},
		"desc misaligned":   {16, 0x10008, 0x11000, 0x12000},
		"used misaligned":   {16, 0x10000, 0x11000, 0x12002},
		"desc outside RAM":  {16, vt.MemSize - 16, 0x11000, 0x12000},
		"used wraps 64-bit": {16, 0x10000, 0x11000, ^uint64(0) &^ 3},
	} {
		if set(uint32(c[0]), c[1], c[2], c[3]) != 0 {
			t.Errorf("%s: queue accepted", name)
		}
	}
	d.Write32(virtio.RegQueueSel, 7)
	if d.Read32(virtio.RegQueueNumMax) != 0 {
		t.Errorf("nonexistent queue has a size")
	}
	d.Write32(virtio.RegQueueSel, 0)
	if set(16, 0x10000, 0x11000, 0x12000) != 1 {
		t.Errorf("good queue refused")
	}
}

func TestResetMidOperation(t *testing.T) {
	d, tr := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 0); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	q.Add(vt.W(32))
	d.SetStatus(0)
	if d.Status() != 0 || d.Read32(virtio.RegQueueReady) != 0 || tr.InterruptStatus() != 0 {
		t.Fatalf("reset left state: status %#x", d.Status())
	}
	q.Kick() // ignored: device not active
	if q.UsedIdx() != 0 {
		t.Errorf("reset device used a buffer")
	}
	tr.Notify(0)
	tr.Notify(99)
	if err := d.Init(all, 1, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Queues[0].Do(vt.W(8)); err != nil {
		t.Fatal(err)
	}
}

func TestMalformedChains(t *testing.T) {
	d, tr := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 16); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	buf := uint64(0x800000)
	const next, write, indirect = 1, 2, 4
	cases := map[string][][5]uint64{
		"self loop":          {{0, buf, 8, next | write, 0}},
		"two-cycle":          {{0, buf, 8, next | write, 1}, {1, buf, 8, next | write, 0}},
		"next out of range":  {{0, buf, 8, next | write, 99}},
		"buffer past RAM":    {{0, vt.MemSize - 4, 8, write, 0}},
		"address overflow":   {{0, ^uint64(0) - 2, 8, write, 0}},
		"indirect with next": {{0, buf, 16, indirect | next, 1}},
		"indirect bad len":   {{0, buf, 17, indirect, 0}},
		"indirect past RAM":  {{0, vt.MemSize - 16, 32, indirect, 0}},
		"read after write":   {{0, buf, 8, next | write, 1}, {1, buf, 8, 0, 0}},
	}
	for name, descs := range cases {
		before := q.UsedIdx()
		q.AddRaw(0, descs)
		q.Kick()
		u := q.Collect()
		if q.UsedIdx() != before+1 || len(u) != 1 || u[0].Len != 0 {
			t.Errorf("%s: chain not returned empty (used %d->%d)", name, before, q.UsedIdx())
		}
	}
	// Nested indirect and an indirect cycle.
	tbl := uint64(0x900000)
	putDesc := func(at uint64, i int, addr uint64, ln uint32, fl, nx uint16) {
		b := d.Mem.B[at+16*uint64(i):]
		for k := 0; k < 8; k++ {
			b[k] = byte(addr >> (8 * k))
		}
		b[8], b[9], b[10], b[11] = byte(ln), byte(ln>>8), byte(ln>>16), byte(ln>>24)
		b[12], b[13], b[14], b[15] = byte(fl), byte(fl>>8), byte(nx), byte(nx>>8)
	}
	putDesc(tbl, 0, tbl, 32, indirect, 0)
	putDesc(tbl, 1, buf, 8, write, 0)
	q.AddRaw(0, [][5]uint64{{0, tbl, 32, indirect, 0}})
	putDesc(tbl+64, 0, buf, 8, write|next, 1)
	putDesc(tbl+64, 1, buf, 8, write|next, 0)
	q.AddRaw(1, [][5]uint64{{1, tbl + 64, 32, indirect, 0}})
	q.Kick()
	if u := q.Collect(); len(u) != 2 || u[0].Len != 0 || u[1].Len != 0 {
		t.Errorf("nested/cyclic indirect: %+v", u)
	}
	if tr.Status()&virtio.StatusDeviceNeedsReset != 0 {
		t.Errorf("bad chains broke the device")
	}
	// The queue still serves good chains.
	if u, err := q.Do(vt.W(8)); err != nil || u.Len != 8 {
		t.Errorf("good chain after bad ones: %v %v", u, err)
	}
}

func TestBogusAvailIndexNeedsReset(t *testing.T) {
	d, tr := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 16); err != nil {
		t.Fatal(err)
	}
	d.Queues[0].SetAvailIdx(1000)
	d.Queues[0].Kick()
	if tr.Status()&virtio.StatusDeviceNeedsReset == 0 {
		t.Errorf("avail idx beyond the ring did not flag DEVICE_NEEDS_RESET")
	}
	if d.Queues[0].UsedIdx() != 0 {
		t.Errorf("device consumed from a broken ring")
	}
}

func TestEventIdxSuppression(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 16); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	// Ask for an interrupt only once used idx passes 3.
	q.SetUsedEvent(2)
	n0 := d.IRQ.Count()
	for i := 0; i < 2; i++ {
		q.Add(vt.W(4))
		q.Kick()
	}
	if got := d.IRQ.Count() - n0; got != 0 {
		t.Errorf("interrupts before used_event reached: %d", got)
	}
	q.Add(vt.W(4))
	q.Kick()
	if got := d.IRQ.Count() - n0; got != 1 {
		t.Errorf("interrupts after used_event reached: %d", got)
	}
	if ev := q.AvailEvent(); ev != 3 {
		t.Errorf("avail_event = %d, want 3", ev)
	}
}

func TestNoInterruptFlag(t *testing.T) {
	d, _ := newRNG(t, virtio.Options{NoEventIdx: true})
	if err := d.Init(all, 1, 16); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	q.SetNoInterrupt(true)
	n0 := d.IRQ.Count()
	q.Add(vt.W(4))
	q.Kick()
	if d.IRQ.Count() != n0 || q.UsedIdx() != 1 {
		t.Errorf("NO_INTERRUPT ignored")
	}
}

func TestSnapshotRestore(t *testing.T) {
	d, tr := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 16); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	for i := 0; i < 5; i++ {
		if _, err := q.Do(vt.W(4)); err != nil {
			t.Fatal(err)
		}
	}
	q.Add(vt.W(4)) // pending, not kicked
	st, err := tr.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	// A fresh transport on the same memory continues where the old one was.
	irq := vt.NewIRQ()
	tr2 := virtio.NewTransport(rng.New(), d.Mem, irq, virtio.Options{})
	if err := tr2.RestoreState(st); err != nil {
		t.Fatal(err)
	}
	if s := tr2.Status(); s&virtio.StatusDriverOK == 0 {
		t.Fatalf("restored status %#x", s)
	}
	if irq.Count() == 0 {
		t.Errorf("pending interrupt not re-raised after restore")
	}
	d.Dev = tr2
	q.Kick()
	if u := q.Collect(); len(u) != 1 || u[0].Len != 4 || q.UsedIdx() != 6 {
		t.Errorf("after restore: used %v idx %d", u, q.UsedIdx())
	}
	// Bad state is refused and changes nothing.
	for _, bad := range []string{"", "{", `{"v":2}`, `{"v":1,"device_id":2}`,
		`{"v":1,"device_id":4,"queues":[{"size":3,"ready":true}]}`} {
		tr3 := virtio.NewTransport(rng.New(), d.Mem, irq, virtio.Options{})
		if err := tr3.RestoreState([]byte(bad)); err == nil {
			t.Errorf("restore of %q succeeded", bad)
		}
		if tr3.Status() != 0 {
			t.Errorf("failed restore left status %#x", tr3.Status())
		}
	}
}

func TestPauseResume(t *testing.T) {
	d, tr := newRNG(t, virtio.Options{})
	if err := d.Init(all, 1, 16); err != nil {
		t.Fatal(err)
	}
	q := d.Queues[0]
	tr.Pause()
	q.Add(vt.W(4))
	q.Kick()
	if q.UsedIdx() != 0 {
		t.Fatalf("paused device used a buffer")
	}
	st, err := tr.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(st, []byte(`"last_avail":1`)) {
		t.Errorf("paused queue consumed a chain: %s", st)
	}
	tr.Resume()
	if q.UsedIdx() != 1 {
		t.Fatalf("notification during pause not served on resume")
	}
}
