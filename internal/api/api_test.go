package api_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/logging"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
)

var (
	idRE     = regexp.MustCompile(`^[a-z0-9]{20}$`)
	semverRE = regexp.MustCompile(`^\d+\.\d+\.\d+$`)
)

func TestCreateV2AndV1(t *testing.T) {
	e := newEnv(t)
	sb := e.create(e.key, map[string]any{"templateID": "base", "metadata": map[string]string{"a": "b"}, "envVars": map[string]string{"X": "1"}, "timeout": 60})
	if !idRE.MatchString(sb.SandboxID) || sb.TemplateID != "base" || sb.ClientID == "" || !semverRE.MatchString(sb.EnvdVersion) ||
		sb.EnvdAccessToken == "" || sb.TrafficAccessToken != nil || sb.Domain != nil || sb.Alias != "base" {
		t.Fatalf("v2 body %+v", sb)
	}
	// The raw body has the nullable fields present as null.
	r := e.do("POST", "/v2/sandboxes", e.key, `{"templateID":"code-interpreter-v1"}`)
	if r.Status != 201 || !strings.Contains(string(r.Body), `"domain":null`) || !strings.Contains(string(r.Body), `"templateID":"code-interpreter"`) {
		t.Fatalf("%d %s", r.Status, r.Body)
	}
	// v1: not secure unless asked.
	r = e.do("POST", "/sandboxes", e.key, `{"templateID":"base","timeout":30}`)
	var v1 sandboxBody
	r.json(t, &v1)
	if r.Status != 201 || v1.EnvdAccessToken != "" {
		t.Fatalf("v1: %d %s", r.Status, r.Body)
	}
	r = e.do("POST", "/sandboxes", e.key, `{"templateID":"base","secure":true}`)
	r.json(t, &v1)
	if r.Status != 201 || v1.EnvdAccessToken == "" {
		t.Fatalf("v1 secure: %d %s", r.Status, r.Body)
	}
	// get
	var d struct {
		SandboxID, TemplateID, ClientID, State, EnvdVersion, EnvdAccessToken string
		StartedAt, EndAt                                                     time.Time
		CPUCount, MemoryMB, DiskSizeMB                                       int
		Metadata                                                             map[string]string
		Lifecycle                                                            struct {
			OnTimeout  string
			AutoResume bool
		}
	}
	r = e.do("GET", "/sandboxes/"+sb.SandboxID, e.key, nil)
	r.json(t, &d)
	if r.Status != 200 || d.State != "running" || d.Metadata["a"] != "b" || d.CPUCount != 1 || d.MemoryMB != 512 || d.DiskSizeMB != 1024 ||
		d.EnvdAccessToken != sb.EnvdAccessToken || d.Lifecycle.OnTimeout != "kill" || d.EndAt.Sub(d.StartedAt) != 60*time.Second {
		t.Fatalf("get: %s", r.Body)
	}
	// templates
	r = e.do("GET", "/templates", e.key, nil)
	if r.Status != 200 || !strings.Contains(string(r.Body), `"aliases":["code-interpreter-v1"]`) || !strings.Contains(string(r.Body), `"spawnCount":3`) {
		t.Fatalf("templates %s", r.Body)
	}
	// kill
	if r := e.do("DELETE", "/sandboxes/"+sb.SandboxID, e.key, nil); r.Status != 204 {
		t.Fatalf("kill %d %s", r.Status, r.Body)
	}
	wantErr(t, e.do("DELETE", "/sandboxes/"+sb.SandboxID, e.key, nil), 404)
	wantErr(t, e.do("GET", "/sandboxes/"+sb.SandboxID, e.key, nil), 404)
	if id := e.do("GET", "/health", "", nil).Header.Get("X-Request-Id"); id == "" {
		t.Fatal("no request id")
	}
	if id := e.do("GET", "/health", "", nil, "X-Request-Id", "abc-123").Header.Get("X-Request-Id"); id != "abc-123" {
		t.Fatalf("request id %q not kept", id)
	}
}

