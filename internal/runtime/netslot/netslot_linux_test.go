//go:build linux

package netslot

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
	goruntime "runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
	"github.com/cubesandbox/cube/internal/runtime/gvisor"
	"github.com/cubesandbox/cube/internal/template"
)

// Test environment: names and ranges from the pid (prefix "ns<pid36>",
// slot ranges in 10.214.0.0/16, test internet 198.19.<pid%250>.0/24: a
// namespace of the test's own with an HTTP server, reached through the
// host's NAT). Nothing leaves the namespaces the test creates.
var (
	pid      = os.Getpid()
	prefix   = "ns" + strconv.FormatInt(int64(pid), 36)
	inetName = prefix + "inet"
	inetLink = prefix + "i0"
	inetHost = netip.MustParseAddr(fmt.Sprintf("198.19.%d.1", pid%250))
	inetAddr = netip.MustParseAddr(fmt.Sprintf("198.19.%d.2", pid%250))
	// Two /24s of 10.214/16 per test process, chosen by pid.
	nsRange  = netip.MustParsePrefix(fmt.Sprintf("10.214.%d.0/24", 2*(pid%120)))
	tapRange = netip.MustParsePrefix(fmt.Sprintf("10.214.%d.0/24", 2*(pid%120)+1))
	// and one of 10.214.240-255.0/24 for the pooled environment.
	poolRange = netip.MustParsePrefix(fmt.Sprintf("10.214.%d.0/24", 240+pid%16))
	testLog   = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
)

func TestMain(m *testing.M) {
	if os.Geteuid() != 0 {
		fmt.Println("netslot tests need root (namespaces, nftables, runsc): skipping")
		os.Exit(0)
	}
	code := m.Run()
	l := cleanupShared()
	teardownInternet()
	if l = append(l, leftovers()...); len(l) > 0 {
		fmt.Fprintf(os.Stderr, "left behind: %v\n", l)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

// leftovers lists namespaces and links with the test's prefix.
func leftovers() []string {
	var out []string
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, "netns "+e.Name())
		}
	}
	links, _ := netlink.LinkList()
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, prefix) {
			out = append(out, "link "+l.Attrs().Name)
		}
	}
	return out
}

// setupInternet builds the test internet once: namespace <prefix>inet,
// eth0 = inetAddr/24, host side inetHost/24, HTTP on :80 answering
// "internet".
var inetUp bool

func setupInternet(t testing.TB) {
	t.Helper()
	if inetUp {
		return
	}
	nsc := make(chan netns.NsHandle, 1)
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread() // left locked: the thread dies with the goroutine
		ns, err := netns.NewNamed(inetName)
		if err != nil {
			errc <- err
			return
		}
		nsc <- ns
	}()
	var ns netns.NsHandle
	select {
	case ns = <-nsc:
	case err := <-errc:
		t.Fatal(err)
	}
	inetUp = true
	if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: inetLink}, PeerName: "eth0", PeerNamespace: netlink.NsFd(int(ns))}); err != nil {
		t.Fatal(err)
	}
	hl, err := netlink.LinkByName(inetLink)
	if err != nil {
		t.Fatal(err)
	}
	if err := netlink.AddrAdd(hl, &netlink.Addr{IPNet: ipnet(inetHost, 24)}); err != nil {
		t.Fatal(err)
	}
	if err := netlink.LinkSetUp(hl); err != nil {
		t.Fatal(err)
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	for _, n := range []string{"lo", "eth0"} {
		l, err := h.LinkByName(n)
		if err != nil {
			t.Fatal(err)
		}
		if n == "eth0" {
			if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipnet(inetAddr, 24)}); err != nil {
				t.Fatal(err)
			}
		}
		if err := h.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.RouteAdd(&netlink.Route{Gw: inetHost.AsSlice()}); err != nil {
		t.Fatal(err)
	}
	ns.Close()
	ln := listenIn(t, inetName, netip.AddrPortFrom(inetAddr, 80).String())
	go http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "internet") }))
}

func listenIn(t testing.TB, nsName, addr string) net.Listener {
	t.Helper()
	ch := make(chan net.Listener, 1)
	errc := make(chan error, 1)
	go func() {
		goruntime.LockOSThread() // the thread dies with the goroutine (left locked)
		ns, err := netns.GetFromName(nsName)
		if err == nil {
			err = netns.Set(ns)
			ns.Close()
		}
		if err != nil {
			errc <- err
			return
		}
		ln, err := net.Listen("tcp4", addr)
		if err != nil {
			errc <- err
			return
		}
		ch <- ln
	}()
	select {
	case ln := <-ch:
		return ln
	case err := <-errc:
		t.Fatal(err)
	}
	return nil
}

