//go:build linux

package snapshot_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/machine"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

const serveEnv = "CUBE_SNAPTEST_SERVE"

func TestMain(m *testing.M) {
	if p := os.Getenv(serveEnv); p != "" {
		if err := st.Serve(p, os.Getenv(serveEnv+"_PREPARE")); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	code := m.Run()
	for _, d := range builtDirs {
		os.RemoveAll(d)
	}
	os.Exit(code)
}

// prestart starts n pre-started VMM processes (this test binary in
// serve mode) and returns their clients and processes.
func prestart(t *testing.T, n int, prepare string) ([]*vmmapi.Client, []*exec.Cmd) {
	t.Helper()
	dir := t.TempDir()
	var cls []*vmmapi.Client
	var cmds []*exec.Cmd
	t.Cleanup(func() {
		for _, c := range cmds {
			c.Process.Kill()
			c.Wait()
		}
	})
	for i := 0; i < n; i++ {
		sock := filepath.Join(dir, fmt.Sprintf("vmm-%d.sock", i))
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), serveEnv+"="+sock, serveEnv+"_PREPARE="+prepare)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
		cls = append(cls, vmmapi.NewClient(sock))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, c := range cls {
		if _, err := c.WaitReady(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return cls, cmds
}

// TestPrestartedVMMs restores one snapshot in separate pre-started VMM
// processes over the control socket and accounts their memory (PSS from
// /proc/PID/smaps_rollup): the clones share the snapshot's page cache.
func TestPrestartedVMMs(t *testing.T) {
	needKVM(t)
	dir := t.TempDir()
	orig, _ := takeSnapshot(t, dir)
	orig.VM.Close()
	n := 10
	cls, cmds := prestart(t, n, dir)
	ctx := context.Background()
	var total st.Mem
	for i, c := range cls {
		rep, err := c.Restore(ctx, vmmapi.RestoreRequest{Dir: dir, WaitWord: st.Counter})
		if err != nil {
			t.Fatalf("vmm %d: %v", i, err)
		}
		if rep.Status.State != "running" {
			t.Fatalf("vmm %d: state %s after restore", i, rep.Status.State)
		}
		if _, err := c.Pause(ctx); err != nil {
			t.Fatal(err)
		}
		t.Logf("clone %d restored to running in %.2f ms (in the VMM)", i, rep.RestoreMillis)
	}
	for i, cmd := range cmds {
		m, err := st.ReadMem(cmd.Process.Pid)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("clone %d: RSS %.1f MiB, PSS %.1f MiB (anon %.1f, file %.1f)", i,
			mib(m.RSS), mib(m.PSS), mib(m.PSSAnon), mib(m.PSSFile))
		total.RSS += m.RSS
		total.PSS += m.PSS
	}
	t.Logf("%d clones: RSS sum %.1f MiB, PSS sum %.1f MiB, PSS per clone %.2f MiB",
		n, mib(total.RSS), mib(total.PSS), mib(total.PSS)/float64(n))
	if total.PSS >= total.RSS {
		t.Fatalf("clones share nothing: PSS %d >= RSS %d", total.PSS, total.RSS)
	}

	// A second restore into a busy VMM is refused; so is a bad snapshot.
	if _, err := cls[0].Restore(ctx, vmmapi.RestoreRequest{Dir: dir}); errs.KindOf(err) != errs.Conflict {
		t.Fatalf("restore into a busy VMM: %v", err)
	}
	bad := t.TempDir()
	os.WriteFile(filepath.Join(bad, snapshot.StateFile), []byte("CUBESNAP garbage"), 0o644)
	extra, _ := prestart(t, 1, "")
	if _, err := extra[0].Restore(ctx, vmmapi.RestoreRequest{Dir: bad}); errs.KindOf(err) != errs.InvalidArgument {
		t.Fatalf("restore of a corrupt snapshot: %v", err)
	}
	// The refused VMM is still empty and usable.
	if rep, err := extra[0].Restore(ctx, vmmapi.RestoreRequest{Dir: dir, WaitWord: st.Counter}); err != nil || rep.Status.State != "running" {
		t.Fatalf("restore after a refused one: %+v %v", rep, err)
	}

	// Fork over the control socket, then stop every VMM.
	fork := t.TempDir()
	if _, err := cls[1].Resume(ctx); err != nil {
		t.Fatal(err)
	}
	rep, err := cls[1].Snapshot(ctx, vmmapi.SnapshotRequest{Dir: fork, Resume: true})
	if err != nil || rep.Status.State != "running" {
		t.Fatalf("fork snapshot: %+v %v", rep, err)
	}
	if _, err := snapshot.Load(fork); err != nil {
		t.Fatal(err)
	}
	for _, c := range append(cls, extra...) {
		c.Stop(ctx)
	}
	for _, cmd := range cmds {
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("VMM did not exit after stop")
		}
	}
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

// TestDiffSnapshot pauses a restored clone into a diff layer: only the
// pages it (and its device) changed are written, and restoring the diff
// gives back the clone's state; a second diff stacks a second layer.
func TestDiffSnapshot(t *testing.T) {
	dir := t.TempDir()
	orig, _ := takeSnapshot(t, dir)
	orig.VM.Close()
	c, base, err := snapshot.Restore(dir, st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer c.VM.Close()
	if err := c.VM.Start(); err != nil {
		t.Fatal(err)
	}
	st.Put64(c.VM, st.Mark, 0xfeed)
	st.Put64(c.VM, st.Go, 1)
	if !st.WaitFor(5*time.Second, func() bool { return st.U64(c.VM, st.Phase) == 2 && st.U64(c.VM, st.Counter2) > 0 }) {
		t.Fatal("clone did not reach phase 2")
	}
	d1 := t.TempDir()
	res, err := snapshot.TakeDiff(c.VM, dir, base, d1, snapshot.Options{})
	if err != nil {
		t.Fatal(err)
	}
	pages := map[uint64]bool{}
	for _, r := range res.State.Meta.Layers[0].Runs {
		for p := r.Page; p < r.Page+r.Count; p++ {
			pages[p] = true
		}
	}
	// Guest writes (counters), host writes (mark), device writes (used
	// ring, request 2's buffer) are all in the layer.
	for _, gpa := range []uint64{st.Counter, st.Mark, st.Used, st.Buf1} {
		if !pages[gpa/4096] {
			t.Errorf("page of %#x missing from the diff (pages %v)", gpa, pages)
		}
	}
	if pages[st.Pattern/4096] {
		t.Error("untouched pattern page in the diff")
	}
	t.Logf("diff: %d runs, %d bytes of %d MiB", res.Runs, res.WrittenBytes, st.MemSize>>20)
	if res.WrittenBytes > 256<<10 {
		t.Fatalf("diff wrote %d bytes", res.WrittenBytes)
	}
	want := func(m *machine.Machine, label string) {
		t.Helper()
		if st.U64(m.VM, st.Mark) != 0xfeed || st.U64(m.VM, st.Phase) != 2 || st.UsedIdx(m.VM) != 2 ||
			st.U64(m.VM, st.Pattern+8*77) != st.PatternValue ||
			!bytes.Equal(mustSlice(t, m, st.Buf1, st.BufLen), mustSlice(t, c, st.Buf1, st.BufLen)) {
			t.Fatalf("%s: restored diff lost state (mark %#x phase %d used %d)", label,
				st.U64(m.VM, st.Mark), st.U64(m.VM, st.Phase), st.UsedIdx(m.VM))
		}
	}
	r1, s1, err := snapshot.Restore(d1, st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer r1.VM.Close()
	want(r1, "layer 1")
	c2 := st.U64(r1.VM, st.Counter2)
	if err := r1.VM.Start(); err != nil {
		t.Fatal(err)
	}
	if !st.WaitFor(5*time.Second, func() bool { return st.U64(r1.VM, st.Counter2) > c2 }) {
		t.Fatal("diff-restored vm does not run")
	}
	st.Put64(r1.VM, st.Mark+8, 0xbeef)
	d2 := t.TempDir()
	res2, err := snapshot.TakeDiff(r1.VM, d1, s1, d2, snapshot.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(res2.State.Meta.Layers) != 2 {
		t.Fatalf("second diff has %d layers", len(res2.State.Meta.Layers))
	}
	r2, _, err := snapshot.Restore(d2, st.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer r2.VM.Close()
	want(r2, "layer 2")
	if st.U64(r2.VM, st.Mark+8) != 0xbeef {
		t.Fatal("second layer's write lost")
	}
	if st.U64(r2.VM, st.Counter2) < st.U64(r1.VM, st.Counter2)-1 && st.U64(r2.VM, st.Counter2) <= c2 {
		t.Fatal("second layer has the first layer's counter")
	}
}
