// Package conformance is the test suite every runtime.Runtime must pass:
// create from a template snapshot, exec through cube-agent, pause/resume
// with a file and a running process intact, fork two sandboxes from one
// and check that they diverge, and destroy leaving nothing behind. A
// runtime's own tests call Run with a Harness.
package conformance

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
)

// Harness is what the suite needs from a runtime's test.
type Harness struct {
	Runtime runtime.Runtime
	// Template is a template already baked in Runtime, with cube-agent.
	Template string
	// Footprint returns an opaque handle on what sandbox id holds on the
	// host (process ids, cgroups, namespaces, files), taken while it runs.
	Footprint func(id string) (any, error)
	// Leftovers lists what still exists of a footprint after Destroy.
	Leftovers func(fp any) []string
	// Timeout bounds each operation (default 60s).
	Timeout time.Duration
}

func newID(prefix string) string {
	var b [4]byte
	rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

// Run runs the suite as subtests of t.
func Run(t *testing.T, h Harness) {
	if h.Timeout == 0 {
		h.Timeout = 60 * time.Second
	}
	t.Run("CreateExecDestroy", func(t *testing.T) { testCreateExecDestroy(t, h) })
	t.Run("Errors", func(t *testing.T) { testErrors(t, h) })
	t.Run("PauseResume", func(t *testing.T) { testPauseResume(t, h) })
	t.Run("Fork", func(t *testing.T) { testFork(t, h) })
}

func (h Harness) ctx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), h.Timeout)
	t.Cleanup(cancel)
	return ctx
}

// create makes a sandbox that is destroyed when the test ends.
func (h Harness) create(t *testing.T, spec runtime.CreateSpec) runtime.Info {
	t.Helper()
	if spec.ID == "" {
		spec.ID = newID("conf")
	}
	if spec.TemplateID == "" && spec.SnapshotID == "" {
		spec.TemplateID = h.Template
	}
	info, err := h.Runtime.Create(h.ctx(t), spec)
	if err != nil {
		t.Fatalf("Create %s: %v", spec.ID, err)
	}
	t.Cleanup(func() { h.Runtime.Destroy(context.Background(), spec.ID) })
	if info.ID != spec.ID || info.State != runtime.StateRunning {
		t.Fatalf("Create returned %+v", info)
	}
	return info
}

// sh runs script in sandbox id and returns its stdout; a non-zero exit
// fails the test.
func (h Harness) sh(t *testing.T, id, script string) string {
	t.Helper()
	res, err := Exec(h.ctx(t), h.Runtime, id, script)
	if err != nil {
		t.Fatalf("exec %q in %s: %v", script, id, err)
	}
	if res.ExitCode != 0 {
		t.Fatalf("exec %q in %s: exit %d (%s), stderr %q", script, id, res.ExitCode, res.Status, res.Stderr)
	}
	return res.Stdout
}

