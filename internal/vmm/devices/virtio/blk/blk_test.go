package blk_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"github.com/cubesandbox/cube/internal/vmm/devices"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio"
	"github.com/cubesandbox/cube/internal/vmm/devices/virtio/blk"
	vt "github.com/cubesandbox/cube/internal/vmm/devices/virtio/virtiotest"
)

const baseSize = 1 << 20

// makeBase writes a base image whose sector s is filled with byte s%251.
func makeBase(t testing.TB) (string, [32]byte) {
	t.Helper()
	b := make([]byte, baseSize)
	for s := 0; s < baseSize/512; s++ {
		for i := 0; i < 512; i++ {
			b[s*512+i] = byte(s % 251)
		}
	}
	p := filepath.Join(t.TempDir(), "base.img")
	if err := os.WriteFile(p, b, 0o444); err != nil {
		t.Fatal(err)
	}
	return p, sha256.Sum256(b)
}

func sectorBytes(s, n int) []byte {
	out := make([]byte, 0, n*512)
	for k := 0; k < n; k++ {
		out = append(out, bytes.Repeat([]byte{byte((s + k) % 251)}, 512)...)
	}
	return out
}

type blkDriver struct {
	*vt.Driver
	t *testing.T
}

// scratchOverlay opens a fresh overlay on base, closed when the test ends.
func scratchOverlay(t testing.TB, base string) *blk.Overlay {
	t.Helper()
	ov, err := blk.OpenOverlay(base, filepath.Join(t.TempDir(), "x.cow"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ov.Close() })
	return ov
}

func newBlk(t *testing.T, disk blk.Disk) *blkDriver {
	t.Helper()
	d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		return virtio.NewTransport(blk.New(disk, "cube-disk-0"), mem, irq, virtio.Options{})
	})
	if err := d.Init(^uint64(0), 1, 0); err != nil {
		t.Fatal(err)
	}
	return &blkDriver{d, t}
}

func hdr(typ uint32, sector uint64) []byte {
	h := make([]byte, 16)
	binary.LittleEndian.PutUint32(h, typ)
	binary.LittleEndian.PutUint64(h[8:], sector)
	return h
}

func (b *blkDriver) read(sector uint64, n int) ([]byte, byte) {
	b.t.Helper()
	u, err := b.Queues[0].Do(vt.R(hdr(blk.TIn, sector)), vt.W(n), vt.W(1))
	if err != nil {
		b.t.Fatal(err)
	}
	st := u.Writable[1][0]
	return u.Writable[0], st
}

func (b *blkDriver) write(sector uint64, data []byte) byte {
	b.t.Helper()
	u, err := b.Queues[0].Do(vt.R(hdr(blk.TOut, sector)), vt.R(data), vt.W(1))
	if err != nil {
		b.t.Fatal(err)
	}
	if u.Len != 1 {
		b.t.Errorf("write used len %d", u.Len)
	}
	return u.Writable[0][0]
}

func (b *blkDriver) simple(typ uint32) ([]byte, byte, uint32) {
	u, err := b.Queues[0].Do(vt.R(hdr(typ, 0)), vt.W(blk.IDLen), vt.W(1))
	if err != nil {
		b.t.Fatal(err)
	}
	return u.Writable[0], u.Writable[1][0], u.Len
}

