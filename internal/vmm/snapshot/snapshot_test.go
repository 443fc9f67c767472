//go:build linux

package snapshot_test

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
)

func needKVM(t testing.TB) {
	t.Helper()
	if !kvm.Available() {
		t.Skip("no usable /dev/kvm on this host")
	}
}

// takeSnapshot boots the synthetic guest, runs it to phase 1 and takes a
// snapshot (fork: the original keeps running). It returns the original.
func takeSnapshot(t testing.TB, dir string) (*machine.Machine, *snapshot.State) {
	t.Helper()
	needKVM(t)
	m, err := st.Boot(st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.VM.Close() })
	if err := st.RunToPhase1(m); err != nil {
		t.Fatal(err)
	}
	s, err := snapshot.Take(m.VM, dir, snapshot.Options{Resume: true})
	if err != nil {
		t.Fatal(err)
	}
	return m, s
}

func fileSum(t testing.TB, p string) [32]byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func memWord(t testing.TB, dir string, gpa int) uint64 {
	f, err := os.Open(filepath.Join(dir, snapshot.MemoryFile))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 8)
	if _, err := f.ReadAt(b, int64(gpa)); err != nil {
		t.Fatal(err)
	}
	return binary.LittleEndian.Uint64(b)
}

// TestClones restores 100 clones from one snapshot taken mid-run.
func TestClones(t *testing.T) {
	dir := t.TempDir()
	orig, s := takeSnapshot(t, dir)
	memPath := filepath.Join(dir, snapshot.MemoryFile)
	memSum := fileSum(t, memPath)
	snapCounter := memWord(t, dir, st.Counter)
	if snapCounter == 0 || memWord(t, dir, st.Phase) != 1 {
		t.Fatalf("snapshot taken outside phase 1: counter %d phase %d", snapCounter, memWord(t, dir, st.Phase))
	}
	if memWord(t, dir, st.Pattern+8*1000) != st.PatternValue {
		t.Fatal("pattern missing from the memory file")
	}
	buf0 := make([]byte, st.BufLen)
	copy(buf0, mustSlice(t, orig, st.Buf0, st.BufLen))

	// Fork: the original runs on after the snapshot.
	if !st.WaitFor(5*time.Second, func() bool { return st.U64(orig.VM, st.Counter) > snapCounter }) {
		t.Fatal("original did not continue after a fork snapshot")
	}

	n := 100
	if testing.Short() {
		n = 10
	}
	clones := make([]*machine.Machine, 0, n)
	defer func() {
		for _, c := range clones {
			c.VM.Close()
		}
	}()
	seen := map[string]int{}
	for i := 0; i < n; i++ {
		c, _, err := snapshot.Restore(dir, st.Spec())
		if err != nil {
			t.Fatalf("clone %d: %v", i, err)
		}
		clones = append(clones, c)
		regs, err := c.VM.CPUs[0].GetRegs()
		if err != nil {
			t.Fatal(err)
		}
		if regs != s.VCPUs[0].Regs {
			t.Fatalf("clone %d registers %+v differ from the snapshot's %+v", i, regs, s.VCPUs[0].Regs)
		}
		if got := st.U64(c.VM, st.Counter); got != snapCounter {
			t.Fatalf("clone %d starts with counter %d, snapshot has %d", i, got, snapCounter)
		}
		if err := c.VM.Start(); err != nil {
			t.Fatal(err)
		}
		if !st.WaitFor(5*time.Second, func() bool { return st.U64(c.VM, st.Counter) > snapCounter }) {
			t.Fatalf("clone %d did not resume counting (state %s, result %+v)", i, c.VM.State(), c.VM.Wait())
		}
		if err := st.Put64(c.VM, st.Mark, uint64(i+1)); err != nil {
			t.Fatal(err)
		}
		// Let the guest finish the in-flight request on its own device.
		if err := st.Put64(c.VM, st.Go, 1); err != nil {
			t.Fatal(err)
		}
		if !st.WaitFor(5*time.Second, func() bool { return st.U64(c.VM, st.Phase) == 2 && st.U64(c.VM, st.Counter2) > 0 }) {
			t.Fatalf("clone %d: in-flight request did not complete (phase %d, used %d)", i, st.U64(c.VM, st.Phase), st.UsedIdx(c.VM))
		}
		if err := c.VM.Pause(); err != nil {
			t.Fatal(err)
		}
		if u := st.UsedIdx(c.VM); u != 2 {
			t.Fatalf("clone %d: used index %d, want 2 (queue position lost or replayed)", i, u)
		}
		if !bytes.Equal(mustSlice(t, c, st.Buf0, st.BufLen), buf0) {
			t.Fatalf("clone %d: request 1's buffer changed", i)
		}
		b1 := string(mustSlice(t, c, st.Buf1, st.BufLen))
		if b1 == string(make([]byte, st.BufLen)) {
			t.Fatalf("clone %d: request 2 buffer not filled", i)
		}
		if j, dup := seen[b1]; dup {
			t.Fatalf("clones %d and %d drew the same entropy", j, i)
		}
		seen[b1] = i
	}
	for i, c := range clones {
		if got := st.U64(c.VM, st.Mark); got != uint64(i+1) {
			t.Fatalf("clone %d sees mark %d: another clone's write leaked", i, got)
		}
		if st.U64(c.VM, st.Pattern+8*5000) != st.PatternValue {
			t.Fatalf("clone %d lost the pattern", i)
		}
	}
	if st.U64(orig.VM, st.Mark) != 0 || st.U64(orig.VM, st.Phase) != 1 {
		t.Fatal("clone writes reached the original")
	}
	if fileSum(t, memPath) != memSum {
		t.Fatal("clone writes reached the snapshot memory file")
	}
}

