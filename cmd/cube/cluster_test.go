//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	cubeclient "github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/config"
)

// clusterBins returns a directory with cube and a static cube-agent:
// $CUBE_BIN (make test builds it) or a fresh build.
func clusterBins(t *testing.T) string {
	t.Helper()
	if b := os.Getenv("CUBE_BIN"); b != "" && isFile(filepath.Join(b, "cube")) && isFile(filepath.Join(b, "cube-agent")) {
		return b
	}
	cube := builtCube(t)
	dir := filepath.Dir(cube)
	if !isFile(filepath.Join(dir, "cube-agent")) {
		cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, "cube-agent"), "../cube-agent")
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build cube-agent: %v\n%s", err, out)
		}
	}
	return dir
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// proc is a cube process of the test.
type proc struct {
	cmd    *exec.Cmd
	exited chan struct{}
	lines  chan string // stdout
	log    string
}

func startProc(t *testing.T, bin, log string, env []string, args ...string) *proc {
	t.Helper()
	lf, err := os.OpenFile(log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Env, cmd.Stderr = env, lf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, exited: make(chan struct{}), lines: make(chan string, 64), log: log}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			default:
			}
		}
		cmd.Wait()
		lf.Close()
		close(p.exited)
	}()
	t.Cleanup(func() { p.stop(syscall.SIGTERM) })
	return p
}

// await returns the first stdout line with prefix, failing after d or if
// the process exits.
func (p *proc) await(t *testing.T, prefix string, d time.Duration) string {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	for {
		select {
		case l := <-p.lines:
			if strings.HasPrefix(l, prefix) {
				return l
			}
		case <-p.exited:
			b, _ := os.ReadFile(p.log)
			t.Fatalf("%s exited (%v) before printing %q:\n%s", p.cmd.Path, p.cmd.ProcessState, prefix, tail(b, 3000))
		case <-timer.C:
			b, _ := os.ReadFile(p.log)
			t.Fatalf("no %q from %s in %v:\n%s", prefix, p.cmd.Args, d, tail(b, 3000))
		}
	}
}