func testCreateExecDestroy(t *testing.T, h Harness) {
	info := h.create(t, runtime.CreateSpec{Labels: map[string]string{"suite": "conformance"}})
	if got := h.sh(t, info.ID, "echo hello; echo oops >&2"); got != "hello\n" {
		t.Fatalf("stdout %q, want hello", got)
	}
	res, err := Exec(h.ctx(t), h.Runtime, info.ID, "exit 3")
	if err != nil || res.ExitCode != 3 {
		t.Fatalf("exit 3: %+v %v", res, err)
	}
	list, err := h.Runtime.List(h.ctx(t))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, i := range list {
		if i.ID == info.ID {
			found = i.State == runtime.StateRunning && i.Labels["suite"] == "conformance"
		}
	}
	if !found {
		t.Fatalf("List does not show %s running with its labels: %+v", info.ID, list)
	}
	st, err := h.Runtime.Stats(h.ctx(t), info.ID)
	if err != nil || st.MemUsed == 0 || st.MemTotal == 0 {
		t.Fatalf("Stats: %+v %v", st, err)
	}
	var fp any
	if h.Footprint != nil {
		if fp, err = h.Footprint(info.ID); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.Runtime.Destroy(h.ctx(t), info.ID); err != nil {
		t.Fatalf("Destroy: %v", err)
	}
	if h.Leftovers != nil {
		if l := h.Leftovers(fp); len(l) > 0 {
			t.Fatalf("Destroy left: %s", strings.Join(l, ", "))
		}
	}
	if err := h.Runtime.Destroy(h.ctx(t), info.ID); err != nil {
		t.Fatalf("second Destroy: %v", err)
	}
	if _, err := h.Runtime.Dial(h.ctx(t), info.ID, runtime.EnvdPort); !errs.Is(err, errs.NotFound) {
		t.Fatalf("Dial after Destroy: %v, want NotFound", err)
	}
	list, _ = h.Runtime.List(h.ctx(t))
	for _, i := range list {
		if i.ID == info.ID {
			t.Fatalf("List still shows %s", info.ID)
		}
	}
}

func testErrors(t *testing.T, h Harness) {
	ctx := h.ctx(t)
	if _, err := h.Runtime.Create(ctx, runtime.CreateSpec{ID: newID("conf"), TemplateID: "no-such-template"}); !errs.Is(err, errs.NotFound) {
		t.Errorf("unknown template: %v, want NotFound", err)
	}
	if _, err := h.Runtime.Create(ctx, runtime.CreateSpec{ID: "../bad id", TemplateID: h.Template}); !errs.Is(err, errs.InvalidArgument) {
		t.Errorf("bad id: %v, want InvalidArgument", err)
	}
	info := h.create(t, runtime.CreateSpec{})
	if _, err := h.Runtime.Create(ctx, runtime.CreateSpec{ID: info.ID, TemplateID: h.Template}); !errs.Is(err, errs.AlreadyExists) {
		t.Errorf("duplicate id: %v, want AlreadyExists", err)
	}
	if _, err := h.Runtime.Resume(ctx, info.ID, runtime.NetSlot{}); !errs.Is(err, errs.Conflict) {
		t.Errorf("resume running: %v, want Conflict", err)
	}
	if err := h.Runtime.Pause(ctx, "no-such-sandbox"); !errs.Is(err, errs.NotFound) {
		t.Errorf("pause unknown: %v, want NotFound", err)
	}
	if _, err := h.Runtime.Create(ctx, runtime.CreateSpec{ID: newID("conf"), SnapshotID: "no-such-snapshot"}); !errs.Is(err, errs.NotFound) {
		t.Errorf("unknown snapshot: %v, want NotFound", err)
	}
	// The failed creates left the good sandbox alone.
	h.sh(t, info.ID, "true")
}

func testPauseResume(t *testing.T, h Harness) {
	info := h.create(t, runtime.CreateSpec{})
	id := info.ID
	token := newID("tok")
	// A file, and a process that keeps state only in memory: it counts
	// and answers with its pid file still present.
	h.sh(t, id, fmt.Sprintf("echo %s > $HOME/marker && (sleep 100000 >/dev/null 2>&1 & echo $! > $HOME/sleep.pid)", token))
	pid := strings.TrimSpace(h.sh(t, id, "cat $HOME/sleep.pid"))
	t.Logf("%s: state written, pausing", id)
	if err := h.Runtime.Pause(h.ctx(t), id); err != nil {
		t.Fatalf("Pause: %v", err)
	}
	t.Logf("%s: paused", id)
	if err := h.Runtime.Pause(h.ctx(t), id); !errs.Is(err, errs.Conflict) {
		t.Fatalf("second Pause: %v, want Conflict", err)
	}
	list, _ := h.Runtime.List(h.ctx(t))
	paused := false
	for _, i := range list {
		paused = paused || (i.ID == id && i.State == runtime.StatePaused)
	}
	if !paused {
		t.Fatalf("List does not show %s paused: %+v", id, list)
	}
	if _, err := h.Runtime.Dial(h.ctx(t), id, runtime.EnvdPort); err == nil {
		t.Fatalf("Dial of a paused sandbox succeeded")
	}
	if _, err := h.Runtime.Resume(h.ctx(t), id, runtime.NetSlot{}); err != nil {
		t.Fatalf("Resume: %v", err)
	}
	t.Logf("%s: resumed", id)
	if got := strings.TrimSpace(h.sh(t, id, "cat $HOME/marker")); got != token {
		t.Fatalf("file after resume: %q, want %q", got, token)
	}
	if got := h.sh(t, id, "kill -0 "+pid+" && cat /proc/"+pid+"/cmdline | tr '\\0' ' '"); !strings.HasPrefix(got, "sleep 100000") {
		t.Fatalf("process %s after resume: %q", pid, got)
	}
	// And once more: a resumed sandbox pauses again.
	t.Logf("%s: state intact, second cycle", id)
	if err := h.Runtime.Pause(h.ctx(t), id); err != nil {
		t.Fatalf("second cycle Pause: %v", err)
	}
	if _, err := h.Runtime.Resume(h.ctx(t), id, runtime.NetSlot{}); err != nil {
		t.Fatalf("second cycle Resume: %v", err)
	}
	if got := strings.TrimSpace(h.sh(t, id, "cat $HOME/marker")); got != token {
		t.Fatalf("file after second resume: %q", got)
	}
}

func testFork(t *testing.T, h Harness) {
	parent := h.create(t, runtime.CreateSpec{})
	h.sh(t, parent.ID, "echo parent > $HOME/who && (sleep 100000 >/dev/null 2>&1 & echo $! > $HOME/sleep.pid)")
	snap := newID("snap")
	s, err := h.Runtime.Snapshot(h.ctx(t), parent.ID, snap)
	if err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	t.Cleanup(func() { h.Runtime.DeleteSnapshot(context.Background(), snap) })
	if s.ID != snap || s.SandboxID != parent.ID {
		t.Fatalf("Snapshot returned %+v", s)
	}
	// The parent keeps running.
	if got := strings.TrimSpace(h.sh(t, parent.ID, "cat $HOME/who")); got != "parent" {
		t.Fatalf("parent after snapshot: %q", got)
	}
	a := h.create(t, runtime.CreateSpec{SnapshotID: snap})
	b := h.create(t, runtime.CreateSpec{SnapshotID: snap})
	pid := strings.TrimSpace(h.sh(t, parent.ID, "cat $HOME/sleep.pid"))
	for _, c := range []runtime.Info{a, b} {
		if got := strings.TrimSpace(h.sh(t, c.ID, "cat $HOME/who")); got != "parent" {
			t.Fatalf("fork %s sees %q, want the parent's file", c.ID, got)
		}
		h.sh(t, c.ID, "kill -0 "+pid)
		h.sh(t, c.ID, "echo "+c.ID+" > $HOME/who")
	}
	h.sh(t, parent.ID, "echo parent2 > $HOME/who")
	for id, want := range map[string]string{a.ID: a.ID, b.ID: b.ID, parent.ID: "parent2"} {
		if got := strings.TrimSpace(h.sh(t, id, "cat $HOME/who")); got != want {
			t.Fatalf("%s: $HOME/who = %q, want %q (forks must diverge)", id, got, want)
		}
	}
	if err := h.Runtime.DeleteSnapshot(h.ctx(t), snap); err != nil {
		t.Fatalf("DeleteSnapshot: %v", err)
	}
	if _, err := h.Runtime.Create(h.ctx(t), runtime.CreateSpec{ID: newID("conf"), SnapshotID: snap}); !errs.Is(err, errs.NotFound) {
		t.Fatalf("create from deleted snapshot: %v", err)
	}
}