func mustSlice(t testing.TB, m *machine.Machine, gpa, n uint64) []byte {
	b, err := m.VM.Mem.Slice(gpa, n)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func openFDs(t *testing.T) int {
	e, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(e)
}

// TestCorruptSnapshotRefused damages the files of a good snapshot in
// every way we can think of: each restore must fail with a clear error
// and leave nothing behind.
func TestCorruptSnapshotRefused(t *testing.T) {
	good := t.TempDir()
	orig, _ := takeSnapshot(t, good)
	orig.VM.Close()
	state, err := os.ReadFile(filepath.Join(good, snapshot.StateFile))
	if err != nil {
		t.Fatal(err)
	}
	mem, err := os.ReadFile(filepath.Join(good, snapshot.MemoryFile))
	if err != nil {
		t.Fatal(err)
	}
	flip := func(i int) []byte { b := bytes.Clone(state); b[i] ^= 0x40; return b }
	for _, tc := range []struct {
		name  string
		state []byte
		mem   []byte
		kind  errs.Kind
		want  string
	}{
		{"empty", []byte{}, mem, errs.InvalidArgument, "truncated"},
		{"truncated-header", state[:10], mem, errs.InvalidArgument, "truncated"},
		{"truncated-half", state[:len(state)/2], mem, errs.InvalidArgument, "checksum"},
		{"truncated-trailer", state[:len(state)-1], mem, errs.InvalidArgument, "checksum"},
		{"bit-flip-body", flip(len(state) / 3), mem, errs.InvalidArgument, "checksum"},
		{"bit-flip-checksum", flip(len(state) - 1), mem, errs.InvalidArgument, "checksum"},
		{"bad-magic", flip(0), mem, errs.InvalidArgument, "magic"},
		{"future-version", func() []byte { b := bytes.Clone(state); b[8] = 9; return b }(), mem, errs.FailedPrecondition, "version"},
		{"appended-garbage", append(bytes.Clone(state), 1, 2, 3), mem, errs.InvalidArgument, "checksum"},
		{"memory-truncated", state, mem[:len(mem)/2], errs.InvalidArgument, "memory file"},
		{"memory-missing", state, nil, errs.FailedPrecondition, "memory file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, snapshot.StateFile), tc.state, 0o644); err != nil {
				t.Fatal(err)
			}
			if tc.mem != nil {
				if err := os.WriteFile(filepath.Join(dir, snapshot.MemoryFile), tc.mem, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			before := openFDs(t)
			m, s, err := snapshot.Restore(dir, st.Spec())
			if err == nil {
				m.VM.Close()
				t.Fatal("damaged snapshot was restored")
			}
			if m != nil || s != nil {
				t.Fatal("half-restored machine returned with the error")
			}
			if errs.KindOf(err) != tc.kind || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q (kind %s), want kind %s mentioning %q", err, errs.KindOf(err), tc.kind, tc.want)
			}
			if after := openFDs(t); after != before {
				t.Fatalf("%d fds before, %d after a refused restore", before, after)
			}
			t.Logf("refused: %v", err)
		})
	}
	// The same bytes, undamaged, restore fine.
	m, _, err := snapshot.Restore(good, st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	m.VM.Close()
}

// TestRestoreRefusesMismatchedMachine restores into a machine with a
// different device set: refused before any state is loaded.
func TestRestoreRefusesMismatchedMachine(t *testing.T) {
	dir := t.TempDir()
	orig, _ := takeSnapshot(t, dir)
	orig.VM.Close()
	spec := st.Spec()
	spec.Virtio = nil
	_, _, err := snapshot.Restore(dir, spec)
	if err == nil || errs.KindOf(err) != errs.FailedPrecondition || !strings.Contains(err.Error(), "rng") {
		t.Fatalf("restore into a machine without the rng device: %v", err)
	}
}

// TestPauseSnapshot takes a snapshot that leaves the VM paused, then
// resumes the restored copy.
func TestPauseSnapshot(t *testing.T) {
	needKVM(t)
	dir := t.TempDir()
	m, err := st.Boot(st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	if err := st.RunToPhase1(m); err != nil {
		t.Fatal(err)
	}
	if _, err := snapshot.Take(m.VM, dir, snapshot.Options{}); err != nil {
		t.Fatal(err)
	}
	c1 := st.U64(m.VM, st.Counter)
	time.Sleep(20 * time.Millisecond)
	if st.U64(m.VM, st.Counter) != c1 || m.VM.State().String() != "paused" {
		t.Fatalf("vm kept running after a pause snapshot (state %s)", m.VM.State())
	}
	defer m.VM.Close()
	c, _, err := snapshot.Restore(dir, st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer c.VM.Close()
	if st.U64(c.VM, st.Counter) != c1 {
		t.Fatalf("restored counter %d, paused at %d", st.U64(c.VM, st.Counter), c1)
	}
	if err := c.VM.Start(); err != nil {
		t.Fatal(err)
	}
	if !st.WaitFor(5*time.Second, func() bool { return st.U64(c.VM, st.Counter) > c1 }) {
		t.Fatal("restored vm did not run")
	}
	// The paused original resumed with a plain VM resume: its device
	// must work again (the snapshot quiesced it).
	if err := m.VM.Resume(); err != nil {
		t.Fatal(err)
	}
	st.Put64(m.VM, st.Go, 1)
	if !st.WaitFor(5*time.Second, func() bool { return st.U64(m.VM, st.Phase) == 2 }) {
		t.Fatalf("resumed original: in-flight request never completed (used %d): device left quiesced", st.UsedIdx(m.VM))
	}
}
