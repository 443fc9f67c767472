//go:build linux

package gvisor

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/network"

	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
)

func runscPath(t testing.TB) string {
	if os.Geteuid() != 0 {
		t.Skip("gvisor runtime tests need root (netns, cgroups)")
	}
	for _, p := range []string{os.Getenv("CUBE_RUNSC"), filepath.Join(cacheDir(), "bin", "runsc")} {
		if p != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	t.Skip("runsc not built: run `make runsc` (mk/runsc.mk)")
	return ""
}

func cacheDir() string {
	if d := os.Getenv("CUBE_CACHE_DIR"); d != "" {
		return d
	}
	return "/var/cache/cube"
}

func newRuntime(t testing.TB, pool int) *Runtime {
	rt, err := New(context.Background(), Options{DataDir: t.TempDir(), RunscPath: runscPath(t), PoolSize: pool})
	if err != nil {
		t.Fatal(err)
	}
	cleanupAll(t, rt)
	return rt
}

// cleanupAll destroys whatever rt still runs when the test ends (a failed
// test included), then closes it.
func cleanupAll(t testing.TB, rt *Runtime) {
	t.Cleanup(func() {
		list, _ := rt.List(context.Background())
		for _, i := range list {
			rt.Destroy(context.Background(), i.ID)
		}
		rt.Close()
	})
}

func harness(rt *Runtime, tid string) conformance.Harness {
	return conformance.Harness{
		Runtime:  rt,
		Template: tid,
		Footprint: func(id string) (any, error) {
			return rt.Inspect(id)
		},
		Leftovers: func(fp any) []string {
			res := fp.(Resources)
			l := rt.Leftovers(res.CID)
			if _, err := os.Stat(res.Dir); err == nil {
				l = append(l, res.Dir)
			}
			return l
		},
	}
}

func TestConformance(t *testing.T) {
	rt := newRuntime(t, 0)
	conformance.Run(t, harness(rt, bakeBase(t, rt)))
	if l := rt.Leaks(); len(l) > 0 {
		t.Fatalf("leaks: %v", l)
	}
}

func noLeaks(t *testing.T, rt *Runtime) {
	t.Helper()
	if l := rt.Leaks(); len(l) > 0 {
		t.Fatalf("leaks: %v", l)
	}
}

func TestWarmPool(t *testing.T) {
	rt := newRuntime(t, 2)
	tid := bakeBase(t, rt)
	waitPool := func(n int) {
		deadline := time.Now().Add(60 * time.Second)
		for rt.pool.count(tid) < n {
			if time.Now().After(deadline) {
				t.Fatalf("pool has %d, want %d", rt.pool.count(tid), n)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	waitPool(2)
	ctx := context.Background()
	info, err := rt.Create(ctx, runtime.CreateSpec{ID: "pooled", TemplateID: tid, Resources: runtime.Resources{MemoryMB: 300, CPUCount: 1}})
	if err != nil {
		t.Fatal(err)
	}
	if info.Resources.MemoryMB != 300 {
		t.Fatalf("resources %+v", info.Resources)
	}
	res, err := conformance.Exec(ctx, rt, "pooled", "echo pooled")
	if err != nil || res.Stdout != "pooled\n" {
		t.Fatalf("exec: %+v %v", res, err)
	}
	st, err := rt.Stats(ctx, "pooled")
	if err != nil || st.MemTotal != 300<<20 {
		t.Fatalf("stats %+v %v (limit not applied to a pooled sandbox)", st, err)
	}
	waitPool(2) // refilled in the background
	rt.Close()
	noLeaks(t, rt)
	if err := rt.Destroy(ctx, "pooled"); err != nil {
		t.Fatal(err)
	}
	noLeaks(t, rt)
}

func TestReadoptAfterRestart(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	rt1, err := New(ctx, Options{DataDir: dir, RunscPath: runscPath(t)})
	if err != nil {
		t.Fatal(err)
	}
	cleanupAll(t, rt1)
	tid := bakeBase(t, rt1)
	for _, id := range []string{"keep", "sleepy", "crashed"} {
		if _, err := rt1.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: tid}); err != nil {
			t.Fatal(err)
		}
	}
	conformance.Exec(ctx, rt1, "keep", "echo kept > $HOME/f")
	if err := rt1.Pause(ctx, "sleepy"); err != nil {
		t.Fatal(err)
	}
	// "crashed" loses its state file, as if cube died mid-create.
	crashedCID := rt1.sandboxes["crashed"].meta.CID
	os.RemoveAll(filepath.Join(dir, "gvisor", "sandboxes", "crashed"))
	rt1.Close()

	rt2 := newRuntimeAt(t, dir)
	list, _ := rt2.List(ctx)
	got := map[string]runtime.State{}
	for _, i := range list {
		got[i.ID] = i.State
	}
	if got["keep"] != runtime.StateRunning || got["sleepy"] != runtime.StatePaused || len(got) != 2 {
		t.Fatalf("after restart: %v", got)
	}
	if l := rt2.Leftovers(crashedCID); len(l) > 0 {
		t.Fatalf("orphan not cleaned: %v", l)
	}
	res, err := conformance.Exec(ctx, rt2, "keep", "cat $HOME/f")
	if err != nil || res.Stdout != "kept\n" {
		t.Fatalf("re-adopted sandbox: %+v %v", res, err)
	}
	if _, err := rt2.Resume(ctx, "sleepy", runtime.NetSlot{}); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"keep", "sleepy"} {
		if err := rt2.Destroy(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
	noLeaks(t, rt2)
}

func newRuntimeAt(t *testing.T, dir string) *Runtime {
	rt, err := New(context.Background(), Options{DataDir: dir, RunscPath: runscPath(t)})
	if err != nil {
		t.Fatal(err)
	}
	cleanupAll(t, rt)
	return rt
}

// A runsc that dies in the middle of a restore: a typed error, nothing left.
func TestRunscKilledMidCreate(t *testing.T) {
	rt := newRuntime(t, 0)
	tid := bakeBase(t, rt)
	ctx := context.Background()
	errc := make(chan error, 1)
	go func() {
		_, err := rt.Create(ctx, runtime.CreateSpec{ID: "victim", TemplateID: tid})
		errc <- err
	}()
	killed := false
	for !killed {
		select {
		case err := <-errc:
			t.Skipf("restore finished before it could be killed (err %v)", err)
		default:
		}
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			b, _ := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if strings.Contains(string(b), "--root="+rt.runsc.root) && strings.Contains(string(b), "\x00restore\x00") {
				pid, _ := strconv.Atoi(e.Name())
				syscall.Kill(pid, syscall.SIGKILL)
				killed = true
			}
		}
	}
	err := <-errc
	if err == nil {
		t.Fatal("Create succeeded though runsc was killed")
	}
	t.Logf("error: %v", err)
	if _, err := rt.Dial(ctx, "victim", runtime.EnvdPort); !errs.Is(err, errs.NotFound) {
		t.Fatalf("victim still known: %v", err)
	}
	noLeaks(t, rt)
	// The runtime keeps serving.
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "after", TemplateID: tid}); err != nil {
		t.Fatal(err)
	}
	rt.Destroy(ctx, "after")
	noLeaks(t, rt)
}

