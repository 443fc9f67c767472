//go:build linux

package microvm

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/agent/envd"
	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/hostinfo"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
	"github.com/cubesandbox/cube/internal/template"
	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	stt "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmspec"
)

// TestMain lets this test binary act as the VMM (`cube vmm-restore
// --guest linux ...`), so the runtime's process handling is tested with
// real VMM processes without building cmd/cube.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == "vmm-restore" {
		fs := flag.NewFlagSet("vmm-restore", flag.ExitOnError)
		guest := fs.String("guest", "linux", "")
		sock := fs.String("api-socket", "", "")
		opts := fs.String("options", "", "")
		boot := fs.Bool("boot", false, "")
		netns := fs.String("tap-netns", "", "")
		fs.Parse(os.Args[2:])
		var o vmmapi.Options
		if *opts != "" {
			b, _ := os.ReadFile(*opts)
			json.Unmarshal(b, &o)
		}
		if *guest != "linux" {
			os.Exit(2)
		}
		if err := vmmspec.Serve(vmmspec.ServeConfig{Socket: *sock, Options: o, Boot: *boot, TapNetns: *netns}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func needRoot(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("microvm runtime tests need root (network namespaces, taps)")
	}
}

func newRT(t *testing.T, dir string, pool int) *Runtime {
	// This test binary stands in for an unjailed `cube vmm-restore`.
	rt, err := New(Options{Dir: dir, CubeBin: os.Args[0], PoolSize: pool, Kernel: kernelPath(), NoJail: true})
	if err != nil {
		t.Fatal(err)
	}
	return rt
}

// fakeVsock serves the hybrid vsock protocol on a unix socket: each
// connection must start with "CONNECT <port>\n", is answered "OK ...",
// and is then served by h (an HTTP handler for port 49983).
func fakeVsock(t *testing.T, path string, h http.Handler) {
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	conns := make(chan net.Conn)
	srv := &http.Server{Handler: h}
	go srv.Serve(&chanListener{l: l, c: conns})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				close(conns)
				return
			}
			go func() {
				br := bufio.NewReader(c)
				line, err := br.ReadString('\n')
				if err != nil || line != fmt.Sprintf("CONNECT %d\n", runtime.EnvdPort) {
					c.Close()
					return
				}
				io.WriteString(c, "OK 1073741824\n")
				conns <- c
			}()
		}
	}()
}

type chanListener struct {
	l net.Listener
	c chan net.Conn
}

func (c *chanListener) Accept() (net.Conn, error) {
	conn, ok := <-c.c
	if !ok {
		return nil, net.ErrClosed
	}
	return conn, nil
}
func (c *chanListener) Close() error   { return nil }
func (c *chanListener) Addr() net.Addr { return c.l.Addr() }