func teardownInternet() {
	if !inetUp {
		return
	}
	if l, err := netlink.LinkByName(inetLink); err == nil {
		netlink.LinkDel(l)
	}
	netns.DeleteNamed(inetName)
}

func ipnet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

func newManager(t testing.TB, pfx string, r netip.Prefix, mode network.Mode) *network.Manager {
	t.Helper()
	m, err := network.NewManagerWith(network.Options{Prefix: pfx, HostRange: r, PoolSize: 1, Mode: mode, AdoptGrace: -1}, testLog)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// gvEnv is a gVisor runtime with a baked base template in slots. pooled:
// the runtime acquires slots itself (gvisor.Options.Slots, warm pool of
// one) and the wrapper runs with InnerSlots.
type gvEnv struct {
	pooled  bool
	pfx     string
	rng     netip.Prefix
	dataDir string
	runsc   string
	tid     string
	inner   *gvisor.Runtime
	mgr     *network.Manager
	rt      *Runtime
}

var shared = map[bool]*gvEnv{}

func cacheDir() string {
	if d := os.Getenv("CUBE_CACHE_DIR"); d != "" {
		return d
	}
	return "/var/cache/cube"
}

// gvisorEnv returns the shared environment with slots acquired by the
// wrapper, built on first use; skips without runsc or the base rootfs.
func gvisorEnv(t testing.TB) *gvEnv { return envFor(t, false) }

// pooledEnv returns the shared environment with slots acquired by the
// gVisor runtime (warm pool in slots).
func pooledEnv(t testing.TB) *gvEnv { return envFor(t, true) }

func envFor(t testing.TB, pooled bool) *gvEnv {
	t.Helper()
	if e := shared[pooled]; e != nil {
		return e
	}
	runsc := os.Getenv("CUBE_RUNSC")
	if runsc == "" {
		runsc = filepath.Join(cacheDir(), "bin", "runsc")
	}
	if _, err := os.Stat(runsc); err != nil {
		t.Skipf("runsc not built (%s): run `make runsc`; TestTapSlot covers the wrapper without it", runsc)
	}
	if m, _ := filepath.Glob(filepath.Join(cacheDir(), "rootfs", "base-*.done")); len(m) == 0 {
		t.Skipf("no base rootfs in %s/rootfs (built by the template builder, `make test`); TestTapSlot covers the wrapper without it", cacheDir())
	}
	setupInternet(t)
	dir, err := os.MkdirTemp("", "cube-netslot-test-")
	if err != nil {
		t.Fatal(err)
	}
	e := &gvEnv{pooled: pooled, pfx: prefix, rng: nsRange, dataDir: dir, runsc: runsc}
	if pooled {
		e.pfx, e.rng = prefix+"p", poolRange
	}
	e.open(t)
	cat, err := template.NewFileCatalog(filepath.Join(dir, "catalog"))
	if err != nil {
		t.Fatal(err)
	}
	b := &template.Builder{DataDir: filepath.Join(dir, "artifacts"), CacheDir: cacheDir(),
		AgentPath: conformance.AgentBinary(t), Runtime: e.inner, Catalog: cat}
	rec, err := b.CreateBuiltin(context.Background(), "base")
	if err != nil {
		t.Fatalf("build base template: %v", err)
	}
	e.tid = rec.ID
	shared[pooled] = e
	return e
}

// open builds the manager, the runtime and the wrapper on e's state (what
// cube server does at start).
func (e *gvEnv) open(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	e.mgr = newManager(t, e.pfx, e.rng, network.ModeNetns)
	o := gvisor.Options{DataDir: e.dataDir, RunscPath: e.runsc}
	if e.pooled {
		o.Slots, o.PoolSize = e.mgr, 1
	}
	var err error
	if e.inner, err = gvisor.New(ctx, o); err != nil {
		t.Fatal(err)
	}
	if e.rt, err = Wrap(ctx, e.inner, e.mgr, Options{StateDir: filepath.Join(e.dataDir, "netslot"), Logger: testLog, InnerSlots: e.pooled}); err != nil {
		t.Fatal(err)
	}
}

func (e *gvEnv) close() {
	e.mgr.Purge()
	os.RemoveAll(e.dataDir)
}

// cleanupShared destroys the shared environment and reports leaks.
func cleanupShared() []string {
	var bad []string
	ctx := context.Background()
	for k, e := range shared {
		list, _ := e.rt.List(ctx)
		for _, i := range list {
			bad = append(bad, "sandbox "+i.ID)
			e.rt.Destroy(ctx, i.ID)
		}
		e.inner.Close() // its warm pool goes, with the pool's slots
		bad = append(bad, e.inner.Leaks()...)
		if st := e.mgr.Stats(); st.Active != 0 {
			bad = append(bad, fmt.Sprintf("%s: %d active slots", e.pfx, st.Active))
		}
		e.close()
		delete(shared, k)
	}
	return bad
}

// bothModes runs f with slots acquired by the wrapper and by the runtime.
func bothModes(t *testing.T, f func(t *testing.T, e *gvEnv)) {
	t.Run("wrapper-slots", func(t *testing.T) { f(t, gvisorEnv(t)) })
	t.Run("runtime-slots", func(t *testing.T) { f(t, pooledEnv(t)) })
}

func released(m *network.Manager, slotID string) bool {
	_, err := m.Policy(slotID)
	return errs.Is(err, errs.NotFound)
}

// TestConformanceInSlots runs the runtime conformance suite on gVisor
// through the wrapper: every sandbox in a network slot.
func TestConformanceInSlots(t *testing.T) { bothModes(t, testConformance) }

func testConformance(t *testing.T, e *gvEnv) {
	type fp struct {
		res  gvisor.Resources
		slot string
	}
	conformance.Run(t, conformance.Harness{
		Runtime:  e.rt,
		Template: e.tid,
		Footprint: func(id string) (any, error) {
			res, err := e.inner.Inspect(id)
			if err != nil {
				return nil, err
			}
			s, err := e.rt.Slot(id)
			if err != nil {
				return nil, err
			}
			if s.NetnsPath == "" || res.Netns != s.NetnsPath {
				return nil, fmt.Errorf("sandbox %s runs in netns %q, not its slot's %q", id, res.Netns, s.NetnsPath)
			}
			return fp{res, s.ID}, nil
		},
		Leftovers: func(x any) []string {
			f := x.(fp)
			l := e.inner.Leftovers(f.res.CID)
			if _, err := os.Stat(f.res.Dir); err == nil {
				l = append(l, f.res.Dir)
			}
			if !e.pooled && !released(e.mgr, f.slot) { // (pooled: the warm pool may take it again at once)
				l = append(l, "network slot "+f.slot)
			}
			return l
		},
	})
}

// sh runs a script in the sandbox and returns stdout and the exit code.
func sh(t *testing.T, rt runtime.Runtime, id, script string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := conformance.Exec(ctx, rt, id, script)
	if err != nil {
		t.Fatalf("exec %q: %v", script, err)
	}
	return res.Stdout + res.Stderr, res.ExitCode
}

func fetchScript(addr netip.Addr) string {
	return fmt.Sprintf(`python3 -c "import urllib.request;print(urllib.request.urlopen('http://%s/',timeout=3).read().decode())"`, addr)
}

func canReachInternet(t *testing.T, rt runtime.Runtime, id string) bool {
	t.Helper()
	out, code := sh(t, rt, id, fetchScript(inetAddr))
	return code == 0 && strings.Contains(out, "internet")
}

// httpVia GETs path from port of sandbox id through the wrapper's Dial.
func httpVia(rt runtime.Runtime, id string, port int, path string) (string, error) {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return rt.Dial(ctx, id, port) }}
	defer tr.CloseIdleConnections()
	r, err := (&http.Client{Transport: tr, Timeout: 5 * time.Second}).Get("http://sandbox" + path)
	if err != nil {
		return "", err
	}
	defer r.Body.Close()
	b, err := io.ReadAll(r.Body)
	return string(b), err
}

