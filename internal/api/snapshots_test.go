package api_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/runtime"
)

type snapshotBody struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

func (e *env) snapshot(key, sandboxID string, body any) snapshotBody {
	e.t.Helper()
	r := e.do("POST", "/sandboxes/"+sandboxID+"/snapshots", key, body)
	if r.Status != http.StatusCreated {
		e.t.Fatalf("snapshot: %d %s", r.Status, r.Body)
	}
	var sn snapshotBody
	r.json(e.t, &sn)
	if !idRE.MatchString(sn.SnapshotID) || sn.Names == nil {
		e.t.Fatalf("snapshot body %s", r.Body)
	}
	return sn
}

// recordSnapshotIDs makes the fake runtime remember the SnapshotID of
// every create.
func recordSnapshotIDs(e *env) func() []string {
	var mu sync.Mutex
	var got []string
	e.rt.FailCreate = func(spec runtime.CreateSpec) error {
		mu.Lock()
		defer mu.Unlock()
		got = append(got, spec.SnapshotID)
		if spec.SnapshotID != "" {
			got[len(got)-1] += "/" + spec.SnapshotAccessToken
		}
		return nil
	}
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return append([]string{}, got...)
	}
}

func TestSnapshotCreateListRestoreDelete(t *testing.T) {
	e := newEnv(t)
	creates := recordSnapshotIDs(e)
	sb := e.create(e.key, map[string]any{"templateID": "base", "metadata": map[string]string{"m": "1"}})
	plain := e.snapshot(e.key, sb.SandboxID, map[string]any{})
	if len(plain.Names) != 0 {
		t.Fatalf("unnamed snapshot has names %v", plain.Names)
	}
	named := e.snapshot(e.key, sb.SandboxID, `{"name":"mysnap"}`)
	if fmt.Sprint(named.Names) != "[mysnap]" || named.SnapshotID == plain.SnapshotID {
		t.Fatalf("named %+v", named)
	}
	// The sandbox keeps running.
	var d struct{ State string }
	r := e.do("GET", "/sandboxes/"+sb.SandboxID, e.key, nil)
	r.json(t, &d)
	if d.State != "running" {
		t.Fatalf("after snapshot: %s", r.Body)
	}
	if got := e.rt.Snapshots(); len(got) != 2 {
		t.Fatalf("runtime snapshots %v", got)
	}

	// List: newest first, filters, paging, another key sees nothing.
	var list []snapshotBody
	r = e.do("GET", "/snapshots", e.key, nil)
	r.json(t, &list)
	if r.Status != 200 || len(list) != 2 || list[0].SnapshotID == list[1].SnapshotID || r.Header.Get("X-Next-Token") != "" {
		t.Fatalf("list %d %s", r.Status, r.Body)
	}
	r = e.do("GET", "/snapshots?name=mysnap&sandboxID="+sb.SandboxID, e.key, nil)
	r.json(t, &list)
	if len(list) != 1 || list[0].SnapshotID != named.SnapshotID {
		t.Fatalf("name filter %s", r.Body)
	}
	r = e.do("GET", "/snapshots?sandboxID=nope", e.key, nil)
	if r.Status != 200 || strings.TrimSpace(string(r.Body)) != "[]" {
		t.Fatalf("sandbox filter %d %s", r.Status, r.Body)
	}
	var ids []string
	next := ""
	for i := 0; i < 3; i++ {
		q := "/snapshots?limit=1"
		if next != "" {
			q += "&nextToken=" + next
		}
		r = e.do("GET", q, e.key, nil)
		r.json(t, &list)
		for _, s := range list {
			ids = append(ids, s.SnapshotID)
		}
		if next = r.Header.Get("X-Next-Token"); next == "" {
			break
		}
	}
	if len(ids) != 2 || !strings.Contains(fmt.Sprint(ids), named.SnapshotID) || !strings.Contains(fmt.Sprint(ids), plain.SnapshotID) {
		t.Fatalf("pages %v", ids)
	}
	r = e.do("GET", "/snapshots", e.key2, nil)
	if r.Status != 200 || strings.TrimSpace(string(r.Body)) != "[]" {
		t.Fatalf("key2 list %s", r.Body)
	}

	// Create from the snapshot by id (v2) and by name (v1, which gets a
	// token anyway: the restored agent would keep its source's).
	from := e.create(e.key, map[string]any{"templateID": plain.SnapshotID, "timeout": 60})
	if from.TemplateID != "base" || from.Alias != plain.SnapshotID || from.EnvdAccessToken == "" || from.EnvdAccessToken == sb.EnvdAccessToken {
		t.Fatalf("from snapshot %+v", from)
	}
	r = e.do("POST", "/sandboxes", e.key, `{"templateID":"mysnap"}`)
	var v1 sandboxBody
	r.json(t, &v1)
	if r.Status != 201 || v1.EnvdAccessToken == "" {
		t.Fatalf("v1 from name: %d %s", r.Status, r.Body)
	}
	if got := creates(); fmt.Sprint(got) != fmt.Sprint([]string{"", plain.SnapshotID + "/" + sb.EnvdAccessToken, named.SnapshotID + "/" + sb.EnvdAccessToken}) {
		t.Fatalf("runtime creates got snapshot ids %q", got)
	}
	// Another key cannot use, list or delete them.
	wantErr(t, e.do("POST", "/v2/sandboxes", e.key2, map[string]any{"templateID": plain.SnapshotID}), 404)
	wantErr(t, e.do("DELETE", "/templates/"+plain.SnapshotID, e.key2, nil), 404)
	// Templates are not deleted through the API.
	wantErr(t, e.do("DELETE", "/templates/base", e.key, nil), 403)
	wantErr(t, e.do("DELETE", "/templates/nope", e.key, nil), 404)
	if r := e.do("POST", "/v2/sandboxes", e.key, `{"templateID":"base"}`); r.Status != 201 {
		t.Fatalf("template still usable: %d %s", r.Status, r.Body)
	}

	// Delete by id and by name; the sandboxes made from them live on.
	if r := e.do("DELETE", "/templates/"+plain.SnapshotID, e.key, nil); r.Status != 204 {
		t.Fatalf("delete %d %s", r.Status, r.Body)
	}
	wantErr(t, e.do("DELETE", "/templates/"+plain.SnapshotID, e.key, nil), 404)
	if r := e.do("DELETE", "/templates/mysnap", e.key, nil); r.Status != 204 {
		t.Fatalf("delete by name %d %s", r.Status, r.Body)
	}
	if got := e.rt.Snapshots(); len(got) != 0 {
		t.Fatalf("runtime snapshots left %v", got)
	}
	wantErr(t, e.do("POST", "/v2/sandboxes", e.key, map[string]any{"templateID": plain.SnapshotID}), 404)
	r = e.do("GET", "/sandboxes/"+from.SandboxID, e.key, nil)
	r.json(t, &d)
	if r.Status != 200 || d.State != "running" {
		t.Fatalf("sandbox from a deleted snapshot: %d %s", r.Status, r.Body)
	}
}

