package server_test

import (
	"context"
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

	"github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/logging"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
)

// TestMain doubles as a child server process: with CUBE_TEST_CHILD_DIR set
// it runs a cube server on the fake runtime whose state lives in that
// directory (as runsc sandboxes outlive a cube process), and writes its
// address to DIR/addr.
func TestMain(m *testing.M) {
	if dir := os.Getenv("CUBE_TEST_CHILD_DIR"); dir != "" {
		childServer(dir)
		return
	}
	os.Exit(m.Run())
}

func childServer(dir string) {
	ctx := context.Background()
	cfg := config.Default()
	cfg.DataDir = dir
	rt, err := runtimetest.New(filepath.Join(dir, "rt"))
	if err != nil {
		panic(err)
	}
	rt.Handler = runtimetest.EnvdLike
	if os.Getenv("CUBE_TEST_HOLD_SNAPSHOT_CREATES") != "" {
		// Creates from a snapshot (forks) announce themselves in DIR/held-<id>
		// and never finish: the test kills the process meanwhile.
		rt.FailCreate = func(spec runtime.CreateSpec) error {
			if spec.SnapshotID != "" {
				os.WriteFile(filepath.Join(dir, "held-"+spec.ID), []byte(spec.SnapshotID), 0o600)
				select {}
			}
			return nil
		}
	}
	s, err := server.New(ctx, cfg, rt, logging.New(os.Stderr, "info", "text"))
	if err != nil {
		panic(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	os.WriteFile(filepath.Join(dir, "addr.tmp"), []byte(ln.Addr().String()), 0o600)
	os.Rename(filepath.Join(dir, "addr.tmp"), filepath.Join(dir, "addr"))
	s.Serve(ctx, ln)
}

func startChild(t *testing.T, dir string, env ...string) (*exec.Cmd, string) {
	t.Helper()
	os.Remove(filepath.Join(dir, "addr"))
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "CUBE_TEST_CHILD_DIR="+dir), env...)
	log, _ := os.Create(filepath.Join(dir, fmt.Sprintf("child-%d.log", time.Now().UnixNano())))
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait(); log.Close() })
	for i := 0; i < 200; i++ {
		if b, err := os.ReadFile(filepath.Join(dir, "addr")); err == nil {
			return cmd, "http://" + string(b)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("child server did not start")
	return nil, ""
}

// SIGKILL of a real cube server process, then a restart on the same data
// dir: every sandbox is still there, running ones answer through the
// proxy, paused ones resume, nothing leaked.
func TestSIGKILLAndRestart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	st.PutTemplate(ctx, &store.Template{ID: "base", Aliases: []string{"base"}, EnvdVersion: "0.6.13", CPUCount: 1, MemoryMB: 256, DiskMB: 512, State: "ready"})
	key, _, _ := st.CreateAPIKey(ctx, "t")
	st.Close()
	os.MkdirAll(filepath.Join(dir, "rt"), 0o700)
	rt, _ := runtimetest.New(filepath.Join(dir, "rt"))
	rt.BakeTemplate(ctx, runtime.Template{ID: "base"})
	rt.Close()

	child, url := startChild(t, dir)
	cl := client.New(url, url, key)
	var ids []string
	for i := 0; i < 4; i++ {
		sb, err := cl.Create(ctx, "base", client.CreateOptions{Metadata: map[string]string{"i": fmt.Sprint(i)}})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, sb.SandboxID)
	}
	if err := cl.Pause(ctx, ids[1]); err != nil {
		t.Fatal(err)
	}
	cl.Kill(ctx, ids[3])
	// Kill -9 mid-operation: a request in flight when the process dies.
	go cl.Pause(ctx, ids[2])
	time.Sleep(5 * time.Millisecond)
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()

	_, url = startChild(t, dir)
	cl = client.New(url, url, key)
	l, err := cl.List(ctx)
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, s := range l {
		states[s.SandboxID] = s.State
	}
	if len(l) != 3 || states[ids[0]] != "running" || states[ids[1]] != "paused" || states[ids[3]] != "" {
		t.Fatalf("after restart: %v (ids %v)", states, ids)
	}
	// The running one answers through the proxy.
	for _, id := range []string{ids[0], ids[2]} {
		if states[id] != "running" {
			continue
		}
		req, _ := http.NewRequest("GET", url+"/who", nil)
		req.Header.Set("E2b-Sandbox-Id", id)
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if res.StatusCode != 200 || !strings.HasPrefix(string(b), id) {
			t.Fatalf("proxy after restart: %d %s", res.StatusCode, b)
		}
	}
	// The paused one resumes.
	if _, err := cl.Resume(ctx, ids[1], 60); err != nil {
		t.Fatal(err)
	}
	// The runtime holds exactly the live sandboxes.
	rt2, _ := runtimetest.New(filepath.Join(dir, "rt"))
	defer rt2.Close()
	infos, _ := rt2.List(ctx)
	if len(infos) != 3 {
		t.Fatalf("runtime has %d sandboxes", len(infos))
	}
	for _, id := range ids[:3] {
		if err := cl.Kill(ctx, id); err != nil {
			t.Fatal(err)
		}
	}
}
