package cluster_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/cluster"
	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/logging"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
	"github.com/cubesandbox/cube/internal/store/storetest"
)

const token = "test-cluster-token"

// control is a control plane on a fixed loopback address (so that it can
// be restarted where its nodes look for it).
type control struct {
	t    testing.TB
	cfg  config.Config
	db   string
	addr string
	s    *server.Server
	hs   *http.Server
}

func startControl(t testing.TB, dir, addr string) *control {
	return startControlDB(t, dir, "", addr)
}

// startControlDB starts a control whose store is dbURL ("" = SQLite in
// dir).
func startControlDB(t testing.TB, dir, dbURL, addr string) *control {
	t.Helper()
	cfg := config.Default()
	cfg.DataDir, cfg.DatabaseURL, cfg.Role, cfg.ClusterToken = dir, dbURL, "control", token
	cfg.HeartbeatInterval, cfg.NodeDownAfter = 50*time.Millisecond, 1500*time.Millisecond
	s, err := server.NewControl(context.Background(), cfg, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	deadline := time.Now().Add(5 * time.Second)
	for {
		ln, err = net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	c := &control{t: t, cfg: cfg, db: dbURL, addr: ln.Addr().String(), s: s, hs: &http.Server{Handler: s.Handler()}}
	go c.hs.Serve(ln)
	t.Cleanup(c.stop)
	return c
}

func (c *control) stop() {
	if c.hs != nil {
		c.hs.Close()
		c.s.Close()
		c.hs = nil
	}
}

func (c *control) url() string { return "http://" + c.addr }

// testNode is a node agent on the fake runtime.
type testNode struct {
	id     string
	rt     *runtimetest.Fake
	n      *node.Node
	st     *store.Store
	srv    *httptest.Server
	cancel context.CancelFunc
}

func startNode(t *testing.T, id string, capacity int, controlURL string) *testNode {
	return startNodeTB(t, id, capacity, controlURL)
}

func startNodeTB(t testing.TB, id string, capacity int, controlURL string) *testNode {
	t.Helper()
	ctx := context.Background()
	rt, err := runtimetest.New("")
	if err != nil {
		t.Fatal(err)
	}
	rt.Handler = runtimetest.EnvdLike
	rt.BakeTemplate(ctx, runtime.Template{ID: "base"})
	st, err := store.Open(ctx, t.TempDir(), "")
	if err != nil {
		t.Fatal(err)
	}
	st.PutTemplate(ctx, &store.Template{ID: "base", Aliases: []string{"base"}, EnvdVersion: "0.6.13", CPUCount: 1, MemoryMB: 256, DiskMB: 512, State: "ready", Public: true})
	n := node.New(node.Config{ID: id, Capacity: capacity}, rt, st, logging.Discard())
	if err := n.Start(ctx); err != nil {
		t.Fatal(err)
	}
	tn := &testNode{id: id, rt: rt, n: n, st: st}
	tn.srv = httptest.NewServer(cluster.NewNodeServer(n, token, logging.Discard()).Handler())
	ag, err := cluster.NewAgent(cluster.AgentConfig{ControlURL: controlURL, Token: token,
		Advertise: strings.TrimPrefix(tn.srv.URL, "http://"), Interval: 50 * time.Millisecond}, n, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	actx, cancel := context.WithCancel(ctx)
	tn.cancel = cancel
	if err := ag.Register(actx); err != nil {
		t.Fatal(err)
	}
	go ag.Run(actx)
	t.Cleanup(tn.stop)
	return tn
}

// stop ends the node as a crash would look to the control: no more
// heartbeats, its API gone.
func (tn *testNode) stop() {
	tn.cancel()
	tn.srv.CloseClientConnections()
	tn.srv.Close()
	tn.n.Stop()
	tn.st.Close()
	tn.rt.Close()
}

func waitFor(t *testing.T, what string, d time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// who asks the sandbox (EnvdLike) through the control's proxy.
func who(t *testing.T, url, id string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest("GET", url+"/who", nil)
	req.Header.Set("E2b-Sandbox-Id", id)
	req.Header.Set("E2b-Sandbox-Port", "49983")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

func listStates(t *testing.T, cl *client.Client) map[string]string {
	t.Helper()
	l, err := cl.List(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, s := range l {
		out[s.SandboxID] = s.State
	}
	return out
}

// A control and two nodes on the fake runtime: creates spread over both
// nodes, proxy and lifecycle calls reach the owning node, a silent node is
// marked down (its sandboxes are no longer listed or routed, creates go to
// the other), and a restarted control routes to the nodes at once. The
// control's store is SQLite.
func TestControlTwoNodes(t *testing.T) { testControlTwoNodes(t, "") }

// TestControlTwoNodesPostgres: the same with the control's store in
// PostgreSQL (the store of a real cluster).
func TestControlTwoNodesPostgres(t *testing.T) { testControlTwoNodes(t, storetest.Postgres(t)) }

func testControlTwoNodes(t *testing.T, dbURL string) {
	ctx := context.Background()
	dir := t.TempDir()
	c := startControlDB(t, dir, dbURL, "")
	key, _, err := c.s.Store.CreateAPIKey(ctx, "k")
	if err != nil {
		t.Fatal(err)
	}
	n1 := startNode(t, "n1", 4, c.url())
	n2 := startNode(t, "n2", 4, c.url())
	cl := client.New(c.url(), c.url(), key)
	waitFor(t, "the template reported by the nodes", 5*time.Second, func() bool {
		_, err := c.s.Store.ResolveTemplate(ctx, "base")
		return err == nil
	})

	on := map[string]string{} // sandbox -> node
	var ids []string
	for i := 0; i < 4; i++ {
		sb, err := cl.Create(ctx, "base", client.CreateOptions{Timeout: 600})
		if err != nil {
			t.Fatal(err)
		}
		rec, err := c.s.Store.GetSandbox(ctx, sb.SandboxID)
		if err != nil {
			t.Fatal(err)
		}
		on[sb.SandboxID] = rec.NodeID
		ids = append(ids, sb.SandboxID)
	}
	count := map[string]int{}
	for _, n := range on {
		count[n]++
	}
	if count["n1"] != 2 || count["n2"] != 2 {
		t.Fatalf("creates not spread over the nodes: %v", count)
	}
	for _, id := range ids {
		if code, body := who(t, c.url(), id); code != 200 || body != id+":49983" {
			t.Fatalf("proxy to %s on %s: %d %q", id, on[id], code, body)
		}
	}
	// Metrics (the node's sampled history) through the control.
	for _, id := range ids[:2] {
		req, _ := http.NewRequest("GET", c.url()+"/sandboxes/"+id+"/metrics", nil)
		req.Header.Set("X-API-Key", key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		var ms []map[string]any
		json.NewDecoder(res.Body).Decode(&ms)
		res.Body.Close()
		if res.StatusCode != 200 || len(ms) == 0 {
			t.Fatalf("metrics of %s on %s: %d %v", id, on[id], res.StatusCode, ms)
		}
	}
	// Lifecycle calls go to the owning node.
	if err := cl.Kill(ctx, ids[0]); err != nil {
		t.Fatal(err)
	}
	if err := cl.Pause(ctx, ids[1]); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Resume(ctx, ids[1], 60); err != nil {
		t.Fatal(err)
	}
	if st := listStates(t, cl); len(st) != 3 || st[ids[0]] != "" || st[ids[1]] != "running" {
		t.Fatalf("after kill/pause/resume: %v", st)
	}
	if code, _ := who(t, c.url(), ids[0]); code == 200 {
		t.Fatal("a killed sandbox still answers")
	}
	// The node's lifecycle events reach the control's logs endpoint.
	waitFor(t, "the killed sandbox's events in its logs", 5*time.Second, func() bool {
		req, _ := http.NewRequest("GET", c.url()+"/sandboxes/"+ids[0]+"/logs", nil)
		req.Header.Set("X-API-Key", key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		return res.StatusCode == 200 && strings.Contains(string(b), "sandbox running") && strings.Contains(string(b), "sandbox killed")
	})

	// A fork snapshots on the parent's node and creates there.
	req, _ := http.NewRequest("POST", c.url()+"/sandboxes/"+ids[3]+"/fork", strings.NewReader(`{"count":1,"timeout":600}`))
	req.Header.Set("X-API-Key", key)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var forks []struct {
		Sandbox *struct{ SandboxID string } `json:"sandbox"`
	}
	json.NewDecoder(res.Body).Decode(&forks)
	res.Body.Close()
	if res.StatusCode != http.StatusCreated || len(forks) != 1 || forks[0].Sandbox == nil {
		t.Fatalf("fork: %d %+v", res.StatusCode, forks)
	}
	fork := forks[0].Sandbox.SandboxID
	if rec, err := c.s.Store.GetSandbox(ctx, fork); err != nil || rec.NodeID != on[ids[3]] {
		t.Fatalf("fork of a sandbox on %s is on %v (%v)", on[ids[3]], rec, err)
	}
	if code, body := who(t, c.url(), fork); code != 200 || body != fork+":49983" {
		t.Fatalf("proxy to the fork: %d %q", code, body)
	}
	if err := cl.Kill(ctx, fork); err != nil {
		t.Fatal(err)
	}

	// A timeout set through the API is forwarded; the expiry on the node
	// reaches the control's store through heartbeats.
	victim := ids[2]
	req, _ = http.NewRequest("POST", c.url()+"/sandboxes/"+victim+"/timeout", strings.NewReader(`{"timeout":1}`))
	req.Header.Set("X-API-Key", key)
	req.Header.Set("Content-Type", "application/json")
	res, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if res.StatusCode != http.StatusNoContent {
		t.Fatalf("set timeout: %d", res.StatusCode)
	}
	waitFor(t, "the expired sandbox to leave the list", 5*time.Second, func() bool { return listStates(t, cl)[victim] == "" })

	// n2 dies: it is marked down, its sandboxes are not running any more
	// and not routed, new sandboxes go to n1.
	var onN2 []string
	for _, id := range ids[1:] {
		if on[id] == "n2" && id != victim {
			onN2 = append(onN2, id)
		}
	}
	n2.stop()
	waitFor(t, "n2 down", 5*time.Second, func() bool { return !c.s.Cluster.Nodes()["n2"].Up() })
	// Routing stops at once; the records are written just after.
	waitFor(t, "n2's sandboxes to leave the list", 5*time.Second, func() bool {
		st := listStates(t, cl)
		for _, id := range onN2 {
			if st[id] != "" {
				return false
			}
		}
		return true
	})
	for _, id := range onN2 {
		start := time.Now()
		if code, _ := who(t, c.url(), id); code == 200 || time.Since(start) > 2*time.Second {
			t.Fatalf("proxy to a sandbox of the down node: %d after %v", code, time.Since(start))
		}
		rec, _ := c.s.Store.GetSandbox(ctx, id)
		if rec.State != store.StateFailed || !strings.Contains(rec.Reason, "n2 is down") {
			t.Fatalf("record of a sandbox on the down node: %s %q", rec.State, rec.Reason)
		}
	}
	sb, err := cl.Create(ctx, "base", client.CreateOptions{Timeout: 600})
	if err != nil {
		t.Fatal(err)
	}
	if rec, _ := c.s.Store.GetSandbox(ctx, sb.SandboxID); rec.NodeID != "n1" {
		t.Fatalf("create after n2 died went to %s", rec.NodeID)
	}

	// Restart the control on the same address and data dir: n1's sandboxes
	// answer through the proxy, and n1 is up again after its heartbeat.
	addr := c.addr
	c.stop()
	c2 := startControlDB(t, dir, dbURL, addr)
	for id, n := range on {
		if n == "n1" && id != ids[0] && id != victim {
			if code, body := who(t, c2.url(), id); code != 200 || body != id+":49983" {
				t.Fatalf("proxy after a control restart: %d %q", code, body)
			}
		}
	}
	if code, body := who(t, c2.url(), sb.SandboxID); code != 200 || body != sb.SandboxID+":49983" {
		t.Fatalf("proxy after a control restart: %d %q", code, body)
	}
	waitFor(t, "n1 heartbeats to the new control", 5*time.Second, func() bool {
		r := c2.s.Cluster.Nodes()["n1"]
		return r != nil && r.Up() && r.Free() == n1.n.Free()
	})
}

// Calls without the cluster token, or with a wrong one, are refused on
// both sides; a node with a wrong token cannot join.
func TestClusterToken(t *testing.T) {
	c := startControl(t, t.TempDir(), "")
	tn := startNode(t, "n1", 2, c.url())
	rep, _ := json.Marshal(cluster.Report{ID: "evil", Address: "127.0.0.1:1", Capacity: 100, Free: 100})
	for _, tc := range []struct{ url, method, auth string }{
		{c.url() + "/cluster/v1/heartbeat", "POST", ""},
		{c.url() + "/cluster/v1/heartbeat", "POST", "Bearer wrong"},
		{c.url() + "/cluster/v1/heartbeat", "POST", token}, // no Bearer
		{tn.srv.URL + "/node/v1/sandboxes/x", "GET", ""},
		{tn.srv.URL + "/node/v1/sandboxes", "POST", "Bearer " + token + "x"},
		{tn.srv.URL + "/node/v1/sandboxes/x/dial?port=49983", "GET", "Bearer nope"},
	} {
		req, _ := http.NewRequest(tc.method, tc.url, bytes.NewReader(rep))
		if tc.auth != "" {
			req.Header.Set("Authorization", tc.auth)
		}
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if res.StatusCode != http.StatusUnauthorized {
			t.Fatalf("%s %s with %q: %d", tc.method, tc.url, tc.auth, res.StatusCode)
		}
	}
	if _, ok := c.s.Cluster.Nodes()["evil"]; ok {
		t.Fatal("an unauthenticated report registered a node")
	}
	ag, _ := cluster.NewAgent(cluster.AgentConfig{ControlURL: c.url(), Token: "wrong", Advertise: "127.0.0.1:2"}, tn.n, logging.Discard())
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := ag.Register(ctx); err == nil || !strings.Contains(err.Error(), "cluster token") {
		t.Fatalf("register with a wrong token: %v", err)
	}
}

// Snapshots taken through the control survive a restart of their node
// (the node's start-up sweep must not take them for leftovers); one
// deleted through the control is gone from the node.
func TestSnapshotSurvivesNodeRestart(t *testing.T) {
	ctx := context.Background()
	c := startControl(t, t.TempDir(), "")
	key, _, _ := c.s.Store.CreateAPIKey(ctx, "k")
	tn := startNode(t, "n1", 4, c.url())
	cl := client.New(c.url(), c.url(), key)
	sb, err := cl.Create(ctx, "base", client.CreateOptions{Timeout: 600})
	if err != nil {
		t.Fatal(err)
	}
	call := func(method, path, body string, want int) []byte {
		t.Helper()
		req, _ := http.NewRequest(method, c.url()+path, strings.NewReader(body))
		req.Header.Set("X-API-Key", key)
		req.Header.Set("Content-Type", "application/json")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		if res.StatusCode != want {
			t.Fatalf("%s %s: %d %s", method, path, res.StatusCode, b)
		}
		return b
	}
	var keep, drop struct{ SnapshotID string }
	json.Unmarshal(call("POST", "/sandboxes/"+sb.SandboxID+"/snapshots", `{"name":"keep"}`, http.StatusCreated), &keep)
	json.Unmarshal(call("POST", "/sandboxes/"+sb.SandboxID+"/snapshots", `{}`, http.StatusCreated), &drop)
	call("DELETE", "/templates/"+drop.SnapshotID, "", http.StatusNoContent)

	// Restart the node's lifecycle on the same store and runtime: the
	// reconciler and the sweep run again.
	tn.n.Stop()
	n2 := node.New(node.Config{ID: "n1", Capacity: 4}, tn.rt, tn.st, logging.Discard())
	if err := n2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	defer n2.Stop()
	snaps := strings.Join(tn.rt.Snapshots(), ",")
	if !strings.Contains(snaps, keep.SnapshotID) || strings.Contains(snaps, drop.SnapshotID) {
		t.Fatalf("after a node restart the runtime has snapshots %q; want %s and not %s", snaps, keep.SnapshotID, drop.SnapshotID)
	}
}

// A paused sandbox created with autoResume is resumed on its node by
// traffic through the control's proxy.
func TestAutoResumeThroughControl(t *testing.T) {
	ctx := context.Background()
	c := startControl(t, t.TempDir(), "")
	key, _, _ := c.s.Store.CreateAPIKey(ctx, "k")
	tn := startNode(t, "n1", 4, c.url())
	req, _ := http.NewRequest("POST", c.url()+"/v2/sandboxes", strings.NewReader(`{"templateID":"base","timeout":600,"autoPause":true,"autoResume":{"enabled":true}}`))
	req.Header.Set("X-API-Key", key)
	req.Header.Set("Content-Type", "application/json")
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	var sb struct{ SandboxID string }
	json.NewDecoder(res.Body).Decode(&sb)
	res.Body.Close()
	if res.StatusCode != http.StatusCreated {
		t.Fatalf("create: %d", res.StatusCode)
	}
	cl := client.New(c.url(), c.url(), key)
	if err := cl.Pause(ctx, sb.SandboxID); err != nil {
		t.Fatal(err)
	}
	if st := listStates(t, cl)[sb.SandboxID]; st != "paused" {
		t.Fatalf("after pause: %q", st)
	}
	if code, body := who(t, c.url(), sb.SandboxID); code != 200 || body != sb.SandboxID+":49983" {
		t.Fatalf("proxy to a paused autoResume sandbox: %d %q", code, body)
	}
	if got, err := tn.n.Get(sb.SandboxID); err != nil || got.State != store.StateRunning {
		t.Fatalf("on the node after auto-resume: %v %v", got, err)
	}
	if st := listStates(t, cl)[sb.SandboxID]; st != "running" {
		t.Fatalf("listed after auto-resume: %q", st)
	}
}