// Bad snapshot requests get a clean error and take no snapshot.
func TestSnapshotBadInput(t *testing.T) {
	e := newEnv(t)
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	paused := e.create(e.key, map[string]any{"templateID": "base"})
	if r := e.do("POST", "/sandboxes/"+paused.SandboxID+"/pause", e.key, nil); r.Status != 204 {
		t.Fatal(r.Status)
	}
	for _, c := range []struct {
		key, id, body string
		status        int
	}{
		{e.key, sb.SandboxID, `{"name":1}`, 400},
		{e.key, sb.SandboxID, `{"name":"bad name"}`, 400},
		{e.key, sb.SandboxID, `{"name":"-x"}`, 400},
		{e.key, sb.SandboxID, `{"name":"` + strings.Repeat("a", 129) + `"}`, 400},
		{e.key, sb.SandboxID, `{"name":"base"}`, 400}, // a template's alias
		{e.key, sb.SandboxID, `{"name":`, 400},
		{e.key, sb.SandboxID, `[]`, 400},
		{e.key, sb.SandboxID, `{} {}`, 400},
		{e.key, "nope", `{}`, 404},
		{e.key2, sb.SandboxID, `{}`, 404},
		{e.key2, paused.SandboxID, `{}`, 404},
		{e.key, paused.SandboxID, `{"name":"bad name"}`, 400},
		{"", sb.SandboxID, `{}`, 401},
	} {
		wantErr(t, e.do("POST", "/sandboxes/"+c.id+"/snapshots", c.key, c.body), c.status)
	}
	for _, q := range []string{"limit=0", "limit=101", "limit=x", "nextToken=!!"} {
		wantErr(t, e.do("GET", "/snapshots?"+q, e.key, nil), 400)
	}
	if got := e.rt.Snapshots(); len(got) != 0 {
		t.Fatalf("refused requests left snapshots %v", got)
	}
	r := e.do("GET", "/snapshots", e.key, nil)
	if strings.TrimSpace(string(r.Body)) != "[]" {
		t.Fatalf("refused requests were recorded: %s", r.Body)
	}
}

