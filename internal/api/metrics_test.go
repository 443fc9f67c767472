package api_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/api"
	"github.com/cubesandbox/cube/internal/config"
)

// TestMetricsHistory: GET /sandboxes/{id}/metrics returns the node's
// sampled history (bounded ring), filtered by start/end in Unix seconds,
// kept while paused, refused for bad parameters, unknown, killed and
// another key's sandboxes; GET /sandboxes/metrics gives the newest sample
// of each of the key's sandboxes.
func TestMetricsHistory(t *testing.T) {
	// Ticks never fire during the test (1 h); the test samples by hand.
	// Retention 4 h = a ring of 4 samples.
	e := newEnv(t, func(c *config.Config) { c.MetricsInterval, c.MetricsRetention = time.Hour, 4*time.Hour })
	ctx := context.Background()
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	other := e.create(e.key2, map[string]any{"templateID": "base"})
	p := "/sandboxes/" + sb.SandboxID + "/metrics"

	// A fresh sandbox has one sample (taken on demand).
	var ms []map[string]any
	r := e.do("GET", p, e.key, nil)
	r.json(t, &ms)
	if r.Status != 200 || len(ms) != 1 {
		t.Fatalf("fresh: %d %s", r.Status, r.Body)
	}
	for _, k := range []string{"timestamp", "timestampUnix", "cpuCount", "cpuUsedPct", "memUsed", "memTotal", "memCache", "diskUsed", "diskTotal"} {
		if _, ok := ms[0][k]; !ok {
			t.Fatalf("sample lacks %s: %s", k, r.Body)
		}
	}
	if ms[0]["memTotal"].(float64) != 512<<20 {
		t.Fatalf("memTotal: %s", r.Body)
	}
	// Six more samples: the ring keeps the last 4, oldest first.
	for range 6 {
		e.s.Node.SampleNow(ctx)
	}
	get := func(q string) []api.SandboxMetric {
		t.Helper()
		var out []api.SandboxMetric
		r := e.do("GET", p+q, e.key, nil)
		if r.Status != 200 {
			t.Fatalf("GET %s: %d %s", q, r.Status, r.Body)
		}
		r.json(t, &out)
		return out
	}
	all := get("")
	if len(all) != 4 {
		t.Fatalf("ring holds %d samples, want 4", len(all))
	}
	for i := 1; i < len(all); i++ {
		if all[i].Timestamp.Before(all[i-1].Timestamp) {
			t.Fatalf("not in time order: %+v", all)
		}
	}
	if all[0].TimestampUnix != all[0].Timestamp.Unix() {
		t.Fatalf("timestampUnix %d vs %v", all[0].TimestampUnix, all[0].Timestamp)
	}
	now := time.Now().Unix()
	if n := len(get(fmt.Sprintf("?start=%d&end=%d", now-60, now+60))); n != 4 {
		t.Fatalf("range around now: %d samples", n)
	}
	if n := len(get(fmt.Sprintf("?start=%d", now+60))); n != 0 {
		t.Fatalf("start in the future: %d samples", n)
	}
	if n := len(get(fmt.Sprintf("?end=%d", now-60))); n != 0 {
		t.Fatalf("end in the past: %d samples", n)
	}
	if n := len(get(fmt.Sprintf("?start=%d&end=%d", all[0].TimestampUnix, all[0].TimestampUnix))); n < 1 {
		t.Fatalf("one-second range: %d samples", n)
	}

	// Bad parameters: 400 with a message; unknown, other key's: 404.
	for _, q := range []string{"?start=abc", "?start=-1", "?end=1.5", "?start=10&end=5", "?start=99999999999999", "?end=1e3"} {
		wantErr(t, e.do("GET", p+q, e.key, nil), 400)
	}
	r = e.do("GET", p+"?start=10&end=5", e.key, nil)
	if !strings.Contains(string(r.Body), "must not be after end") {
		t.Fatalf("message: %s", r.Body)
	}
	wantErr(t, e.do("GET", "/sandboxes/"+other.SandboxID+"/metrics", e.key, nil), 404)
	wantErr(t, e.do("GET", "/sandboxes/nosuchsandbox0000000/metrics", e.key, nil), 404)
	wantErr(t, e.do("GET", p, "", nil), 401)

	// Paused: the history stays, no new samples.
	if r := e.do("POST", "/sandboxes/"+sb.SandboxID+"/pause", e.key, `{}`); r.Status != 204 {
		t.Fatalf("pause %d %s", r.Status, r.Body)
	}
	e.s.Node.SampleNow(ctx)
	if paused := get(""); len(paused) != 4 || !paused[3].Timestamp.Equal(all[3].Timestamp) {
		t.Fatalf("paused history %+v, was %+v", paused, all)
	}

	// Batch: newest sample of the key's sandboxes only.
	mine := e.create(e.key, map[string]any{"templateID": "base"})
	e.s.Node.SampleNow(ctx)
	var many struct{ Sandboxes map[string]api.SandboxMetric }
	r = e.do("GET", "/sandboxes/metrics?sandbox_ids="+url.QueryEscape(strings.Join([]string{sb.SandboxID, mine.SandboxID, other.SandboxID, "nope"}, ",")), e.key, nil)
	r.json(t, &many)
	if r.Status != 200 || len(many.Sandboxes) != 2 || many.Sandboxes[sb.SandboxID].Timestamp.IsZero() || many.Sandboxes[mine.SandboxID].Timestamp.IsZero() {
		t.Fatalf("batch: %d %s", r.Status, r.Body)
	}
	if !many.Sandboxes[sb.SandboxID].Timestamp.Equal(all[3].Timestamp) {
		t.Fatalf("batch gives %v for the paused sandbox, want its newest %v", many.Sandboxes[sb.SandboxID].Timestamp, all[3].Timestamp)
	}
	r = e.do("GET", "/sandboxes/metrics?sandbox_ids="+sb.SandboxID+"&sandbox_ids="+mine.SandboxID, e.key, nil)
	r.json(t, &many)
	if len(many.Sandboxes) != 2 {
		t.Fatalf("repeated sandbox_ids: %s", r.Body)
	}
	wantErr(t, e.do("GET", "/sandboxes/metrics", e.key, nil), 400)
	wantErr(t, e.do("GET", "/sandboxes/metrics?sandbox_ids=,,", e.key, nil), 400)
	wantErr(t, e.do("GET", "/sandboxes/metrics?sandbox_ids="+strings.Repeat("a,", api.MaxMetricsIDs+1), e.key, nil), 400)

	// Killed: 404 and its history is forgotten.
	if r := e.do("DELETE", "/sandboxes/"+sb.SandboxID, e.key, nil); r.Status != 204 {
		t.Fatalf("kill %d", r.Status)
	}
	wantErr(t, e.do("GET", p, e.key, nil), 404)
}

