package node_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/logging"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/store"
)

var tpl = &store.Template{ID: "base", EnvdVersion: "0.6.13", CPUCount: 1, MemoryMB: 256, DiskMB: 512, State: "ready"}

func setup(t *testing.T, capacity int) (*node.Node, *runtimetest.Fake, *store.Store) {
	t.Helper()
	ctx := context.Background()
	st, err := store.Open(ctx, t.TempDir(), "")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	rt, err := runtimetest.New("")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	rt.Handler = runtimetest.EnvdLike
	rt.BakeTemplate(ctx, runtime.Template{ID: "base"})
	n := node.New(node.Config{Capacity: capacity, ExpiryInterval: time.Hour}, rt, st, logging.Discard())
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Stop)
	return n, rt, st
}

func create(t *testing.T, n *node.Node, id string, mod ...func(*node.CreateRequest)) *store.Sandbox {
	t.Helper()
	req := node.CreateRequest{ID: id, KeyID: "k", Template: tpl, Timeout: time.Minute}
	for _, m := range mod {
		m(&req)
	}
	sb, err := n.Create(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	return sb
}

func TestLifecycle(t *testing.T) {
	ctx := context.Background()
	n, rt, st := setup(t, 4)
	sb := create(t, n, "a1")
	if sb.State != store.StateRunning || n.Free() != 3 {
		t.Fatalf("state %s free %d", sb.State, n.Free())
	}
	if err := n.Pause(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	if n.Free() != 4 {
		t.Fatal("paused sandbox still holds a slot")
	}
	if err := n.Pause(ctx, "a1"); !errs.Is(err, errs.Conflict) {
		t.Fatalf("pause twice: %v", err)
	}
	if _, err := n.Dial(ctx, "a1", 49983, false); !errs.Is(err, errs.NotFound) {
		t.Fatalf("dial paused: %v", err)
	}
	got, resumed, err := n.Connect(ctx, "a1", time.Minute)
	if err != nil || !resumed || got.State != store.StateRunning {
		t.Fatalf("connect: %v %v %v", got, resumed, err)
	}
	if _, err := n.Resume(ctx, "a1", time.Minute); !errs.Is(err, errs.Conflict) {
		t.Fatalf("resume running: %v", err)
	}
	c, err := n.Dial(ctx, "a1", 49983, false)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if err := n.Kill(ctx, "a1"); err != nil {
		t.Fatal(err)
	}
	if err := n.Kill(ctx, "a1"); !errs.Is(err, errs.NotFound) {
		t.Fatalf("kill twice: %v", err)
	}
	if l, _ := rt.List(ctx); len(l) != 0 {
		t.Fatalf("runtime still has %v", l)
	}
	evs, _ := st.ListEvents(ctx, "a1", "", false, 0)
	var path []string
	for _, e := range evs {
		path = append(path, string(e.To))
	}
	want := "[creating running pausing paused resuming running killed]"
	if fmt.Sprint(path) != want {
		t.Fatalf("events %v, want %s", path, want)
	}
	rec, _ := st.GetSandbox(ctx, "a1")
	if rec.State != store.StateKilled || rec.EndedAt.IsZero() {
		t.Fatalf("record %+v", rec)
	}
}

func TestCreateFailureLeavesNothing(t *testing.T) {
	ctx := context.Background()
	n, rt, st := setup(t, 2)
	rt.FailCreate = func(runtime.CreateSpec) error { return errs.E(errs.Internal, "runsc crashed") }
	if _, err := n.Create(ctx, node.CreateRequest{ID: "f1", Template: tpl, Timeout: time.Minute}); err == nil {
		t.Fatal("create succeeded")
	}
	if n.Free() != 2 || rt.Calls("Destroy") != 1 {
		t.Fatalf("free %d destroy %d", n.Free(), rt.Calls("Destroy"))
	}
	rec, _ := st.GetSandbox(ctx, "f1")
	if rec.State != store.StateFailed || rec.Reason == "" {
		t.Fatalf("%+v", rec)
	}
	if _, err := n.Get("f1"); !errs.Is(err, errs.NotFound) {
		t.Fatal("failed sandbox visible")
	}
	// Unknown template in the runtime.
	rt.FailCreate = nil
	if _, err := n.Create(ctx, node.CreateRequest{ID: "f2", Template: &store.Template{ID: "nope"}, Timeout: time.Minute}); !errs.Is(err, errs.NotFound) {
		t.Fatalf("unbaked template: %v", err)
	}
}

// Concurrent creates never exceed capacity; the rest get ResourceExhausted
// with a retry hint.
func TestCapacityUnderConcurrency(t *testing.T) {
	n, rt, _ := setup(t, 5)
	rt.CreateDelay = 20 * time.Millisecond
	var ok, full atomic.Int32
	var wg sync.WaitGroup
	for i := 0; i < 30; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			_, err := n.Create(context.Background(), node.CreateRequest{ID: fmt.Sprintf("c%d", i), Template: tpl, Timeout: time.Minute})
			switch {
			case err == nil:
				ok.Add(1)
			case errs.Is(err, errs.ResourceExhausted) && errs.RetryAfterOf(err) > 0:
				full.Add(1)
			default:
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	if ok.Load() != 5 || full.Load() != 25 {
		t.Fatalf("ok %d full %d", ok.Load(), full.Load())
	}
	if l, _ := rt.List(context.Background()); len(l) != 5 {
		t.Fatalf("runtime has %d", len(l))
	}
}

// Kill, pause and resume racing on one sandbox end in a consistent state:
// the store, the cache and the runtime agree.
func TestRacingOperations(t *testing.T) {
	ctx := context.Background()
	for round := 0; round < 20; round++ {
		n, rt, st := setup(t, 4)
		create(t, n, "r")
		var wg sync.WaitGroup
		ops := []func() error{
			func() error { return n.Pause(ctx, "r") },
			func() error { _, err := n.Resume(ctx, "r", time.Minute); return err },
			func() error { _, _, err := n.Connect(ctx, "r", time.Minute); return err },
			func() error { return n.Kill(ctx, "r") },
			func() error { return n.Pause(ctx, "r") },
			func() error { return n.SetTimeout(ctx, "r", time.Minute) },
		}
		for _, op := range ops {
			wg.Add(1)
			go func(op func() error) {
				defer wg.Done()
				if err := op(); err != nil && !errs.Is(err, errs.Conflict) && !errs.Is(err, errs.NotFound) {
					t.Errorf("unexpected error %v", err)
				}
			}(op)
		}
		wg.Wait()
		rec, _ := st.GetSandbox(ctx, "r")
		infos, _ := rt.List(ctx)
		switch rec.State {
		case store.StateKilled:
			if len(infos) != 0 {
				t.Fatalf("killed but runtime has %v", infos)
			}
			if n.Free() != 4 {
				t.Fatalf("killed but slot held")
			}
		case store.StateRunning, store.StatePaused:
			if len(infos) != 1 || string(infos[0].State) != string(rec.State) {
				t.Fatalf("store %s runtime %v", rec.State, infos)
			}
		default:
			t.Fatalf("ended in %s", rec.State)
		}
	}
}

func TestExpiry(t *testing.T) {
	ctx := context.Background()
	n, rt, st := setup(t, 4)
	now := time.Now()
	n.SetClock(func() time.Time { return now })
	create(t, n, "k1")
	create(t, n, "p1", func(r *node.CreateRequest) { r.AutoPause = true })
	create(t, n, "s1")
	n.SetTimeout(ctx, "s1", 10*time.Minute) // extends past the others
	create(t, n, "short")
	n.SetTimeout(ctx, "short", 0) // shortens: expires now
	n.ExpireNow(ctx)
	if _, err := n.Get("short"); !errs.Is(err, errs.NotFound) {
		t.Fatal("setTimeout(0) did not expire")
	}
	now = now.Add(2 * time.Minute)
	n.ExpireNow(ctx)
	if _, err := n.Get("k1"); !errs.Is(err, errs.NotFound) {
		t.Fatal("k1 not killed")
	}
	if sb, _ := n.Get("p1"); sb == nil || sb.State != store.StatePaused {
		t.Fatalf("p1 not paused: %+v", sb)
	}
	if sb, _ := n.Get("s1"); sb.State != store.StateRunning {
		t.Fatal("s1 expired early")
	}
	// Paused sandboxes never expire.
	now = now.Add(48 * time.Hour)
	n.ExpireNow(ctx)
	if sb, _ := n.Get("p1"); sb == nil || sb.State != store.StatePaused {
		t.Fatal("paused sandbox expired")
	}
	if _, err := n.Get("s1"); err == nil {
		t.Fatal("s1 not expired")
	}
	rec, _ := st.GetSandbox(ctx, "k1")
	if rec.State != store.StateKilled {
		t.Fatal(rec.State)
	}
	if l, _ := rt.List(ctx); len(l) != 1 {
		t.Fatalf("runtime: %v", l)
	}
}

// After a crash: running and paused sandboxes are re-adopted, one caught
// mid-create is failed and destroyed, one the runtime lost is failed, an
// orphan in the runtime is destroyed.
func TestReconcile(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rt, _ := runtimetest.New(dir)
	defer rt.Close()
	rt.BakeTemplate(ctx, runtime.Template{ID: "base"})
	n1 := node.New(node.Config{Capacity: 4}, rt, st, logging.Discard())
	n1.Start(ctx)
	create(t, n1, "run")
	create(t, n1, "pau")
	n1.Pause(ctx, "pau")
	create(t, n1, "lost")
	n1.Stop() // the process "dies": no cleanup
	rt.Forget("lost")
	rt.Adopt(runtime.Info{ID: "orphan", TemplateID: "base", State: runtime.StateRunning})
	// A sandbox caught mid-create.
	st.CreateSandbox(ctx, &store.Sandbox{ID: "half", NodeID: "local", State: store.StateCreating, StartedAt: time.Now(), EndAt: time.Now().Add(time.Hour)})
	rt.Adopt(runtime.Info{ID: "half", TemplateID: "base", State: runtime.StateRunning})

	// A new process: new runtime view of the same state dir.
	rt2, _ := runtimetest.New(dir)
	defer rt2.Close()
	rt2.Handler = runtimetest.EnvdLike
	n2 := node.New(node.Config{Capacity: 4, ExpiryInterval: time.Hour}, rt2, st, logging.Discard())
	rep, err := n2.ReconcileReport(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(sorted(rep.Adopted)) != "[pau run]" || fmt.Sprint(sorted(rep.Failed)) != "[half lost]" || fmt.Sprint(rep.Destroyed) != "[orphan]" {
		t.Fatalf("report %+v", rep)
	}
	if n2.Free() != 3 {
		t.Fatalf("free %d", n2.Free())
	}
	if c, err := n2.Dial(ctx, "run", 49983, false); err != nil {
		t.Fatal(err)
	} else {
		c.Close()
	}
	if _, err := n2.Resume(ctx, "pau", time.Minute); err != nil {
		t.Fatal("paused sandbox not resumable after restart: ", err)
	}
	infos, _ := rt2.List(ctx)
	if len(infos) != 2 {
		t.Fatalf("runtime after reconcile: %v", infos)
	}
	for _, id := range []string{"half", "lost"} {
		rec, _ := st.GetSandbox(ctx, id)
		if rec.State != store.StateFailed {
			t.Fatalf("%s: %s", id, rec.State)
		}
	}
	// Idempotent.
	rep, _ = n2.ReconcileReport(ctx)
	if len(rep.Failed)+len(rep.Destroyed) != 0 {
		t.Fatalf("second reconcile %+v", rep)
	}
}

func sorted(s []string) []string {
	out := append([]string{}, s...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j] < out[i] {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

func TestTransitions(t *testing.T) {
	if !node.Allowed(store.StateRunning, store.StatePausing) || node.Allowed(store.StateKilled, store.StateRunning) ||
		node.Allowed(store.StatePaused, store.StateRunning) || node.Allowed(store.StateCreating, store.StatePaused) {
		t.Fatal("transition table")
	}
}

var _ = errors.New

// policyRT is the fake runtime plus the netslot wrapper's policy methods.
type policyRT struct {
	*runtimetest.Fake
	mu       sync.Mutex
	policies map[string]network.Policy
}

func (p *policyRT) CreateWithPolicy(ctx context.Context, spec runtime.CreateSpec, pol network.Policy) (runtime.Info, error) {
	info, err := p.Fake.Create(ctx, spec)
	if err == nil {
		p.mu.Lock()
		p.policies[spec.ID] = pol
		p.mu.Unlock()
	}
	return info, err
}

func (p *policyRT) SetPolicy(id string, pol network.Policy) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.policies[id]; !ok {
		return errs.E(errs.NotFound, "sandbox %q", id)
	}
	p.policies[id] = pol
	return nil
}

// The create-time policy and PUT /network reach a runtime that keeps
// sandboxes in network slots.
func TestNetworkPolicy(t *testing.T) {
	ctx := context.Background()
	st, _ := store.Open(ctx, t.TempDir(), "")
	defer st.Close()
	f, _ := runtimetest.New("")
	defer f.Close()
	f.BakeTemplate(ctx, runtime.Template{ID: "base"})
	rt := &policyRT{Fake: f, policies: map[string]network.Policy{}}
	n := node.New(node.Config{Capacity: 4, ExpiryInterval: time.Hour}, rt, st, logging.Discard())
	n.Start(ctx)
	defer n.Stop()
	no := false
	create(t, n, "a", func(r *node.CreateRequest) {
		r.AllowInternet = &no
		r.Network = store.Network{AllowOut: []string{"1.1.1.1"}}
	})
	if p := rt.policies["a"]; p.AllowInternetAccess == nil || *p.AllowInternetAccess || fmt.Sprint(p.AllowOut) != "[1.1.1.1]" {
		t.Fatalf("create policy %+v", p)
	}
	if err := n.SetNetwork(ctx, "a", nil, store.Network{DenyOut: []string{"8.8.8.8"}}); err != nil {
		t.Fatal(err)
	}
	if p := rt.policies["a"]; p.AllowInternetAccess != nil || fmt.Sprint(p.DenyOut) != "[8.8.8.8]" {
		t.Fatalf("updated policy %+v", p)
	}
	rec, _ := st.GetSandbox(ctx, "a")
	if fmt.Sprint(rec.Network.DenyOut) != "[8.8.8.8]" {
		t.Fatalf("stored %+v", rec.Network)
	}
}

func TestSnapshotAndCreateFromIt(t *testing.T) {
	ctx := context.Background()
	n, rt, st := setup(t, 4)
	parent := create(t, n, "p1", func(r *node.CreateRequest) { r.EnvdToken = "t1" })
	snap, err := n.Snapshot(ctx, "p1", "s1")
	if err != nil || snap.ID != "s1" || snap.SandboxID != "p1" {
		t.Fatalf("snapshot %+v %v", snap, err)
	}
	// The parent runs on, its end time untouched.
	if got, _ := n.Get("p1"); got.State != store.StateRunning || !got.EndAt.Equal(parent.EndAt) {
		t.Fatalf("parent after snapshot %+v", got)
	}
	var spec runtime.CreateSpec
	rt.FailCreate = func(s runtime.CreateSpec) error { spec = s; return nil }
	c := create(t, n, "c1", func(r *node.CreateRequest) {
		r.SnapshotID, r.SnapshotAccessToken, r.EnvdToken = "s1", "t1", "t2"
	})
	if c.State != store.StateRunning || spec.SnapshotID != "s1" || spec.SnapshotAccessToken != "t1" || spec.AccessToken != "t2" {
		t.Fatalf("create from snapshot: %+v, spec %+v", c, spec)
	}
	evs, _ := st.ListEvents(ctx, "p1", "", false, 0)
	if last := evs[len(evs)-1]; last.Kind != "snapshot" {
		t.Fatalf("no snapshot event: %+v", last)
	}
	if _, err := n.Snapshot(ctx, "p1", "s1"); !errs.Is(err, errs.AlreadyExists) {
		t.Fatalf("same snapshot id twice: %v", err)
	}
	if _, err := n.Snapshot(ctx, "nope", "s2"); !errs.Is(err, errs.NotFound) {
		t.Fatalf("unknown sandbox: %v", err)
	}
	if err := n.Pause(ctx, "p1"); err != nil {
		t.Fatal(err)
	}
	// A paused sandbox: the fake snapshots only running ones, so the node
	// resumes it, snapshots and pauses it again; that needs a free slot.
	for _, id := range []string{"f1", "f2", "f3"} {
		create(t, n, id)
	}
	if _, err := n.Snapshot(ctx, "p1", "s3"); !errs.Is(err, errs.ResourceExhausted) {
		t.Fatalf("paused sandbox on a full node: %v", err)
	}
	if got, _ := n.Get("p1"); got.State != store.StatePaused || n.Free() != 0 {
		t.Fatalf("after a refused snapshot: %+v, free %d", got, n.Free())
	}
	if err := n.Kill(ctx, "f3"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Snapshot(ctx, "p1", "s3"); err != nil {
		t.Fatalf("paused sandbox: %v", err)
	}
	if got, _ := n.Get("p1"); got.State != store.StatePaused || n.Free() != 1 {
		t.Fatalf("after the snapshot of a paused sandbox: %+v, free %d", got, n.Free())
	}
	if got := rt.Snapshots(); fmt.Sprint(got) != "[s1 s3]" {
		t.Fatalf("runtime snapshots %v", got)
	}
	if _, err := n.Resume(ctx, "p1", time.Minute); err != nil {
		t.Fatalf("resume after snapshot: %v", err)
	}
	for _, id := range []string{"p1", "f1", "f2"} {
		n.Kill(ctx, id)
	}
	if err := n.DeleteSnapshot(ctx, "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := n.Create(ctx, node.CreateRequest{ID: "c2", KeyID: "k", Template: tpl, Timeout: time.Minute, SnapshotID: "s1"}); !errs.Is(err, errs.NotFound) {
		t.Fatalf("create from a deleted snapshot: %v", err)
	}
	if n.Free() != 3 {
		t.Fatalf("free %d: the failed create kept its slot", n.Free())
	}
}