// A template whose probe never answers fails with the reason and leaves
// nothing; one whose init exits fails fast.
func TestBakeFailures(t *testing.T) {
	rt := newRuntime(t, 0)
	tid := bakeBase(t, rt)
	ctx := context.Background()
	rootfs := rt.mustTemplate(t, tid).Bundle.RootfsDir
	tctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	err := rt.BakeTemplate(tctx, runtime.Template{ID: "deaf", RootfsDir: rootfs, ProbePort: 4321})
	if !errs.Is(err, errs.FailedPrecondition) || !strings.Contains(err.Error(), "probe") {
		t.Fatalf("deaf probe: %v", err)
	}
	noLeaks(t, rt)
	start := time.Now()
	err = rt.BakeTemplate(ctx, runtime.Template{ID: "quitter", RootfsDir: rootfs, Cmd: []string{"/bin/false"}})
	if err == nil || !strings.Contains(err.Error(), "exited") {
		t.Fatalf("exiting init: %v", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("exiting init detected after %s", d)
	}
	noLeaks(t, rt)
	for _, id := range []string{"deaf", "quitter"} {
		if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "x-" + id, TemplateID: id}); !errs.Is(err, errs.NotFound) {
			t.Fatalf("create from failed template %s: %v", id, err)
		}
	}
	// A template in use cannot be deleted.
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "user", TemplateID: tid}); err != nil {
		t.Fatal(err)
	}
	if err := rt.DeleteTemplate(ctx, tid); !errs.Is(err, errs.Conflict) {
		t.Fatalf("delete template in use: %v", err)
	}
	rt.Destroy(ctx, "user")
	if err := rt.DeleteTemplate(ctx, tid); err != nil {
		t.Fatal(err)
	}
	noLeaks(t, rt)
}