// TestAgentInitOverVsock: the node's /init after a restore carries the
// host time and fresh entropy, in the agent's own request type, through
// the hybrid vsock CONNECT handshake; two restores get different bytes.
func TestAgentInitOverVsock(t *testing.T) {
	uds := filepath.Join(t.TempDir(), "vsock.sock")
	var mu sync.Mutex
	var got []envd.InitRequest
	var tokens []string
	fakeVsock(t, uds, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != "POST" || r.URL.Path != "/init" {
			http.Error(w, "no", 404)
			return
		}
		var req envd.InitRequest
		if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		mu.Lock()
		got = append(got, req)
		tokens = append(tokens, r.Header.Get("X-Access-Token"))
		mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	ctx := context.Background()
	for i := 0; i < 2; i++ {
		if err := agentInit(ctx, uds, initBody(map[string]string{"A": "1"}, "tok")); err != nil {
			t.Fatal(err)
		}
	}
	if len(got) != 2 {
		t.Fatalf("%d inits", len(got))
	}
	var ents [][]byte
	for i, r := range got {
		ts, err := time.Parse(time.RFC3339Nano, r.Timestamp)
		if err != nil || time.Since(ts) > 5*time.Second || time.Since(ts) < 0 {
			t.Fatalf("init %d timestamp %q", i, r.Timestamp)
		}
		e, err := base64.StdEncoding.DecodeString(r.Entropy)
		if err != nil || len(e) != 64 {
			t.Fatalf("init %d entropy %q", i, r.Entropy)
		}
		ents = append(ents, e)
		if r.EnvVars["A"] != "1" || r.AccessToken == nil || *r.AccessToken != "tok" || tokens[i] != "tok" {
			t.Fatalf("init %d: %+v", i, r)
		}
	}
	if string(ents[0]) == string(ents[1]) {
		t.Fatal("two restores got the same entropy")
	}
	// A restore from a snapshot of a sandbox with a token presents that
	// token while setting the new one.
	if err := agentInitAs(ctx, uds, initBody(nil, "new"), "old"); err != nil {
		t.Fatal(err)
	}
	if last := got[len(got)-1]; last.AccessToken == nil || *last.AccessToken != "new" || tokens[len(tokens)-1] != "old" {
		t.Fatalf("init with the snapshot's token: %+v, header %q", last, tokens[len(tokens)-1])
	}
	// A refused CONNECT is a clear Unavailable error.
	if _, err := DialVsock(ctx, uds+"-missing", 1); errs.KindOf(err) != errs.Unavailable {
		t.Fatalf("dial missing socket: %v", err)
	}
}

// TestPoolAdoptAndCleanup runs real VMM processes (this binary in VMM
// mode): the pool pre-starts them, a handed-out one moves into a sandbox
// dir, a restarted runtime re-adopts a live sandbox record and drops a
// dead one and the previous process's pool, and Destroy leaves nothing.
func TestPoolAdoptAndCleanup(t *testing.T) {
	needRoot(t)
	dir := t.TempDir()
	rt := newRT(t, dir, 2)
	deadline := time.Now().Add(30 * time.Second)
	for {
		rt.pool.mu.Lock()
		n := len(rt.pool.ready)
		rt.pool.mu.Unlock()
		if n == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("pool has %d VMMs", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rt.pool.mu.Lock()
	poolPIDs := []int{rt.pool.ready[0].v.pid, rt.pool.ready[1].v.pid}
	rt.pool.mu.Unlock()

	// Hand one out as a "running" sandbox (its VMM answers; no guest:
	// Linux guests cannot boot on this host kind).
	sbDir := rt.sbDir("adopted")
	os.MkdirAll(sbDir, 0o755)
	v, err := rt.pool.get(sbDir)
	if err != nil {
		t.Fatal(err)
	}
	st, err := v.cl.Status(context.Background())
	if err != nil || st.PID != v.pid || st.State != "created" {
		t.Fatalf("moved VMM status %+v %v", st, err)
	}
	// Restore the synthetic guest's snapshot in it through the runtime's
	// per-request device path (its only virtio device is "rng", as here).
	snap := syntheticSnapshot(t)
	rep, err := v.cl.Restore(context.Background(), vmmapi.RestoreRequest{Dir: snap, WaitWord: stt.Counter,
		Options: &vmmapi.Options{MemMiB: stt.MemSize >> 20, VCPUs: 1, RNG: true}})
	if err != nil || rep.Status.State != "running" {
		t.Fatalf("restore in a runtime VMM: %+v %v", rep, err)
	}
	if _, err := v.cl.Pause(context.Background()); err != nil {
		t.Fatal(err)
	}
	if s, err := rt.Stats(context.Background(), "nope"); errs.KindOf(err) != errs.NotFound {
		t.Fatalf("stats of unknown: %+v %v", s, err)
	}
	rec := record{ID: "adopted", TemplateID: "tpl", State: runtime.StateRunning, PID: v.pid, Socket: v.socket, StartedAt: time.Now()}
	if err := writeJSON(filepath.Join(sbDir, "sandbox.json"), rec); err != nil {
		t.Fatal(err)
	}
	dead := record{ID: "dead", State: runtime.StateRunning, PID: 999999999, Socket: "/nonexistent"}
	os.MkdirAll(rt.sbDir("dead"), 0o755)
	writeJSON(filepath.Join(rt.sbDir("dead"), "sandbox.json"), dead)
	paused := record{ID: "paused", State: runtime.StatePaused}
	os.MkdirAll(rt.sbDir("paused"), 0o755)
	writeJSON(filepath.Join(rt.sbDir("paused"), "sandbox.json"), paused)

	// "Crash" (no Close) and restart on the same dir.
	rt.pool.mu.Lock()
	rt.pool.closed = true // stop refilling; the processes stay as leftovers
	rt.pool.mu.Unlock()
	rt2 := newRT(t, dir, 0)
	defer rt2.Close()
	for _, pid := range poolPIDs {
		if pid != v.pid && alive(pid) {
			t.Fatalf("previous pool VMM %d still alive after restart", pid)
		}
	}
	list, _ := rt2.List(context.Background())
	ids := map[string]runtime.State{}
	for _, i := range list {
		ids[i.ID] = i.State
	}
	if ids["adopted"] != runtime.StateRunning || ids["paused"] != runtime.StatePaused || len(ids) != 2 {
		t.Fatalf("adopted %v", ids)
	}
	if _, err := os.Stat(rt.sbDir("dead")); err == nil {
		t.Fatal("dead sandbox dir kept")
	}
	if _, err := rt2.Dial(context.Background(), "paused", 1); errs.KindOf(err) != errs.Conflict {
		t.Fatalf("dial paused: %v", err)
	}
	if s, err := rt2.Stats(context.Background(), "adopted"); err != nil || s.MemUsed == 0 {
		t.Fatalf("stats of adopted: %+v %v", s, err)
	}
	if err := rt2.Destroy(context.Background(), "adopted"); err != nil {
		t.Fatal(err)
	}
	if alive(v.pid) {
		t.Fatal("VMM alive after Destroy")
	}
	if _, err := os.Stat(sbDir); err == nil {
		t.Fatal("sandbox dir left after Destroy")
	}
	if err := rt2.Destroy(context.Background(), "adopted"); err != nil {
		t.Fatalf("second destroy (idempotent): %v", err)
	}
	rt2.Destroy(context.Background(), "paused")
	ents, _ := os.ReadDir(filepath.Join(dir, "pool"))
	if len(ents) != 0 {
		t.Fatalf("pool dir not cleaned: %v", ents)
	}
}

func TestErrorsWithoutKVMGuests(t *testing.T) {
	needRoot(t)
	rt := newRT(t, t.TempDir(), 0)
	defer rt.Close()
	ctx := context.Background()
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "x", TemplateID: "nope"}); errs.KindOf(err) != errs.NotFound {
		t.Fatalf("create from unknown template: %v", err)
	}
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "../x", TemplateID: "nope"}); errs.KindOf(err) != errs.InvalidArgument {
		t.Fatalf("bad id: %v", err)
	}
	for _, err := range []error{rt.Pause(ctx, "x"), rt.DeleteSnapshot(ctx, "x")} {
		if errs.KindOf(err) != errs.NotFound {
			t.Fatalf("unknown sandbox: %v", err)
		}
	}
}