type forkEntry struct {
	Sandbox *sandboxBody `json:"sandbox"`
	Error   *struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	} `json:"error"`
}

func TestFork(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.MaxSandboxes = 3 })
	creates := recordSnapshotIDs(e)
	parent := e.create(e.key, map[string]any{"templateID": "base", "metadata": map[string]string{"who": "parent"}})
	r := e.do("POST", "/sandboxes/"+parent.SandboxID+"/fork", e.key, `{"count":2,"timeout":60}`)
	var out []forkEntry
	r.json(t, &out)
	if r.Status != 201 || len(out) != 2 {
		t.Fatalf("fork %d %s", r.Status, r.Body)
	}
	seen := map[string]bool{parent.SandboxID: true}
	for _, f := range out {
		if f.Error != nil || f.Sandbox == nil || !idRE.MatchString(f.Sandbox.SandboxID) || seen[f.Sandbox.SandboxID] ||
			f.Sandbox.TemplateID != "base" || f.Sandbox.EnvdAccessToken == "" || f.Sandbox.EnvdAccessToken == parent.EnvdAccessToken {
			t.Fatalf("fork entry %s", r.Body)
		}
		seen[f.Sandbox.SandboxID] = true
		var det struct {
			State    string            `json:"state"`
			Metadata map[string]string `json:"metadata"`
		}
		g := e.do("GET", "/sandboxes/"+f.Sandbox.SandboxID, e.key, nil)
		g.json(t, &det)
		if det.State != "running" || det.Metadata["who"] != "parent" {
			t.Fatalf("fork detail %s", g.Body)
		}
	}
	c := creates()
	if len(c) != 3 || !strings.HasSuffix(c[1], "/"+parent.EnvdAccessToken) || c[1] != c[2] {
		t.Fatalf("forks restored from %q, want one snapshot", c)
	}
	// The fork's snapshot is gone again, the parent runs on.
	if got := e.rt.Snapshots(); len(got) != 0 {
		t.Fatalf("fork left snapshots %v", got)
	}
	var det struct {
		State string `json:"state"`
	}
	e.do("GET", "/sandboxes/"+parent.SandboxID, e.key, nil).json(t, &det)
	if det.State != "running" {
		t.Fatal(det.State)
	}
	// The node is full now: a fork reports the error in its entry.
	for id := range seen {
		if id != parent.SandboxID {
			e.do("DELETE", "/sandboxes/"+id, e.key, nil)
			break
		}
	}
	r = e.do("POST", "/sandboxes/"+parent.SandboxID+"/fork", e.key, `{"count":2}`)
	out = nil
	r.json(t, &out)
	if r.Status != 201 || len(out) != 2 {
		t.Fatalf("fork over capacity %d %s", r.Status, r.Body)
	}
	ok, full := 0, 0
	for _, f := range out {
		switch {
		case f.Sandbox != nil && f.Error == nil:
			ok++
		case f.Error != nil && f.Sandbox == nil && f.Error.Code == 429 && f.Error.Message != "":
			full++
		}
	}
	if ok != 1 || full != 1 {
		t.Fatalf("want one fork and one 429 entry: %s", r.Body)
	}
	// Default body: one fork.
	e.do("DELETE", "/sandboxes/"+func() string {
		for _, f := range out {
			if f.Sandbox != nil {
				return f.Sandbox.SandboxID
			}
		}
		return ""
	}(), e.key, nil)
	r = e.do("POST", "/sandboxes/"+parent.SandboxID+"/fork", e.key, nil)
	out = nil
	r.json(t, &out)
	if r.Status != 201 || len(out) != 1 || out[0].Sandbox == nil {
		t.Fatalf("default fork %d %s", r.Status, r.Body)
	}
}