func (r *Runtime) mustTemplate(t *testing.T, id string) *templateMeta {
	m, err := r.loadTemplate(id)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// testSlots is a SlotProvider made of this package's plain namespaces: it
// exercises the runtime's slot lifecycle (acquire, release, dial through
// the provider) without internal/network.
type testSlots struct {
	mu       sync.Mutex
	n        int
	live     map[string]string // id -> netns path
	acquired int
	released int
}

func (p *testSlots) Acquire(ctx context.Context) (runtime.NetSlot, error) {
	p.mu.Lock()
	p.n++
	id := fmt.Sprintf("%stestslot-%d-%d", netnsPrefix, os.Getpid(), p.n)
	p.mu.Unlock()
	path, err := createPlainNetns(id)
	if err != nil {
		return runtime.NetSlot{}, err
	}
	p.mu.Lock()
	p.live[id] = path
	p.acquired++
	p.mu.Unlock()
	return runtime.NetSlot{ID: id, NetnsPath: path, GuestIP: plainGuestIP, GatewayIP: plainHostIP, PrefixLen: plainPrefix}, nil
}

func (p *testSlots) Release(ctx context.Context, id string) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, ok := p.live[id]; !ok {
		return errs.E(errs.NotFound, "slot %s", id)
	}
	delete(p.live, id)
	p.released++
	return deleteNetns(id)
}

func (p *testSlots) Dial(ctx context.Context, id string, port int) (net.Conn, error) {
	p.mu.Lock()
	path, ok := p.live[id]
	p.mu.Unlock()
	if !ok {
		return nil, errs.E(errs.NotFound, "slot %s", id)
	}
	if err := plainNetnsStarted(path); err != nil {
		return nil, err
	}
	return dialInNetns(ctx, path, net.JoinHostPort(plainGuestIP, strconv.Itoa(port)))
}

func TestSlotProvider(t *testing.T) {
	slots := &testSlots{live: map[string]string{}}
	rt, err := New(context.Background(), Options{DataDir: t.TempDir(), RunscPath: runscPath(t), PoolSize: 1, Slots: slots})
	if err != nil {
		t.Fatal(err)
	}
	cleanupAll(t, rt)
	tid := bakeBase(t, rt)
	ctx := context.Background()
	for rt.PoolReady(tid) < 1 {
		time.Sleep(20 * time.Millisecond)
	}
	info, err := rt.Create(ctx, runtime.CreateSpec{ID: "netted", TemplateID: tid})
	if err != nil {
		t.Fatal(err)
	}
	if info.Net.ID == "" {
		t.Fatalf("pooled sandbox has no slot: %+v", info)
	}
	if res, err := conformance.Exec(ctx, rt, "netted", "echo hi"); err != nil || res.Stdout != "hi\n" {
		t.Fatalf("exec through the slot: %+v %v", res, err)
	}
	if err := rt.Pause(ctx, "netted"); err != nil {
		t.Fatal(err)
	}
	info, err = rt.Resume(ctx, "netted", runtime.NetSlot{})
	if err != nil || info.Net.ID == "" {
		t.Fatalf("resume: %+v %v", info, err)
	}
	if res, err := conformance.Exec(ctx, rt, "netted", "echo again"); err != nil || res.Stdout != "again\n" {
		t.Fatalf("exec after resume: %+v %v", res, err)
	}
	rt.Destroy(ctx, "netted")
	rt.Close()
	slots.mu.Lock()
	defer slots.mu.Unlock()
	if len(slots.live) != 0 || slots.acquired != slots.released {
		t.Fatalf("slots: %d live, %d acquired, %d released", len(slots.live), slots.acquired, slots.released)
	}
	noLeaks(t, rt)
}