// TestSandboxNetwork: egress through NAT, a live policy flip, a web server
// reachable through Dial and nothing else, pause/resume in the same slot,
// destroy returning the slot.
func TestSandboxNetwork(t *testing.T) { bothModes(t, testSandboxNetwork) }

func testSandboxNetwork(t *testing.T, e *gvEnv) {
	ctx := context.Background()
	id := "net-" + strconv.Itoa(pid)
	if _, err := e.rt.CreateWithPolicy(ctx, runtime.CreateSpec{ID: "bad", TemplateID: e.tid},
		network.Policy{AllowOut: []string{"10.0.0.0/33"}}); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("bad policy: %v, want InvalidArgument", err)
	}
	if _, err := e.rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: e.tid}); err != nil {
		t.Fatal(err)
	}
	defer e.rt.Destroy(ctx, id)
	slot, err := e.rt.Slot(id)
	if err != nil {
		t.Fatal(err)
	}
	// Egress through the slot and the host's NAT.
	if !canReachInternet(t, e.rt, id) {
		t.Fatal("sandbox cannot reach the test internet")
	}
	// Internet off, live.
	if err := e.rt.SetPolicy(id, network.Policy{AllowInternetAccess: network.Bool(false)}); err != nil {
		t.Fatal(err)
	}
	if canReachInternet(t, e.rt, id) {
		t.Fatal("sandbox reached the internet with it turned off")
	}
	if err := e.rt.SetPolicy(id, network.Policy{AllowOut: []string{"300.1.1.1"}}); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("bad policy update: %v, want InvalidArgument", err)
	}
	if p, _ := e.rt.Policy(id); p.AllowInternetAccess == nil || *p.AllowInternetAccess {
		t.Fatalf("a rejected update changed the policy: %+v", p)
	}
	if err := e.rt.SetPolicy(id, network.Policy{}); err != nil {
		t.Fatal(err)
	}
	if !canReachInternet(t, e.rt, id) {
		t.Fatal("sandbox cannot reach the internet after it was turned back on")
	}

	// A web server in the sandbox: reachable through Dial only.
	port := 20000 + pid%20000
	if c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)), time.Second); err == nil {
		c.Close()
		t.Skipf("port %d is in use on the host; cannot tell the sandbox's server from it", port)
	}
	if out, code := sh(t, e.rt, id, fmt.Sprintf("mkdir -p /tmp/www && echo web-%d > /tmp/www/index.html && cd /tmp/www && (python3 -m http.server %d >/dev/null 2>&1 &)", pid, port)); code != 0 {
		t.Fatalf("start web server: %d %s", code, out)
	}
	want := fmt.Sprintf("web-%d\n", pid)
	var body string
	for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if body, err = httpVia(e.rt, id, port, "/index.html"); err == nil {
			break
		}
	}
	if body != want {
		t.Fatalf("web server through Dial: %q, %v", body, err)
	}
	router := slot.HostIP
	if a, err := netip.ParseAddr(slot.HostIP); err == nil {
		router = a.Next().String()
	}
	// (Not GuestIP: from the host it is routed to the default gateway, a
	// network this test must not send to; the slot's own link is Dial's.)
	for _, host := range []string{"127.0.0.1", slot.HostIP, router} {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(host, strconv.Itoa(port)), time.Second)
		if err == nil {
			c.Close()
			t.Errorf("the sandbox's port %d is reachable from the host at %s", port, host)
		}
	}

	// Pause keeps the slot; Resume comes back in it, with egress and the
	// web server.
	if err := e.rt.Pause(ctx, id); err != nil {
		t.Fatal(err)
	}
	if !e.pooled && released(e.mgr, slot.ID) {
		t.Fatal("pause released the slot")
	}
	if _, err := e.rt.Dial(ctx, id, port); !errs.Is(err, errs.Conflict) {
		t.Fatalf("Dial of a paused sandbox: %v, want Conflict", err)
	}
	// A paused sandbox's policy can be changed; it holds after resume.
	if err := e.rt.SetPolicy(id, network.Policy{AllowInternetAccess: network.Bool(false)}); err != nil {
		t.Fatal(err)
	}
	info, err := e.rt.Resume(ctx, id, runtime.NetSlot{})
	if err != nil {
		t.Fatal(err)
	}
	if !e.pooled && info.Net.ID != slot.ID {
		t.Fatalf("resumed in slot %q, want %q", info.Net.ID, slot.ID)
	}
	if body, err := httpVia(e.rt, id, port, "/index.html"); body != want {
		t.Fatalf("web server after resume: %q, %v", body, err)
	}
	if canReachInternet(t, e.rt, id) {
		t.Fatal("the policy set while paused does not hold after resume")
	}
	if err := e.rt.SetPolicy(id, network.Policy{}); err != nil {
		t.Fatal(err)
	}
	if !canReachInternet(t, e.rt, id) {
		t.Fatal("no egress after resume")
	}

	// Destroy returns the slot.
	if err := e.rt.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
	if !e.pooled && !released(e.mgr, slot.ID) {
		t.Fatal("destroy did not release the slot")
	}
	if _, err := e.rt.Dial(ctx, id, port); !errs.Is(err, errs.NotFound) {
		t.Fatalf("Dial after destroy: %v, want NotFound", err)
	}
	if err := e.rt.SetPolicy(id, network.Policy{}); !errs.Is(err, errs.NotFound) {
		t.Fatalf("SetPolicy after destroy: %v, want NotFound", err)
	}
}

