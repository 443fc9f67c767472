//go:build linux

package snapshot_test

import (
	"bytes"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
)

// sample is a small valid state built without KVM.
func sample() *snapshot.State {
	s := &snapshot.State{Meta: snapshot.Meta{MemSize: 1 << 20, VCPUs: 1, MemFile: "memory",
		Layers: []snapshot.Layer{{File: "layer-1", Runs: []snapshot.Run{{Page: 1, Count: 2}, {Page: 7, Count: 1}}}}}}
	c := snapshot.VCPUState{ID: 0, MSRs: []kvm.MSREntry{{Index: 0x10, Data: 5}}, CPUID: []kvm.CPUIDEntry{{Function: 1}}}
	c.Regs.RIP = 0x100000
	s.VCPUs = []snapshot.VCPUState{c}
	for i := range s.IRQChip {
		s.IRQChip[i].ChipID = uint32(i)
	}
	s.Devices = []snapshot.DeviceState{{Name: "com1", Data: []byte(`{"v":1}`)}, {Name: "rng", Data: nil}}
	return s
}

func TestEncodeDecodeRoundTrip(t *testing.T) {
	b, err := sample().Encode()
	if err != nil {
		t.Fatal(err)
	}
	s, err := snapshot.Decode(b)
	if err != nil {
		t.Fatal(err)
	}
	b2, err := s.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, b2) {
		t.Fatal("decode/encode is not the identity")
	}
	// Every strict prefix is refused.
	for n := 0; n < len(b); n += 97 {
		if _, err := snapshot.Decode(b[:n]); err == nil {
			t.Fatalf("prefix of %d bytes accepted", n)
		}
	}
}

// FuzzSnapshotDecode: any input either decodes into a state that
// re-encodes and decodes again, or is refused with InvalidArgument or
// FailedPrecondition; never a panic.
func FuzzSnapshotDecode(f *testing.F) {
	b, err := sample().Encode()
	if err != nil {
		f.Fatal(err)
	}
	f.Add(b)
	f.Add(b[:len(b)-32])
	f.Add(b[:40])
	f.Add([]byte(snapshot.Magic))
	f.Fuzz(func(t *testing.T, in []byte) {
		check(t, in)
		// Also with a valid checksum appended, so the section parser
		// itself is exercised.
		sum := sha256.Sum256(in)
		check(t, append(bytes.Clone(in), sum[:]...))
	})
}

func check(t *testing.T, in []byte) {
	s, err := snapshot.Decode(in)
	if err != nil {
		if k := errs.KindOf(err); k != errs.InvalidArgument && k != errs.FailedPrecondition {
			t.Fatalf("error kind %s: %v", k, err)
		}
		return
	}
	out, err := s.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := snapshot.Decode(out); err != nil {
		t.Fatalf("re-encoded state refused: %v", err)
	}
}

// TestBadDeviceStateRefused: a well-formed, correctly checksummed file
// whose device state the device rejects fails the restore as a whole.
func TestBadDeviceStateRefused(t *testing.T) {
	dir := t.TempDir()
	orig, _ := takeSnapshot(t, dir)
	orig.VM.Close()
	s, err := snapshot.Load(dir)
	if err != nil {
		t.Fatal(err)
	}
	for i := range s.Devices {
		if s.Devices[i].Name == "rng0" {
			s.Devices[i].Data = []byte(`{"v":1,"device_id":4,"queues":[{"size":8,"ready":true,"desc":1}]}`)
		}
	}
	b, err := s.Encode()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, snapshot.StateFile), b, 0o644); err != nil {
		t.Fatal(err)
	}
	m, _, err := snapshot.Restore(dir, st.Spec())
	if err == nil {
		m.VM.Close()
		t.Fatal("bad device state restored")
	}
	if !strings.Contains(err.Error(), "rng") {
		t.Fatalf("error does not name the device: %v", err)
	}
	t.Logf("refused: %v", err)
}