// internal/network's manager is the production slot provider.
var _ SlotProvider = (*network.Manager)(nil)

// The real slot provider: pooled sandboxes in internal/network slots,
// reached through the manager's Dial (the router side).
func TestRealNetworkSlots(t *testing.T) {
	runsc := runscPath(t)
	pid := os.Getpid()
	rng := netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 150+(pid/250)%50, pid%250))
	m, err := network.NewManagerWith(network.Options{Prefix: "cg" + strconv.FormatInt(int64(pid), 36), HostRange: rng,
		PoolSize: 1, Mode: network.ModeNetns, DNSUpstream: "127.0.0.1:53"}, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Skipf("network manager unavailable here: %v", err)
	}
	t.Cleanup(func() { m.Close(); m.Purge() }) // after the runtime's cleanup
	rt, err := New(context.Background(), Options{DataDir: t.TempDir(), RunscPath: runsc, PoolSize: 1, Slots: m})
	if err != nil {
		t.Fatal(err)
	}
	cleanupAll(t, rt)
	tid := bakeBase(t, rt)
	ctx := context.Background()
	deadline := time.Now().Add(time.Minute)
	for rt.PoolReady(tid) < 1 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	info, err := rt.Create(ctx, runtime.CreateSpec{ID: "slotted", TemplateID: tid})
	if err != nil {
		t.Fatal(err)
	}
	if info.Net.ID == "" || info.Net.GuestIP == "" {
		t.Fatalf("no slot: %+v", info.Net)
	}
	res, err := conformance.Exec(ctx, rt, "slotted", "echo via-slot")
	if err != nil || res.Stdout != "via-slot\n" {
		t.Fatalf("exec through the network slot: %+v %v", res, err)
	}
	if err := rt.Pause(ctx, "slotted"); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Resume(ctx, "slotted", runtime.NetSlot{}); err != nil {
		t.Fatal(err)
	}
	if res, err := conformance.Exec(ctx, rt, "slotted", "echo resumed"); err != nil || res.Stdout != "resumed\n" {
		t.Fatalf("exec after resume in a new slot: %+v %v", res, err)
	}
	if err := rt.Destroy(ctx, "slotted"); err != nil {
		t.Fatal(err)
	}
	rt.Close()
	noLeaks(t, rt)
}

// TestSnapshotOfPaused: a paused sandbox's snapshot is its pause
// checkpoint; the sandbox stays paused and resumable, the snapshot
// restores the files written before the pause and outlives the next pause
// and the sandbox itself.
func TestSnapshotOfPaused(t *testing.T) {
	rt := newRuntime(t, 0)
	tid := bakeBase(t, rt)
	ctx := context.Background()
	sh := func(id, script string) string {
		t.Helper()
		res, err := conformance.Exec(ctx, rt, id, script)
		if err != nil || res.ExitCode != 0 {
			t.Fatalf("%s: %q: %+v %v", id, script, res, err)
		}
		return strings.TrimSpace(res.Stdout)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "orig", TemplateID: tid}); err != nil {
		t.Fatal(err)
	}
	sh("orig", "echo before-pause > /tmp/marker")
	if err := rt.Pause(ctx, "orig"); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Snapshot(ctx, "orig", "snap-paused"); err != nil {
		t.Fatalf("snapshot of paused: %v", err)
	}
	if _, err := rt.Snapshot(ctx, "orig", "snap-paused"); !errs.Is(err, errs.AlreadyExists) {
		t.Fatalf("same snapshot id again: %v", err)
	}
	if l, _ := rt.List(ctx); len(l) != 1 || l[0].State != runtime.StatePaused {
		t.Fatalf("after snapshot: %+v", l)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "child", SnapshotID: "snap-paused"}); err != nil {
		t.Fatal(err)
	}
	if got := sh("child", "cat /tmp/marker"); got != "before-pause" {
		t.Fatalf("child sees %q", got)
	}
	if _, err := rt.Resume(ctx, "orig", runtime.NetSlot{}); err != nil {
		t.Fatalf("resume after snapshot: %v", err)
	}
	if got := sh("orig", "cat /tmp/marker && echo after > /tmp/marker"); got != "before-pause" {
		t.Fatalf("original sees %q", got)
	}
	// The next pause replaces the checkpoint; the snapshot is unaffected.
	if err := rt.Pause(ctx, "orig"); err != nil {
		t.Fatal(err)
	}
	if err := rt.Destroy(ctx, "orig"); err != nil {
		t.Fatal(err)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "child2", SnapshotID: "snap-paused"}); err != nil {
		t.Fatal(err)
	}
	if got := sh("child2", "cat /tmp/marker"); got != "before-pause" {
		t.Fatalf("second child sees %q", got)
	}
	for _, id := range []string{"child", "child2"} {
		rt.Destroy(ctx, id)
	}
	if err := rt.DeleteSnapshot(ctx, "snap-paused"); err != nil {
		t.Fatal(err)
	}
	noLeaks(t, rt)
}