func TestForkBadInput(t *testing.T) {
	e := newEnv(t)
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	paused := e.create(e.key, map[string]any{"templateID": "base"})
	if r := e.do("POST", "/sandboxes/"+paused.SandboxID+"/pause", e.key, nil); r.Status != 204 {
		t.Fatal(r.Status)
	}
	before := e.rt.Calls("Create")
	for _, c := range []struct {
		key, id, body string
		status        int
	}{
		{e.key, sb.SandboxID, `{"count":0}`, 400},
		{e.key, sb.SandboxID, `{"count":11}`, 400},
		{e.key, sb.SandboxID, `{"count":-1}`, 400},
		{e.key, sb.SandboxID, `{"count":"2"}`, 400},
		{e.key, sb.SandboxID, `{"count":1.5}`, 400},
		{e.key, sb.SandboxID, `{"timeout":-1}`, 400},
		{e.key, sb.SandboxID, `{"timeout":86401}`, 400},
		{e.key, sb.SandboxID, `{"timeout":true}`, 400},
		{e.key, sb.SandboxID, `{`, 400},
		{e.key, sb.SandboxID, `"x"`, 400},
		{e.key, "nope", `{}`, 404},
		{e.key2, sb.SandboxID, `{"count":1}`, 404},
		{e.key, paused.SandboxID, `{}`, 409},
		{"", sb.SandboxID, `{}`, 401},
	} {
		wantErr(t, e.do("POST", "/sandboxes/"+c.id+"/fork", c.key, c.body), c.status)
	}
	if e.rt.Calls("Create") != before || e.rt.Calls("Snapshot") != 0 {
		t.Fatalf("refused forks reached the runtime: creates %d->%d, snapshots %d", before, e.rt.Calls("Create"), e.rt.Calls("Snapshot"))
	}
	if got := e.rt.Snapshots(); len(got) != 0 {
		t.Fatalf("snapshots left %v", got)
	}
}

// FuzzSnapshotAndForkBodies sends arbitrary bodies to the snapshot and
// fork endpoints: the answer is 201 or a clean E2B error, never a 5xx, and
// a refused request takes no snapshot and creates no sandbox.
func FuzzSnapshotAndForkBodies(f *testing.F) {
	for _, s := range []string{`{}`, `{"name":"a"}`, `{"name":""}`, `{"name":null}`, `{"name":"a b"}`, `{"count":2,"timeout":30}`,
		`{"count":0}`, `{"count":1e9}`, `{"timeout":-5}`, `[]`, `null`, "", "\x00\xff", `{"count":"1"}`} {
		f.Add(s, false)
		f.Add(s, true)
	}
	e := newEnv(f)
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	h := e.s.Handler()
	f.Fuzz(func(t *testing.T, body string, fork bool) {
		path := "/sandboxes/" + sb.SandboxID + "/snapshots"
		if fork {
			path = "/sandboxes/" + sb.SandboxID + "/fork"
		}
		snaps, creates := e.rt.Calls("Snapshot"), e.rt.Calls("Create")
		req := httptest.NewRequest("POST", path, strings.NewReader(body))
		req.Header.Set("X-API-KEY", e.key)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch {
		case w.Code == http.StatusCreated && fork:
			var out []forkEntry
			if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil || len(out) == 0 {
				t.Fatalf("fork 201 body %s", w.Body)
			}
			for _, f := range out {
				if f.Sandbox != nil {
					k := httptest.NewRequest("DELETE", "/sandboxes/"+f.Sandbox.SandboxID, nil)
					k.Header.Set("X-API-KEY", e.key)
					h.ServeHTTP(httptest.NewRecorder(), k)
				}
			}
		case w.Code == http.StatusCreated:
			var sn snapshotBody
			if err := json.Unmarshal(w.Body.Bytes(), &sn); err != nil || !idRE.MatchString(sn.SnapshotID) {
				t.Fatalf("snapshot 201 body %s", w.Body)
			}
			k := httptest.NewRequest("DELETE", "/templates/"+sn.SnapshotID, nil)
			k.Header.Set("X-API-KEY", e.key)
			kw := httptest.NewRecorder()
			h.ServeHTTP(kw, k)
			if kw.Code != 204 {
				t.Fatalf("delete snapshot: %d %s", kw.Code, kw.Body)
			}
		case w.Code == 400 || w.Code == 413:
			var b struct {
				Code    int
				Message string
			}
			if err := json.Unmarshal(w.Body.Bytes(), &b); err != nil || b.Code != w.Code || b.Message == "" {
				t.Fatalf("error body %q", w.Body)
			}
			if e.rt.Calls("Snapshot") != snaps || e.rt.Calls("Create") != creates {
				t.Fatalf("refused request (%d) reached the runtime", w.Code)
			}
		default:
			t.Fatalf("status %d for %q: %s", w.Code, body, w.Body)
		}
		if got := e.rt.Snapshots(); len(got) != 0 {
			t.Fatalf("snapshots left %v", got)
		}
	})
}

