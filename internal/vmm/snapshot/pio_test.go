//go:build linux

package snapshot_test

import (
	"encoding/binary"
	"sync"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/boot"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	"github.com/cubesandbox/cube/internal/vmm/synth"
)

type countWriter struct {
	mu sync.Mutex
	n  int
}

func (c *countWriter) Write(p []byte) (int, error) {
	c.mu.Lock()
	c.n += len(p)
	c.mu.Unlock()
	return len(p), nil
}

func (c *countWriter) count() int { c.mu.Lock(); defer c.mu.Unlock(); return c.n }

// TestSnapshotMidPortIO snapshots a guest that exits to the VMM on every
// loop iteration (inc counter; out to COM1): the pause lands right after
// a PIO exit, whose completion KVM still owes. Restored clones must
// neither repeat nor drop an OUT: bytes written by the original and the
// clone together equal the counter's increments (the last OUT may be
// pending).
func TestSnapshotMidPortIO(t *testing.T) {
	needKVM(t)
	const counter = synth.CounterAddr
	// At CPL 0: on KVM-PVM guest user mode runs in host ring 3, where
	// port I/O faults whatever the guest's IOPL.
	var code []byte
	code = append(code, 0xB9)
	code = binary.LittleEndian.AppendUint32(code, counter) // mov ecx, counter
	code = append(code, 0x66, 0xBA, 0xF8, 0x03)            // mov dx, 0x3f8
	code = append(code, 0x48, 0xFF, 0x01, 0xB0, 'x', 0xEE, 0xEB, 0xF8)
	spec := func(w *countWriter) machine.Spec {
		return machine.Spec{Kernel: code, KernelFormat: boot.FormatRaw, MemSize: 16 << 20, VCPUs: 1, Serial: w}
	}
	w0 := &countWriter{}
	m, err := machine.New(spec(w0))
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	if err := m.VM.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for progress rather than a fixed time: inside the emulated
	// machine of make vmtest each port-I/O exit takes far longer.
	for deadline := time.Now().Add(30 * time.Second); w0.count() < 5 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if st := m.VM.State(); st.String() != "running" || w0.count() < 5 {
		t.Fatalf("original guest: state %s, %d bytes (%+v)", st, w0.count(), m.VM.Wait())
	}
	dir := t.TempDir()
	if _, err := snapshot.Take(m.VM, dir, snapshot.Options{}); err != nil {
		t.Fatal(err)
	}
	read := func(m *machine.Machine) uint64 {
		b, _ := m.VM.Mem.Slice(counter, 8)
		return binary.LittleEndian.Uint64(b)
	}
	m.VM.Close()
	w0n := w0.count()
	for i := 0; i < 5; i++ {
		w := &countWriter{}
		c, _, err := snapshot.Restore(dir, spec(w))
		if err != nil {
			t.Fatal(err)
		}
		c0 := read(c)
		if err := c.VM.Start(); err != nil {
			t.Fatal(err)
		}
		for deadline := time.Now().Add(30 * time.Second); w.count() < 5 && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		if err := c.VM.Pause(); err != nil {
			t.Fatalf("clone %d: %v (%+v)", i, err, c.VM.Wait())
		}
		d := int(read(c) - c0)
		b := w.count()
		c.VM.Close()
		// Over the original's life plus the clone's, every increment is
		// followed by exactly one OUT (the last one may be pending).
		if d < 5 {
			t.Fatalf("clone %d: only %d increments and %d bytes before the pause", i, d, b)
		}
		if diff := (w0n + b) - int(c0) - d; diff < -1 || diff > 0 {
			t.Fatalf("clone %d: %d+%d bytes for %d+%d increments (an OUT was replayed or lost)", i, w0n, b, c0, d)
		}
	}
}