// TestListAndDeleteIncompleteSnapshots: a snapshot directory without its
// meta.json (a checkpoint interrupted by a crash) is listed incomplete and
// DeleteSnapshot removes it; a complete one is listed complete.
func TestListAndDeleteIncompleteSnapshots(t *testing.T) {
	rt := newRuntime(t, 0)
	ctx := context.Background()
	half := rt.snapshotDir("half")
	if err := os.MkdirAll(filepath.Join(half, "image"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(half, "image", "pages.img"), []byte("partial"), 0o644)
	full := rt.snapshotDir("full")
	os.MkdirAll(filepath.Join(full, "image"), 0o755)
	if err := writeJSON(filepath.Join(full, "meta.json"), snapshotMeta{ID: "full"}); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(rt.dir, "snapshots", "stray-file"), nil, 0o644)
	l, err := rt.ListSnapshots(ctx)
	if err != nil || fmt.Sprint(l) != "[{full true} {half false}]" {
		t.Fatalf("list %v %v", l, err)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "x", SnapshotID: "half"}); !errs.Is(err, errs.NotFound) {
		t.Fatalf("create from an incomplete snapshot: %v", err)
	}
	for _, id := range []string{"half", "full"} {
		if err := rt.DeleteSnapshot(ctx, id); err != nil {
			t.Fatalf("delete %s: %v", id, err)
		}
	}
	if err := rt.DeleteSnapshot(ctx, "half"); !errs.Is(err, errs.NotFound) {
		t.Fatalf("delete again: %v", err)
	}
	if err := rt.DeleteSnapshot(ctx, "../x"); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("delete bad id: %v", err)
	}
	if l, _ := rt.ListSnapshots(ctx); len(l) != 0 {
		t.Fatalf("left %v", l)
	}
}

// BenchmarkStats: the cost of one metrics sample of a running sandbox
// (cgroup reads, what the node's metrics loop does every interval) against
// the peer, asking the sandbox's agent (envd GET /metrics over Dial, on a
// kept-alive connection).
func BenchmarkStats(b *testing.B) {
	rt := newRuntime(b, 0)
	tid := bakeBase(b, rt)
	ctx := context.Background()
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "bench", TemplateID: tid}); err != nil {
		b.Fatal(err)
	}
	b.Run("cgroups", func(b *testing.B) {
		for range b.N {
			if _, err := rt.Stats(ctx, "bench"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("agent-http", func(b *testing.B) {
		c := &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return rt.Dial(ctx, "bench", runtime.EnvdPort)
		}}}
		defer c.CloseIdleConnections()
		for range b.N {
			res, err := c.Get("http://sandbox/metrics")
			if err != nil {
				b.Fatal(err)
			}
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
			if res.StatusCode != 200 {
				b.Fatalf("agent /metrics: %d", res.StatusCode)
			}
		}
	})
}