func TestCopyOnWriteIsolation(t *testing.T) {
	base, sum := makeBase(t)
	dir := t.TempDir()
	ova, err := blk.OpenOverlay(base, filepath.Join(dir, "a.cow"))
	if err != nil {
		t.Fatal(err)
	}
	ovb, err := blk.OpenOverlay(base, filepath.Join(dir, "b.cow"))
	if err != nil {
		t.Fatal(err)
	}
	a, b := newBlk(t, ova), newBlk(t, ovb)

	// Config: capacity in sectors, no RO.
	if c := binary.LittleEndian.Uint64(a.ReadConfig(0, 8)); c != baseSize/512 {
		t.Errorf("capacity %d", c)
	}
	if a.Features&blk.FRO != 0 || a.Features&blk.FFlush == 0 {
		t.Errorf("features %#x", a.Features)
	}
	// Reads fall through to the base.
	if got, st := a.read(10, 4096); st != blk.SOK || !bytes.Equal(got, sectorBytes(10, 8)) {
		t.Fatalf("base read: status %d", st)
	}
	// A full-block write, a partial-block write (one sector inside a
	// block) and a write spanning blocks at an odd sector.
	full := bytes.Repeat([]byte{0xAA}, 4096)
	one := bytes.Repeat([]byte{0xBB}, 512)
	span := bytes.Repeat([]byte{0xCC}, 3*512)
	for _, w := range []struct {
		s uint64
		d []byte
	}{{8, full}, {17, one}, {31, span}} {
		if st := a.write(w.s, w.d); st != blk.SOK {
			t.Fatalf("write at %d: status %d", w.s, st)
		}
	}
	want := sectorBytes(0, 40)
	copy(want[8*512:], full)
	copy(want[17*512:], one)
	copy(want[31*512:], span)
	if got, _ := a.read(0, 40*512); !bytes.Equal(got, want) {
		t.Errorf("overlay A reads back wrong data")
	}
	if got, _ := b.read(0, 40*512); !bytes.Equal(got, sectorBytes(0, 40)) {
		t.Errorf("overlay B sees A's writes")
	}
	if _, st, _ := a.simple(blk.TFlush); st != blk.SOK {
		t.Errorf("flush status %d", st)
	}
	// The base file is untouched.
	raw, _ := os.ReadFile(base)
	if sha256.Sum256(raw) != sum {
		t.Errorf("base image modified")
	}
	if n := ova.BlocksInOverlay(); n != 4 {
		t.Errorf("overlay holds %d blocks, want 4", n)
	}
	// Reopening the flushed overlay gives the same disk.
	ova.Close()
	re, err := blk.OpenOverlay(base, filepath.Join(dir, "a.cow"))
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 40*512)
	if _, err := re.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Errorf("reopened overlay differs: %v", err)
	}
	re.Close()
	// The overlay file is sparse: far smaller on disk than the base.
	var st os.FileInfo
	if st, err = os.Stat(filepath.Join(dir, "a.cow")); err == nil && st.Size() < baseSize {
		t.Errorf("overlay apparent size %d < disk", st.Size())
	}
}

func TestBadRequestsGetIOErr(t *testing.T) {
	base, _ := makeBase(t)
	ov := scratchOverlay(t, base)
	d := newBlk(t, ov)
	last := uint64(baseSize/512 - 1)
	if _, st := d.read(last, 1024); st != blk.SIOErr {
		t.Errorf("read past end: status %d", st)
	}
	if _, st := d.read(^uint64(0)>>9, 512); st != blk.SIOErr {
		t.Errorf("read at huge sector: status %d", st)
	}
	if _, st := d.read(0, 100); st != blk.SIOErr {
		t.Errorf("read of partial sector: status %d", st)
	}
	if st := d.write(last, make([]byte, 1024)); st != blk.SIOErr {
		t.Errorf("write past end: status %d", st)
	}
	if _, st := d.read(last, 512); st != blk.SOK {
		t.Errorf("read of last sector: status %d", st)
	}
	if _, st, _ := d.simple(99); st != blk.SUnsupp {
		t.Errorf("unknown type: status %d", st)
	}
	// Short header: IOERR; no writable buffer at all: returned empty.
	u, err := d.Queues[0].Do(vt.R([]byte{0, 0}), vt.W(1))
	if err != nil || u.Writable[0][0] != blk.SIOErr {
		t.Errorf("short header: %v %v", u, err)
	}
	u, err = d.Queues[0].Do(vt.R(hdr(blk.TIn, 0)))
	if err != nil || u.Len != 0 {
		t.Errorf("no status buffer: %v %v", u, err)
	}
	// The device still works.
	if got, st := d.read(1, 512); st != blk.SOK || !bytes.Equal(got, sectorBytes(1, 1)) {
		t.Errorf("read after bad requests failed")
	}
}