// TestMetricsSampledPeriodically: with a short interval the node samples
// running sandboxes by itself.
func TestMetricsSampledPeriodically(t *testing.T) {
	e := newEnv(t, func(c *config.Config) { c.MetricsInterval = 20 * time.Millisecond })
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	deadline := time.Now().Add(5 * time.Second)
	for {
		var ms []api.SandboxMetric
		e.do("GET", "/sandboxes/"+sb.SandboxID+"/metrics", e.key, nil).json(t, &ms)
		if len(ms) >= 3 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("only %d samples after 5 s at a 20 ms interval", len(ms))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// FuzzMetricsQuery sends arbitrary query strings to the metrics routes:
// 200 or a clean 400/404, never a 5xx.
func FuzzMetricsQuery(f *testing.F) {
	for _, s := range []string{"start=1&end=2", "start=-1", "end=abc", "start=99999999999999999999", "sandbox_ids=a,b", "start=5&end=1", "%zz", "start=1&start=2"} {
		f.Add(s, true)
		f.Add(s, false)
	}
	e := newEnv(f, func(c *config.Config) { c.MetricsInterval = time.Hour })
	sb := e.create(e.key, map[string]any{"templateID": "base"})
	h := e.s.Handler()
	f.Fuzz(func(t *testing.T, q string, one bool) {
		path := "/sandboxes/metrics?" + q
		if one {
			path = "/sandboxes/" + sb.SandboxID + "/metrics?" + q
		}
		req, err := http.NewRequest("GET", path, nil)
		if err != nil {
			return
		}
		req.Header.Set("X-API-KEY", e.key)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch w.Code {
		case 200:
			if !json.Valid(w.Body.Bytes()) {
				t.Fatalf("200 body %q", w.Body)
			}
		case 400, 404:
			var b struct {
				Code    int
				Message string
			}
			if err := json.Unmarshal(w.Body.Bytes(), &b); err != nil || b.Code != w.Code || b.Message == "" {
				t.Fatalf("error body %q", w.Body)
			}
		default:
			t.Fatalf("status %d for %q: %s", w.Code, q, w.Body)
		}
	})
}