// FuzzListSnapshotsQuery sends arbitrary query strings to GET /snapshots:
// the answer is 200 with a JSON array or a clean 400, never a 5xx.
func FuzzListSnapshotsQuery(f *testing.F) {
	for _, s := range []string{"", "limit=1", "limit=0", "limit=101", "limit=-1", "limit=1e3", "nextToken=!!", "nextToken=MTIzfGFi",
		"sandboxID=x&name=y", "name=%zz", "limit=1&limit=2", "nextToken=" + strings.Repeat("A", 300)} {
		f.Add(s)
	}
	e := newEnv(f)
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	e.snapshot(e.key, sb.SandboxID, `{"name":"y"}`)
	e.snapshot(e.key, sb.SandboxID, `{}`)
	h := e.s.Handler()
	f.Fuzz(func(t *testing.T, q string) {
		req := httptest.NewRequest("GET", "/snapshots", nil)
		req.URL.RawQuery = q
		req.Header.Set("X-API-KEY", e.key)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch w.Code {
		case 200:
			var out []snapshotBody
			if err := json.Unmarshal(w.Body.Bytes(), &out); err != nil || out == nil || len(out) > 2 {
				t.Fatalf("200 body %s", w.Body)
			}
		case 400:
			var b struct {
				Code    int
				Message string
			}
			if err := json.Unmarshal(w.Body.Bytes(), &b); err != nil || b.Code != 400 || b.Message == "" {
				t.Fatalf("error body %q", w.Body)
			}
		default:
			t.Fatalf("status %d for %q: %s", w.Code, q, w.Body)
		}
	})
}

// TestSnapshotOfPaused: a paused sandbox can be snapshotted; it stays
// paused (the fake runtime snapshots only running sandboxes, so the node
// resumes, snapshots and pauses it again), a create from the snapshot
// works and the original resumes. A fork of a paused sandbox is still 409.
func TestSnapshotOfPaused(t *testing.T) {
	e := newEnv(t)
	creates := recordSnapshotIDs(e)
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	if r := e.do("POST", "/sandboxes/"+sb.SandboxID+"/pause", e.key, nil); r.Status != 204 {
		t.Fatal(r.Status)
	}
	pauses, resumes := e.rt.Calls("Pause"), e.rt.Calls("Resume")
	sn := e.snapshot(e.key, sb.SandboxID, `{"name":"frompaused"}`)
	var d struct{ State string }
	r := e.do("GET", "/sandboxes/"+sb.SandboxID, e.key, nil)
	r.json(t, &d)
	if d.State != "paused" {
		t.Fatalf("after snapshot: %s", r.Body)
	}
	if e.rt.Calls("Resume") != resumes+1 || e.rt.Calls("Pause") != pauses+1 {
		t.Fatalf("fallback: resumes %d->%d, pauses %d->%d", resumes, e.rt.Calls("Resume"), pauses, e.rt.Calls("Pause"))
	}
	if e.s.Node.Free() != e.s.Node.Capacity() {
		t.Fatalf("slot still held after the snapshot: free %d of %d", e.s.Node.Free(), e.s.Node.Capacity())
	}
	child := e.create(e.key, map[string]any{"templateID": "frompaused"})
	if got := creates(); len(got) != 2 || !strings.HasPrefix(got[1], sn.SnapshotID+"/") {
		t.Fatalf("creates %v", got)
	}
	if r := e.do("POST", "/sandboxes/"+sb.SandboxID+"/resume", e.key, `{}`); r.Status != 201 {
		t.Fatalf("resume original: %d %s", r.Status, r.Body)
	}
	for _, id := range []string{sb.SandboxID, child.SandboxID} {
		r := e.do("GET", "/sandboxes/"+id, e.key, nil)
		r.json(t, &d)
		if d.State != "running" {
			t.Fatalf("%s: %s", id, r.Body)
		}
	}
	if r := e.do("POST", "/sandboxes/"+sb.SandboxID+"/pause", e.key, nil); r.Status != 204 {
		t.Fatal(r.Status)
	}
	before := e.rt.Calls("Snapshot")
	wantErr(t, e.do("POST", "/sandboxes/"+sb.SandboxID+"/fork", e.key, `{}`), 409)
	if e.rt.Calls("Snapshot") != before {
		t.Fatal("a refused fork took a snapshot")
	}
}