// TestRestartReadoption: a sandbox survives a restart of cube (runtime,
// manager and wrapper rebuilt on the same state) with its slot and policy;
// a slot nobody owns is reaped.
func TestRestartReadoption(t *testing.T) { bothModes(t, testRestartReadoption) }

func testRestartReadoption(t *testing.T, e *gvEnv) {
	ctx := context.Background()
	id := "restart-" + strconv.Itoa(pid)
	if _, err := e.rt.CreateWithPolicy(ctx, runtime.CreateSpec{ID: id, TemplateID: e.tid},
		network.Policy{AllowInternetAccess: network.Bool(false)}); err != nil {
		t.Fatal(err)
	}
	slot, _ := e.rt.Slot(id)
	stray, err := e.mgr.Acquire(ctx) // a slot whose sandbox never came up
	if err != nil {
		t.Fatal(err)
	}
	// Restart: the old process's objects are closed (sandboxes and slots
	// stay) and rebuilt on the same state.
	if err := e.rt.Close(); err != nil {
		t.Fatal(err)
	}
	e.open(t)
	defer e.rt.Destroy(ctx, id)
	if s, err := e.rt.Slot(id); err != nil || s.ID != slot.ID {
		t.Fatalf("slot after restart: %+v %v, want %s", s, err, slot.ID)
	}
	if _, err := os.Stat(stray.RouterNetnsPath); err == nil {
		t.Errorf("the stray slot %s was not reaped", stray.ID)
	}
	if out, code := sh(t, e.rt, id, "echo alive"); code != 0 || out != "alive\n" {
		t.Fatalf("exec after restart: %q %d", out, code)
	}
	if canReachInternet(t, e.rt, id) {
		t.Fatal("the stored policy (internet off) was not re-applied")
	}
	if err := e.rt.SetPolicy(id, network.Policy{}); err != nil {
		t.Fatal(err)
	}
	if !canReachInternet(t, e.rt, id) {
		t.Fatal("no egress after restart and policy update")
	}
	if err := e.rt.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
	if !e.pooled && !released(e.mgr, slot.ID) {
		t.Fatal("destroy after restart did not release the slot")
	}
}