func kernelPath() string {
	if k := os.Getenv("CUBE_KERNEL"); k != "" {
		return k
	}
	if k := config.Default().KernelPath; k != "" {
		return k
	}
	cache := os.Getenv("CUBE_CACHE_DIR")
	if cache == "" {
		cache = "/var/cache/cube"
	}
	m, _ := filepath.Glob(filepath.Join(cache, "kernel", "*", "bzImage"))
	if len(m) > 0 {
		return m[0]
	}
	m, _ = filepath.Glob(filepath.Join(cache, "kernel", "bzImage*"))
	if len(m) > 0 {
		return m[0]
	}
	return ""
}

// TestConformance runs the runtime conformance suite. It needs hardware
// KVM (VT-x/AMD-V) and a guest kernel: on a KVM-PVM host no stock Linux
// guest boots, so it skips here and runs inside the emulated SVM machine
// (`make vmtest`).
func TestConformance(t *testing.T) {
	needRoot(t)
	if k := (hostinfo.Probe{}).Kind(); k != hostinfo.KVMHardware {
		t.Skipf("microvm conformance needs hardware KVM (VT-x/AMD-V); this host is %s, where no Linux guest boots: run it in the emulated SVM machine (make vmtest)", k)
	}
	k := kernelPath()
	if k == "" {
		t.Skip("no guest kernel: build it with `make kernel` or set CUBE_KERNEL")
	}
	dir := t.TempDir()
	rt, err := New(Options{Dir: dir, CubeBin: os.Args[0], PoolSize: 1, Kernel: k})
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	cat, err := template.NewFileCatalog(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cache := os.Getenv("CUBE_CACHE_DIR")
	if cache == "" {
		cache = "/var/cache/cube"
	}
	b := &template.Builder{DataDir: t.TempDir(), CacheDir: cache, AgentPath: conformance.AgentBinary(t), Runtime: rt, Catalog: cat}
	rec, err := b.CreateBuiltin(context.Background(), "base")
	if err != nil {
		t.Fatalf("bake base: %v", err)
	}
	conformance.Run(t, conformance.Harness{
		Runtime:  rt,
		Template: rec.ID,
		Timeout:  3 * time.Minute,
		Footprint: func(id string) (any, error) {
			sb, err := rt.get(id)
			if err != nil {
				return nil, err
			}
			sb.mu.Lock()
			defer sb.mu.Unlock()
			return [2]any{sb.rec.PID, sb.dir}, nil
		},
		Leftovers: func(fp any) []string {
			f := fp.([2]any)
			var l []string
			if alive(f[0].(int)) {
				l = append(l, fmt.Sprintf("vmm pid %d", f[0].(int)))
			}
			if _, err := os.Stat(f[1].(string)); err == nil {
				l = append(l, f[1].(string))
			}
			return l
		},
	})
	_ = strings.TrimSpace
}

func TestCopySparse(t *testing.T) {
	d := t.TempDir()
	src := filepath.Join(d, "src")
	f, _ := os.Create(src)
	f.Truncate(64 << 20)
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("middle"), 32<<20)
	f.WriteAt([]byte("tail"), 64<<20-4)
	f.Close()
	dst := filepath.Join(d, "dst")
	if err := copySparse(src, dst); err != nil {
		t.Fatal(err)
	}
	a, _ := os.ReadFile(src)
	b, _ := os.ReadFile(dst)
	if string(a) != string(b) {
		t.Fatal("copy differs")
	}
	fi, _ := os.Stat(dst)
	if blocks := fi.Sys().(*syscall.Stat_t).Blocks * 512; blocks > 4<<20 {
		t.Fatalf("copy is not sparse: %d bytes allocated", blocks)
	}
	if err := copySparse(filepath.Join(d, "missing"), filepath.Join(d, "x")); err != nil {
		t.Fatal(err)
	}
	// Across filesystems (tmpfs to the temp dir's): copy_file_range may
	// refuse; the plain read/write path must take over.
	if shm, err := os.MkdirTemp("/dev/shm", "cube-copy-"); err == nil {
		defer os.RemoveAll(shm)
		x := filepath.Join(shm, "x")
		os.WriteFile(x, []byte("cross-device"), 0o644)
		if err := copySparse(x, filepath.Join(d, "y")); err != nil {
			t.Fatal(err)
		}
		if b, _ := os.ReadFile(filepath.Join(d, "y")); string(b) != "cross-device" {
			t.Fatalf("cross-device copy %q", b)
		}
	}
}

// syntheticSnapshot boots the synthetic guest (snapshot/snaptest), runs it
// to its first phase and snapshots it into a fresh directory.
func syntheticSnapshot(t *testing.T) string {
	t.Helper()
	snap := filepath.Join(t.TempDir(), "snap")
	m, err := stt.Boot(stt.Spec())
	if err != nil {
		t.Fatal(err)
	}
	defer m.VM.Close()
	if err := stt.RunToPhase1(m); err != nil {
		t.Fatal(err)
	}
	if _, err := snapshot.Take(m.VM, snap, snapshot.Options{}); err != nil {
		t.Fatal(err)
	}
	return snap
}

// TestValidID: the hand-written id check accepts exactly what
// ^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$ does.
func TestValidID(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)
	cases := []string{"", "a", "sb-1", "../x", ".x", "a.b_c-d", strings.Repeat("z", 128), strings.Repeat("z", 129), "x y", "é"}
	for i := 0; i < 256; i++ {
		cases = append(cases, "x"+string(rune(i)), string(rune(i)))
	}
	for _, c := range cases {
		if got, want := jail.ValidName(c), re.MatchString(c); got != want {
			t.Errorf("jail.ValidName(%q) = %v, want %v", c, got, want)
		}
	}
}