// stop signals the process group and waits (SIGKILL after 30 s).
func (p *proc) stop(sig syscall.Signal) {
	select {
	case <-p.exited:
		return
	default:
	}
	syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.exited:
	case <-time.After(30 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.exited
	}
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// nodeHas asks a node's API (with the cluster token) for its record of a
// sandbox: its state, or "" if the node does not have it.
func nodeHas(t *testing.T, addr, tok, id string) string {
	t.Helper()
	req, _ := http.NewRequest("GET", "http://"+addr+"/node/v1/sandboxes/"+id, nil)
	req.Header.Set("Authorization", "Bearer "+tok)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode == 404 {
		return ""
	}
	var sb struct{ State string }
	if err := json.NewDecoder(res.Body).Decode(&sb); err != nil || res.StatusCode != 200 {
		t.Fatalf("node %s: %d %v", addr, res.StatusCode, err)
	}
	return sb.State
}

// cleanRunsc removes the gVisor sandboxes and mounts a node left behind
// (a node killed with SIGKILL leaves its sandboxes running).
func cleanRunsc(runsc, dataDir string) {
	root := filepath.Join(dataDir, "gvisor", "run")
	out, _ := exec.Command(runsc, "--root", root, "list", "-quiet").Output()
	for _, id := range strings.Fields(string(out)) {
		exec.Command(runsc, "--root", root, "delete", "-force", id).Run()
	}
	for unix.Unmount(filepath.Join(root, "null-netns"), unix.MNT_DETACH) == nil {
	}
}

// TestClusterGVisor: a real control (`cube server --role=control`) and
// two real nodes (`cube node --join`, gVisor, their own data dirs and
// ports) on loopback. Sandboxes land on both nodes; exec through the
// control's proxy reaches each; kill (and its events in the logs); a wrong token is refused (a node
// with it does not start); a node killed with SIGKILL is marked down and
// its sandbox reported not running (no hanging request); the node comes
// back with its sandbox; the control restarts and still routes to it.
func TestClusterGVisor(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (gVisor sandboxes); the fake-runtime sibling is internal/cluster TestControlTwoNodes")
	}
	cfg := config.Default()
	if v := os.Getenv("CUBE_CACHE_DIR"); v != "" {
		cfg.CacheDir = v
	}
	runsc, err := serverRunsc(cfg)
	if err != nil {
		t.Skipf("%v (make runsc); the fake-runtime sibling is internal/cluster TestControlTwoNodes", err)
	}
	bins := clusterBins(t)
	cube := filepath.Join(bins, "cube")
	const tok = "e2e-cluster-token"
	// serverEnv's CUBE_AGENT=/nonexistent comes first; the later one wins.
	env := serverEnv("CUBE_AGENT="+filepath.Join(bins, "cube-agent"), "CUBE_RUNSC="+runsc, "CUBE_CACHE_DIR="+cfg.CacheDir,
		"CUBE_BUILTIN_TEMPLATES=base", "CUBE_HEARTBEAT_INTERVAL=250ms", "CUBE_NODE_DOWN_AFTER=3s")

	ctlDir := t.TempDir()
	ctlAddr := freeAddr(t)
	ctlURL := "http://" + ctlAddr
	startControl := func() *proc {
		p := startProc(t, cube, filepath.Join(ctlDir, "control.log"), env, "--data-dir", ctlDir, "server", "--role=control",
			"--listen", ctlAddr, "--cluster-token", tok)
		return p
	}
	ctl := startControl()
	key := strings.TrimPrefix(ctl.await(t, "export E2B_API_KEY=", time.Minute), "export E2B_API_KEY=")

	// A node with a wrong token is refused before it starts its runtime.
	bad := exec.Command(cube, "--data-dir", t.TempDir(), "node", "--join", ctlURL, "--cluster-token", "wrong",
		"--listen", freeAddr(t), "--id", "bad")
	bad.Env = env
	if out, err := bad.CombinedOutput(); err == nil || !strings.Contains(string(out), "cluster token") {
		t.Fatalf("node with a wrong token: %v\n%s", err, out)
	}

	type nodeProc struct {
		id, dir, addr string
		env           []string
		p             *proc
	}
	// Each node gets network slots of its own (names and host addresses),
	// as two nodes on one host must.
	pid := os.Getpid()
	nodeEnv := func(id string) []string {
		i := int(id[1] - '0')
		return append(append([]string{}, env...), fmt.Sprintf("CUBE_SLOT_PREFIX=k%d%s", pid%10000, id),
			fmt.Sprintf("CUBE_SLOT_HOST_RANGE=10.%d.%d.0/24", 230+i, pid%250), "CUBE_SLOT_POOL_SIZE=1")
	}
	startNode := func(n *nodeProc) {
		n.p = startProc(t, cube, filepath.Join(n.dir, "node.log"), n.env, "--data-dir", n.dir, "node", "--join", ctlURL,
			"--cluster-token", tok, "--id", n.id, "--listen", n.addr, "--advertise", n.addr,
			"--max-sandboxes", "4")
	}
	nodes := []*nodeProc{{id: "n1", dir: t.TempDir(), addr: freeAddr(t)}, {id: "n2", dir: t.TempDir(), addr: freeAddr(t)}}
	for _, n := range nodes {
		n.env = nodeEnv(n.id)
		t.Cleanup(func() {
			cleanRunsc(runsc, n.dir)
			// The slots and the host table of the node's prefix.
			purge := exec.Command(cube, "--data-dir", n.dir, "net", "purge")
			purge.Env = n.env
			if out, err := purge.CombinedOutput(); err != nil {
				t.Logf("cube net purge (%s): %v %s", n.id, err, out)
			}
		})
		startNode(n)
	}
	for _, n := range nodes {
		n.p.await(t, "cube node "+n.id+" joined", 15*time.Minute) // bakes the base template
	}

	// `cube node list` shows both nodes ready.
	nodeStates := func() map[string]string {
		cmd := exec.Command(cube, "node", "list", "--control", ctlURL, "--cluster-token", tok, "--json")
		cmd.Env = env
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cube node list: %v", err)
		}
		var ns []struct{ ID, State string }
		if err := json.Unmarshal(out, &ns); err != nil {
			t.Fatalf("cube node list: %v %s", err, out)
		}
		m := map[string]string{}
		for _, n := range ns {
			m[n.ID] = n.State
		}
		return m
	}
	if st := nodeStates(); st["n1"] != "ready" || st["n2"] != "ready" || len(st) != 2 {
		t.Fatalf("cube node list: %v", st)
	}
	if out, err := exec.Command(cube, "node", "list", "--control", ctlURL, "--cluster-token", "wrong").CombinedOutput(); err == nil || !strings.Contains(string(out), "401") {
		t.Fatalf("cube node list with a wrong token: %v %s", err, out)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cl := cubeclient.New(ctlURL, ctlURL, key)
	// Each create goes to the least loaded node: one on each.
	type sbx struct{ id, token, node string }
	var sbs []sbx
	for i := 0; i < 2; i++ {
		sb, err := cl.Create(ctx, "base", cubeclient.CreateOptions{Timeout: 300})
		if err != nil {
			t.Fatal(err)
		}
		s := sbx{id: sb.SandboxID, token: sb.EnvdAccessToken}
		for _, n := range nodes {
			if st := nodeHas(t, n.addr, tok, s.id); st == "running" {
				s.node = n.id
			}
		}
		sbs = append(sbs, s)
	}
	if sbs[0].node == "" || sbs[1].node == "" || sbs[0].node == sbs[1].node {
		t.Fatalf("sandboxes not spread over the two nodes: %+v", sbs)
	}
	exec := func(s sbx) (string, error) {
		var out bytes.Buffer
		r, err := cl.Exec(ctx, s.id, s.token, "echo hello-from-$((6*7))", &out, io.Discard)
		if err == nil && r.ExitCode != 0 {
			err = fmt.Errorf("exit %d %s", r.ExitCode, r.Error)
		}
		return out.String(), err
	}
	for _, s := range sbs {
		if out, err := exec(s); err != nil || strings.TrimSpace(out) != "hello-from-42" {
			t.Fatalf("exec through the proxy into %s on %s: %q %v", s.id, s.node, out, err)
		}
	}
	byNode := map[string]sbx{sbs[0].node: sbs[0], sbs[1].node: sbs[1]}

	// Kill the one on n1.
	if err := cl.Kill(ctx, byNode["n1"].id); err != nil {
		t.Fatal(err)
	}
	if st := nodeHas(t, nodes[0].addr, tok, byNode["n1"].id); st != "killed" {
		t.Fatalf("n1's record after kill: %q", st)
	}

	// The node's events of it reach the control's logs endpoint.
	deadline := time.Now().Add(30 * time.Second)
	for {
		req, _ := http.NewRequest("GET", ctlURL+"/sandboxes/"+byNode["n1"].id+"/logs", nil)
		req.Header.Set("X-API-Key", key)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode == 200 && strings.Contains(string(b), "sandbox killed") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("logs of the killed sandbox through the control: %d %s", res.StatusCode, b)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// The node API refuses calls without the token.
	res, err := http.Get("http://" + nodes[1].addr + "/node/v1/sandboxes/" + byNode["n2"].id)
	if err != nil || res.StatusCode != http.StatusUnauthorized {
		t.Fatalf("node API without a token: %v %v", res, err)
	}
	res.Body.Close()

	// SIGKILL n2: it is marked down, its sandbox is no longer listed and
	// the proxy answers at once instead of hanging.
	on2 := byNode["n2"]
	nodes[1].p.stop(syscall.SIGKILL)
	deadline = time.Now().Add(30 * time.Second)
	for {
		l, err := cl.List(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(l) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the sandbox of the dead node is still listed: %+v", l)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st := nodeStates(); st["n2"] != "down" || st["n1"] != "ready" {
		t.Fatalf("cube node list after n2 died: %v", st)
	}
	t0 := time.Now()
	if _, err := exec(on2); err == nil || time.Since(t0) > 5*time.Second {
		t.Fatalf("exec into a sandbox of a dead node: %v after %v", err, time.Since(t0))
	}
	if _, err := cl.Get(ctx, on2.id); err == nil {
		t.Fatal("GET of a sandbox of a dead node succeeds")
	}

	// n2 comes back: it re-adopts its sandbox and reports it.
	startNode(nodes[1])
	nodes[1].p.await(t, "cube node n2 joined", 5*time.Minute)
	waitListed := func(what string) {
		deadline := time.Now().Add(30 * time.Second)
		for {
			if l, err := cl.List(ctx); err == nil && len(l) == 1 && l[0].SandboxID == on2.id && l[0].State == "running" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: the sandbox of n2 is not listed running", what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitListed("after n2 came back")
	// The control restarts: it routes to n2 at once.
	ctl.stop(syscall.SIGTERM)
	ctl = startControl()
	ctl.await(t, "export E2B_API_KEY=", time.Minute)
	waitListed("after a restart of the control")
	if out, err := exec(on2); err != nil || strings.TrimSpace(out) != "hello-from-42" {
		t.Fatalf("exec after the node came back and the control restarted: %q %v", out, err)
	}
	if err := cl.Kill(ctx, on2.id); err != nil {
		t.Fatal(err)
	}
	if st := nodeHas(t, nodes[1].addr, tok, on2.id); st != "killed" {
		t.Fatalf("n2's record after kill: %q", st)
	}
	for _, n := range nodes {
		n.p.stop(syscall.SIGTERM)
	}
	ctl.stop(syscall.SIGTERM)
}