// TestCallerManagedSlot: a sandbox created with a slot of the caller's
// (how a node that manages slots itself uses the runtime) passes through
// the wrapper: gVisor in that slot reaches the internet, is reached by the
// runtime's own Dial (the router namespace), and resumes from a pause in a
// different slot.
func TestCallerManagedSlot(t *testing.T) {
	e := gvisorEnv(t)
	ctx := context.Background()
	id := "caller-" + strconv.Itoa(pid)
	s1, err := e.mgr.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.CreateWithPolicy(ctx, runtime.CreateSpec{ID: id, TemplateID: e.tid, Net: s1},
		network.Policy{AllowInternetAccess: network.Bool(false)}); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("policy on a caller's slot: %v, want InvalidArgument", err)
	}
	info, err := e.rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: e.tid, Net: s1,
		Env: map[string]string{"WHO": "caller"}, AccessToken: ""})
	if err != nil {
		t.Fatal(err)
	}
	defer e.rt.Destroy(ctx, id)
	if info.Net.ID != s1.ID {
		t.Fatalf("created in %q, want the caller's %q", info.Net.ID, s1.ID)
	}
	if _, err := e.rt.Slot(id); !errs.Is(err, errs.NotFound) {
		t.Fatalf("the wrapper claims a caller's sandbox: %v", err)
	}
	if out, _ := sh(t, e.rt, id, "echo $WHO"); out != "caller\n" {
		t.Fatalf("env through /init via the router namespace: %q", out)
	}
	if !canReachInternet(t, e.rt, id) {
		t.Fatal("no egress in the caller's slot")
	}
	if err := e.rt.Pause(ctx, id); err != nil {
		t.Fatal(err)
	}
	if err := e.mgr.Release(ctx, s1.ID); err != nil {
		t.Fatal(err)
	}
	s2, err := e.mgr.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer e.mgr.Release(ctx, s2.ID)
	if info, err = e.rt.Resume(ctx, id, s2); err != nil || info.Net.ID != s2.ID {
		t.Fatalf("resume in another slot: %+v %v", info.Net, err)
	}
	if out, _ := sh(t, e.rt, id, "echo $WHO"); out != "caller\n" {
		t.Fatalf("after resume: %q", out)
	}
	if !canReachInternet(t, e.rt, id) {
		t.Fatal("no egress after resuming in another slot")
	}
	if err := e.mgr.SetPolicy(s2.ID, network.Policy{AllowInternetAccess: network.Bool(false)}); err != nil {
		t.Fatal(err)
	}
	if canReachInternet(t, e.rt, id) {
		t.Fatal("the new slot's policy does not hold")
	}
	if err := e.rt.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
}
