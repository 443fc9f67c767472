package server_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/store"
)

// TestForkKilledMidwaySweptOnStart: a real server process is killed with
// SIGKILL while a fork is creating its sandboxes (its temporary snapshot
// taken, the creates in the runtime). A record whose snapshot is gone (a
// deletion interrupted between runtime and store) is added meanwhile. On
// restart the server removes the fork's snapshot and that record, logs
// both, fails the half-made forks, and keeps the parent and a named
// snapshot taken before (still restorable).
func TestForkKilledMidwaySweptOnStart(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	st, err := store.Open(ctx, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	st.PutTemplate(ctx, &store.Template{ID: "base", Aliases: []string{"base"}, EnvdVersion: "0.6.13", CPUCount: 1, MemoryMB: 256, DiskMB: 512, State: "ready"})
	key, k, _ := st.CreateAPIKey(ctx, "t")
	st.Close()
	os.MkdirAll(filepath.Join(dir, "rt"), 0o700)
	rt, _ := runtimetest.New(filepath.Join(dir, "rt"))
	rt.BakeTemplate(ctx, runtime.Template{ID: "base"})
	rt.Close()

	child, url := startChild(t, dir, "CUBE_TEST_HOLD_SNAPSHOT_CREATES=1")
	cl := client.New(url, url, key)
	parent, err := cl.Create(ctx, "base", client.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	post := func(url, path, body string) (int, []byte) {
		req, _ := http.NewRequest("POST", url+path, strings.NewReader(body))
		req.Header.Set("X-API-KEY", key)
		req.Header.Set("Content-Type", "application/json")
		res, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, nil
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, b
	}
	code, b := post(url, "/sandboxes/"+parent.SandboxID+"/snapshots", `{"name":"keepme"}`)
	var named struct{ SnapshotID string }
	if json.Unmarshal(b, &named); code != 201 || named.SnapshotID == "" {
		t.Fatalf("named snapshot: %d %s", code, b)
	}
	go post(url, "/sandboxes/"+parent.SandboxID+"/fork", `{"count":2}`)
	// Wait until both fork creates are inside the runtime, then kill -9.
	deadline := time.Now().Add(10 * time.Second)
	for {
		held, _ := filepath.Glob(filepath.Join(dir, "held-*"))
		if len(held) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("fork creates never reached the runtime (%d held)", len(held))
		}
		time.Sleep(20 * time.Millisecond)
	}
	child.Process.Signal(syscall.SIGKILL)
	child.Wait()
	rt, _ = runtimetest.New(filepath.Join(dir, "rt"))
	before := rt.Snapshots()
	rt.Close()
	if len(before) != 2 {
		t.Fatalf("runtime snapshots before restart %v (want the named one and the fork's)", before)
	}
	// A record without its snapshot (a deletion interrupted after the runtime).
	st, _ = store.Open(ctx, dir, "")
	if err := st.CreateSnapshot(ctx, &store.Snapshot{ID: "halfrecord0000000000", KeyID: k.ID, SandboxID: parent.SandboxID, TemplateID: "base", NodeID: "local"}); err != nil {
		t.Fatal(err)
	}
	st.Close()

	_, url = startChild(t, dir)
	cl = client.New(url, url, key)
	rt, _ = runtimetest.New(filepath.Join(dir, "rt"))
	after := rt.Snapshots()
	rt.Close()
	if fmt.Sprint(after) != "["+named.SnapshotID+"]" {
		t.Fatalf("runtime snapshots after restart %v, want only %s", after, named.SnapshotID)
	}
	req, _ := http.NewRequest("GET", url+"/snapshots", nil)
	req.Header.Set("X-API-KEY", key)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ = io.ReadAll(res.Body)
	res.Body.Close()
	var listed []struct{ SnapshotID string }
	json.Unmarshal(b, &listed)
	if len(listed) != 1 || listed[0].SnapshotID != named.SnapshotID {
		t.Fatalf("snapshots after restart: %s", b)
	}
	l, err := cl.List(ctx)
	if err != nil || len(l) != 1 || l[0].SandboxID != parent.SandboxID {
		t.Fatalf("sandboxes after restart: %+v %v (the half-made forks must be gone)", l, err)
	}
	// The named snapshot still restores.
	if code, b := post(url, "/v2/sandboxes", `{"templateID":"keepme"}`); code != 201 {
		t.Fatalf("create from the kept snapshot: %d %s", code, b)
	}
	// The restarted server logged what it removed.
	logs, _ := filepath.Glob(filepath.Join(dir, "child-*.log"))
	sort.Strings(logs)
	lb, _ := os.ReadFile(logs[len(logs)-1])
	fork := before[0]
	if fork == named.SnapshotID {
		fork = before[1]
	}
	for _, want := range []string{"sweep: removed leftover snapshot", fork, "sweep: removed snapshot record", "halfrecord0000000000"} {
		if !strings.Contains(string(lb), want) {
			t.Fatalf("restart log lacks %q:\n%s", want, lb)
		}
	}
}