func TestBadInput(t *testing.T) {
	e := newEnv(t)
	keep := e.create(e.key, map[string]any{"templateID": "base"})
	other := e.create(e.key2, map[string]any{"templateID": "base"})
	revoked, rec, _ := e.s.Store.CreateAPIKey(context.Background(), "gone")
	e.s.Store.RevokeAPIKey(context.Background(), rec.ID)
	creates := e.rt.Calls("Create")
	huge := map[string]string{}
	for i := 0; i < 200; i++ {
		huge[fmt.Sprint("k", i)] = "v"
	}
	bigValue := map[string]string{"k": strings.Repeat("x", 5000)}
	cases := []struct {
		name, method, path, key string
		body                    any
		status                  int
	}{
		{"no key", "POST", "/v2/sandboxes", "", `{"templateID":"base"}`, 401},
		{"bad key", "POST", "/v2/sandboxes", "e2b_nothex", `{"templateID":"base"}`, 401},
		{"unknown key", "POST", "/v2/sandboxes", "e2b_0123456789abcdef", `{"templateID":"base"}`, 401},
		{"revoked key", "POST", "/v2/sandboxes", revoked, `{"templateID":"base"}`, 401},
		{"revoked key list", "GET", "/v2/sandboxes", revoked, nil, 401},
		{"malformed", "POST", "/v2/sandboxes", e.key, `{"templateID":`, 400},
		{"not an object", "POST", "/v2/sandboxes", e.key, `[1,2]`, 400},
		{"trailing data", "POST", "/v2/sandboxes", e.key, `{"templateID":"base"} {}`, 400},
		{"empty", "POST", "/v2/sandboxes", e.key, ``, 400},
		{"no template", "POST", "/v2/sandboxes", e.key, `{}`, 400},
		{"template type", "POST", "/v2/sandboxes", e.key, `{"templateID":5}`, 400},
		{"timeout type", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","timeout":"60"}`, 400},
		{"timeout float", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","timeout":1.5}`, 400},
		{"metadata type", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","metadata":{"a":1}}`, 400},
		{"autoPause type", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","autoPause":"yes"}`, 400},
		{"negative timeout", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","timeout":-1}`, 400},
		{"enormous timeout", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","timeout":99999999999}`, 400},
		{"overflow timeout", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","timeout":1e40}`, 400},
		{"huge metadata", "POST", "/v2/sandboxes", e.key, map[string]any{"templateID": "base", "metadata": huge}, 400},
		{"big metadata value", "POST", "/v2/sandboxes", e.key, map[string]any{"templateID": "base", "metadata": bigValue}, 400},
		{"bad env name", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","envVars":{"A B":"1"}}`, 400},
		{"body too large", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","x":"` + strings.Repeat("a", 2<<20) + `"}`, 413},
		{"bad network", "POST", "/v2/sandboxes", e.key, `{"templateID":"base","network":{"allowOut":["not a host!"]}}`, 400},
		{"unknown template", "POST", "/v2/sandboxes", e.key, `{"templateID":"nope"}`, 404},
		{"weird template", "POST", "/v2/sandboxes", e.key, `{"templateID":"../../etc"}`, 400},
		{"v1 unknown template", "POST", "/sandboxes", e.key, `{"templateID":"nope","timeout":10}`, 404},
		{"other key get", "GET", "/sandboxes/" + other.SandboxID, e.key, nil, 404},
		{"other key kill", "DELETE", "/sandboxes/" + other.SandboxID, e.key, nil, 404},
		{"other key pause", "POST", "/sandboxes/" + other.SandboxID + "/pause", e.key, `{}`, 404},
		{"other key connect", "POST", "/v2/sandboxes/" + other.SandboxID + "/connect", e.key, `{}`, 404},
		{"other key timeout", "POST", "/sandboxes/" + other.SandboxID + "/timeout", e.key, `{"timeout":1}`, 404},
		{"other key logs", "GET", "/sandboxes/" + other.SandboxID + "/logs", e.key, nil, 404},
		{"other key metrics", "GET", "/sandboxes/" + other.SandboxID + "/metrics", e.key, nil, 404},
		{"other key network", "PUT", "/sandboxes/" + other.SandboxID + "/network", e.key, `{"denyOut":["0.0.0.0/0"]}`, 404},
		{"unknown sandbox", "GET", "/sandboxes/doesnotexist", e.key, nil, 404},
		{"timeout missing", "POST", "/sandboxes/" + keep.SandboxID + "/timeout", e.key, `{}`, 400},
		{"timeout negative", "POST", "/sandboxes/" + keep.SandboxID + "/timeout", e.key, `{"timeout":-5}`, 400},
		{"timeout huge", "POST", "/sandboxes/" + keep.SandboxID + "/timeout", e.key, `{"timeout":86401}`, 400},
		{"connect bad timeout", "POST", "/v2/sandboxes/" + keep.SandboxID + "/connect", e.key, `{"timeout":-1}`, 400},
		{"refresh bad", "POST", "/sandboxes/" + keep.SandboxID + "/refreshes", e.key, `{"duration":999999}`, 400},
		{"list bad state", "GET", "/v2/sandboxes?state=dead", e.key, nil, 400},
		{"list bad limit", "GET", "/v2/sandboxes?limit=0", e.key, nil, 400},
		{"list big limit", "GET", "/v2/sandboxes?limit=1000", e.key, nil, 400},
		{"list bad token", "GET", "/v2/sandboxes?nextToken=%25%25", e.key, nil, 400},
		{"list bad token 2", "GET", "/v2/sandboxes?nextToken=abc", e.key, nil, 400},
		{"list bad order", "GET", "/v2/sandboxes?order=up", e.key, nil, 400},
		{"logs bad limit", "GET", "/v2/sandboxes/" + keep.SandboxID + "/logs?limit=x", e.key, nil, 400},
		{"network bad", "PUT", "/sandboxes/" + keep.SandboxID + "/network", e.key, `{"allowOut":[""]}`, 400},
		{"no route", "GET", "/nope", e.key, nil, 404},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			wantErr(t, e.do(c.method, c.path, c.key, c.body), c.status)
		})
	}
	// Bad input changed nothing.
	if got := e.rt.Calls("Create"); got != creates {
		t.Fatalf("runtime creates %d -> %d", creates, got)
	}
	var l []map[string]any
	e.do("GET", "/v2/sandboxes", e.key, nil).json(t, &l)
	if len(l) != 1 || l[0]["sandboxID"] != keep.SandboxID {
		t.Fatalf("list after bad input: %v", l)
	}
	e.do("GET", "/v2/sandboxes", e.key2, nil).json(t, &l)
	if len(l) != 1 || l[0]["sandboxID"] != other.SandboxID {
		t.Fatalf("key 2 list: %v", l)
	}
	if r := e.do("GET", "/sandboxes/"+other.SandboxID, e.key2, nil); r.Status != 200 {
		t.Fatal("other key's sandbox was harmed")
	}
}

func TestPauseResumeConnect(t *testing.T) {
	e := newEnv(t)
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	p := "/sandboxes/" + sb.SandboxID
	if r := e.do("POST", p+"/pause", e.key, `{}`); r.Status != 204 {
		t.Fatalf("pause %d %s", r.Status, r.Body)
	}
	wantErr(t, e.do("POST", p+"/pause", e.key, `{}`), 409)
	var l []map[string]any
	e.do("GET", "/v2/sandboxes?state=paused", e.key, nil).json(t, &l)
	if len(l) != 1 || l[0]["state"] != "paused" {
		t.Fatalf("paused list %v", l)
	}
	e.do("GET", "/v2/sandboxes?state=running", e.key, nil).json(t, &l)
	if len(l) != 0 {
		t.Fatalf("running list %v", l)
	}
	// v1 list shows running only.
	e.do("GET", "/sandboxes", e.key, nil).json(t, &l)
	if len(l) != 0 {
		t.Fatalf("v1 list %v", l)
	}
	r := e.do("POST", "/v2/sandboxes/"+sb.SandboxID+"/connect", e.key, `{"timeout":100}`)
	var c sandboxBody
	r.json(t, &c)
	if r.Status != 201 || c.SandboxID != sb.SandboxID || c.EnvdAccessToken != sb.EnvdAccessToken {
		t.Fatalf("connect paused: %d %s", r.Status, r.Body)
	}
	if r := e.do("POST", "/v2/sandboxes/"+sb.SandboxID+"/connect", e.key, ``); r.Status != 200 {
		t.Fatalf("connect running: %d %s", r.Status, r.Body)
	}
	if r := e.do("POST", "/sandboxes/"+sb.SandboxID+"/connect", e.key, `{"timeout":10}`); r.Status != 200 {
		t.Fatalf("connect v1: %d %s", r.Status, r.Body)
	}
	wantErr(t, e.do("POST", p+"/resume", e.key, `{}`), 409)
	e.do("POST", p+"/pause", e.key, `{}`)
	if r := e.do("POST", p+"/resume", e.key, `{"timeout":30}`); r.Status != 201 {
		t.Fatalf("resume %d %s", r.Status, r.Body)
	}
	// timeout replaces endAt; refresh only extends.
	if r := e.do("POST", p+"/timeout", e.key, `{"timeout":1000}`); r.Status != 204 {
		t.Fatalf("timeout %d", r.Status)
	}
	var d struct{ EndAt time.Time }
	e.do("GET", p, e.key, nil).json(t, &d)
	if left := time.Until(d.EndAt); left < 990*time.Second || left > 1001*time.Second {
		t.Fatalf("endAt in %v", left)
	}
	e.do("POST", p+"/timeout", e.key, `{"timeout":10}`)
	e.do("POST", p+"/refreshes", e.key, `{"duration":5}`)
	e.do("GET", p, e.key, nil).json(t, &d)
	if left := time.Until(d.EndAt); left < 8*time.Second || left > 11*time.Second {
		t.Fatalf("endAt after shorten+refresh in %v", left)
	}
	// logs show the transitions.
	var logs struct {
		Logs       []struct{ Line string }
		LogEntries []struct{ Level, Message string }
	}
	e.do("GET", p+"/logs", e.key, nil).json(t, &logs)
	if len(logs.Logs) < 8 || !strings.Contains(logs.Logs[0].Line, "creating") || len(logs.LogEntries) != len(logs.Logs) {
		t.Fatalf("logs %+v", logs)
	}
	var logs2 struct{ Logs []struct{ Message string } }
	e.do("GET", "/v2/sandboxes/"+sb.SandboxID+"/logs?direction=backward&limit=1", e.key, nil).json(t, &logs2)
	if len(logs2.Logs) != 1 || !strings.Contains(logs2.Logs[0].Message, "running") {
		t.Fatalf("logs v2 %+v", logs2)
	}
	// metrics
	var ms []map[string]any
	e.do("GET", p+"/metrics", e.key, nil).json(t, &ms)
	if len(ms) != 1 || ms[0]["memTotal"].(float64) != 512<<20 || ms[0]["timestampUnix"] == nil {
		t.Fatalf("metrics %v", ms)
	}
	var many struct{ Sandboxes map[string]any }
	e.do("GET", "/sandboxes/metrics?sandbox_ids="+sb.SandboxID+",nope", e.key, nil).json(t, &many)
	if len(many.Sandboxes) != 1 {
		t.Fatalf("metrics many %+v", many)
	}
	// network update
	if r := e.do("PUT", p+"/network", e.key, `{"denyOut":["0.0.0.0/0"],"allowOut":["1.1.1.1","example.com"]}`); r.Status != 204 {
		t.Fatalf("network %d %s", r.Status, r.Body)
	}
	rec, _ := e.s.Store.GetSandbox(context.Background(), sb.SandboxID)
	if fmt.Sprint(rec.Network.DenyOut) != "[0.0.0.0/0]" || len(rec.Network.AllowOut) != 2 {
		t.Fatalf("network stored %+v", rec.Network)
	}
}

func TestListPagination(t *testing.T) {
	e := newEnv(t)
	for i := 0; i < 7; i++ {
		e.create(e.key, map[string]any{"templateID": "base", "metadata": map[string]string{"user": fmt.Sprint("u", i%2), "app": "prod & co"}})
		time.Sleep(2 * time.Millisecond)
	}
	e.create(e.key2, map[string]any{"templateID": "base", "metadata": map[string]string{"user": "u0"}})
	seen := map[string]bool{}
	next := ""
	pages := 0
	for {
		q := "/v2/sandboxes?limit=3"
		if next != "" {
			q += "&nextToken=" + url.QueryEscape(next)
		}
		r := e.do("GET", q, e.key, nil)
		var l []map[string]any
		r.json(t, &l)
		for _, s := range l {
			seen[s["sandboxID"].(string)] = true
			for _, f := range []string{"templateID", "sandboxID", "clientID", "startedAt", "endAt", "cpuCount", "memoryMB", "diskSizeMB", "state", "envdVersion"} {
				if _, ok := s[f]; !ok {
					t.Fatalf("listed sandbox lacks %s: %v", f, s)
				}
			}
		}
		pages++
		next = r.Header.Get("X-Next-Token")
		if next == "" {
			break
		}
	}
	if len(seen) != 7 || pages != 3 {
		t.Fatalf("%d sandboxes in %d pages", len(seen), pages)
	}
	// metadata filter, double-encoded as the SDK sends it.
	md := url.Values{"user": {"u0"}, "app": {"prod & co"}}.Encode()
	var l []map[string]any
	e.do("GET", "/v2/sandboxes?metadata="+url.QueryEscape(md), e.key, nil).json(t, &l)
	if len(l) != 4 {
		t.Fatalf("metadata filter: %d", len(l))
	}
	e.do("GET", "/v2/sandboxes?state=running,paused&metadata="+url.QueryEscape("user=u1"), e.key, nil).json(t, &l)
	if len(l) != 3 {
		t.Fatalf("metadata+state filter: %d", len(l))
	}
	e.do("GET", "/v2/sandboxes?state=running&state=paused", e.key, nil).json(t, &l)
	if len(l) != 7 {
		t.Fatalf("repeated state: %d", len(l))
	}
	e.do("GET", "/sandboxes?metadata="+url.QueryEscape("user=u1"), e.key, nil).json(t, &l)
	if len(l) != 3 {
		t.Fatalf("v1 metadata filter: %d", len(l))
	}
}

func TestCapacity(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.MaxSandboxes = 3 })
	e.rt.CreateDelay = 30 * time.Millisecond
	var mu sync.Mutex
	codes := map[int]int{}
	var wg sync.WaitGroup
	for i := 0; i < 12; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := e.do("POST", "/v2/sandboxes", e.key, `{"templateID":"base"}`)
			if r.Status == 429 {
				if r.Header.Get("Retry-After") == "" {
					t.Error("429 without Retry-After")
				}
				wantErr(t, r, 429)
			}
			mu.Lock()
			codes[r.Status]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if codes[201] != 3 || codes[429] != 9 {
		t.Fatalf("codes %v", codes)
	}
	// A paused sandbox frees its slot.
	var l []map[string]any
	e.do("GET", "/v2/sandboxes", e.key, nil).json(t, &l)
	e.do("POST", "/sandboxes/"+l[0]["sandboxID"].(string)+"/pause", e.key, `{}`)
	e.create(e.key, `{"templateID":"base"}`)
	// ... and resuming it now finds the node full.
	wantErr(t, e.do("POST", "/v2/sandboxes/"+l[0]["sandboxID"].(string)+"/connect", e.key, `{}`), 429)
}

func TestExpiryThroughAPI(t *testing.T) {
	e := newEnv(t)
	k := e.create(e.key, map[string]any{"templateID": "base", "timeout": 1})
	p := e.create(e.key, map[string]any{"templateID": "base", "timeout": 1, "autoPause": true})
	time.Sleep(1100 * time.Millisecond)
	e.s.Node.ExpireNow(context.Background())
	wantErr(t, e.do("GET", "/sandboxes/"+k.SandboxID, e.key, nil), 404)
	var d struct{ State string }
	e.do("GET", "/sandboxes/"+p.SandboxID, e.key, nil).json(t, &d)
	if d.State != "paused" {
		t.Fatalf("autoPause sandbox is %s", d.State)
	}
	rec, _ := e.s.Store.GetSandbox(context.Background(), k.SandboxID)
	if rec.State != store.StateKilled {
		t.Fatal(rec.State)
	}
}

// Kill, pause, resume and connect racing on one sandbox over HTTP: every
// answer is a success or a clean 404/409, and the end state is coherent.
func TestRacingOverHTTP(t *testing.T) {
	e := newEnv(t)
	for round := 0; round < 5; round++ {
		sb := e.create(e.key, `{"templateID":"base"}`)
		p := "/sandboxes/" + sb.SandboxID
		reqs := [][3]string{{"POST", p + "/pause", `{}`}, {"POST", p + "/resume", `{}`}, {"POST", "/v2" + p + "/connect", `{}`},
			{"DELETE", p, ""}, {"POST", p + "/pause", `{}`}, {"POST", p + "/timeout", `{"timeout":50}`}, {"GET", p, ""}}
		var wg sync.WaitGroup
		for _, rq := range reqs {
			wg.Add(1)
			go func(rq [3]string) {
				defer wg.Done()
				var body any
				if rq[2] != "" {
					body = rq[2]
				}
				r := e.do(rq[0], rq[1], e.key, body)
				switch r.Status {
				case 200, 201, 204:
				case 404, 409:
					wantErr(t, r, r.Status)
				default:
					t.Errorf("%s %s: %d %s", rq[0], rq[1], r.Status, r.Body)
				}
			}(rq)
		}
		wg.Wait()
		rec, _ := e.s.Store.GetSandbox(context.Background(), sb.SandboxID)
		infos, _ := e.rt.List(context.Background())
		inRT := false
		for _, i := range infos {
			inRT = inRT || i.ID == sb.SandboxID
		}
		if (rec.State == store.StateKilled) == inRT {
			t.Fatalf("store says %s, runtime has it: %v", rec.State, inRT)
		}
	}
}

func TestMetricsEndpoint(t *testing.T) {
	e := newEnv(t)
	sb := e.create(e.key, `{"templateID":"base"}`)
	e.do("GET", "/who", "", nil, "E2b-Sandbox-Id", sb.SandboxID, "E2b-Sandbox-Port", "49983")
	r := e.do("GET", "/metrics", "", nil)
	for _, want := range []string{"cube_sandbox_create_seconds_bucket", `cube_sandboxes{state="running"} 1`, `cube_proxy_bytes_total{direction="in"}`, `cube_proxy_bytes_total{direction="out"}`} {
		if !strings.Contains(string(r.Body), want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	_ = http.StatusOK
}

// TestUIMount: the web UI mount point serves the dashboard, and the
// calls the dashboard makes (internal/ui/static/app.js) are ones the API
// answers for a key.
func TestUIMount(t *testing.T) {
	e := newEnv(t)
	for _, p := range []string{"/ui", "/ui/"} {
		r := e.do("GET", p, "", nil)
		if r.Status != 200 || !strings.Contains(string(r.Body), "<title>Cube</title>") {
			t.Fatalf("GET %s: %d %q", p, r.Status, r.Body)
		}
	}
	e.create(e.key, `{"templateID":"base"}`)
	if r := e.do("GET", "/v2/sandboxes?state=running,paused", e.key, nil); r.Status != 200 || !strings.Contains(string(r.Body), `"state":"running"`) {
		t.Fatalf("dashboard list: %d %s", r.Status, r.Body)
	}
	if r := e.do("GET", "/v2/sandboxes?state=running,paused", "", nil); r.Status != 401 {
		t.Fatalf("dashboard list without a key: %d", r.Status)
	}
	if r := e.do("GET", "/templates", e.key, nil); r.Status != 200 || !strings.Contains(string(r.Body), `"buildStatus"`) {
		t.Fatalf("dashboard templates: %d %s", r.Status, r.Body)
	}
}

func TestUIDirMissingRefused(t *testing.T) {
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.UIDir = filepath.Join(t.TempDir(), "missing")
	rt, err := runtimetest.New("")
	if err != nil {
		t.Fatal(err)
	}
	defer rt.Close()
	if _, err := server.New(context.Background(), cfg, rt, logging.Discard()); err == nil || !strings.Contains(err.Error(), "uiDir") {
		t.Fatalf("server.New with a missing uiDir: %v", err)
	}
}