func TestReadOnlyAndGetID(t *testing.T) {
	base, sum := makeBase(t)
	disk, err := blk.OpenFile(base, true)
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	d := newBlk(t, disk)
	if d.Features&blk.FRO == 0 {
		t.Errorf("read-only disk without VIRTIO_BLK_F_RO")
	}
	if st := d.write(0, make([]byte, 512)); st != blk.SIOErr {
		t.Errorf("write to RO disk: status %d", st)
	}
	id, st, n := d.simple(blk.TGetID)
	if st != blk.SOK || n != blk.IDLen+1 || string(bytes.TrimRight(id, "\x00")) != "cube-disk-0" {
		t.Errorf("GET_ID = %q status %d len %d", id, st, n)
	}
	raw, _ := os.ReadFile(base)
	if sha256.Sum256(raw) != sum {
		t.Errorf("base image modified")
	}
}

func TestIndirectRequest(t *testing.T) {
	base, _ := makeBase(t)
	ov := scratchOverlay(t, base)
	d := newBlk(t, ov)
	q := d.Queues[0]
	q.AddIndirect(vt.R(hdr(blk.TIn, 3)), vt.W(512), vt.W(512), vt.W(1))
	q.Kick()
	u, err := q.Wait(1, 5e9)
	if err != nil {
		t.Fatal(err)
	}
	if u[0].Len != 1025 || !bytes.Equal(append(append([]byte{}, u[0].Writable[0]...), u[0].Writable[1]...), sectorBytes(3, 2)) {
		t.Errorf("indirect read wrong (len %d)", u[0].Len)
	}
}

func TestOverlayRejectsMismatch(t *testing.T) {
	base, _ := makeBase(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "x.cow")
	ov, err := blk.OpenOverlay(base, p)
	if err != nil {
		t.Fatal(err)
	}
	ov.Close()
	other := filepath.Join(dir, "other.img")
	os.WriteFile(other, make([]byte, 2*baseSize), 0o644)
	if _, err := blk.OpenOverlay(other, p); err == nil {
		t.Errorf("overlay opened over a base of another size")
	}
	garbage := filepath.Join(dir, "g.cow")
	os.WriteFile(garbage, []byte("not an overlay at all"), 0o644)
	if _, err := blk.OpenOverlay(base, garbage); err == nil {
		t.Errorf("garbage overlay accepted")
	}
}

func TestSnapshotState(t *testing.T) {
	base, _ := makeBase(t)
	p := filepath.Join(t.TempDir(), "x.cow")
	ov, err := blk.OpenOverlay(base, p)
	if err != nil {
		t.Fatal(err)
	}
	defer ov.Close()
	var tr *virtio.Transport
	d := vt.New(func(mem devices.GuestMemory, irq devices.IRQLine) devices.MMIODevice {
		tr = virtio.NewTransport(blk.New(ov, "id"), mem, irq, virtio.Options{})
		return tr
	})
	if err := d.Init(^uint64(0), 1, 0); err != nil {
		t.Fatal(err)
	}
	bd := &blkDriver{d, t}
	bd.write(5, bytes.Repeat([]byte{7}, 512))
	st, err := tr.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	// The snapshot flushed the overlay: a second opener sees the write.
	ov2, err := blk.OpenOverlay(base, p)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 512)
	ov2.ReadAt(got, 5*512)
	if got[0] != 7 {
		t.Errorf("snapshot did not persist the overlay")
	}
	tr2 := virtio.NewTransport(blk.New(ov2, "id"), d.Mem, vt.NewIRQ(), virtio.Options{})
	if err := tr2.RestoreState(st); err != nil {
		t.Fatal(err)
	}
	d.Dev = tr2
	if got, st := bd.read(5, 512); st != blk.SOK || got[0] != 7 {
		t.Errorf("read after restore: %d %d", st, got[0])
	}
}
