package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/logging"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/runtimetest"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
)

// env is a cube server on the fake runtime behind a real HTTP listener.
type env struct {
	t    testing.TB
	srv  *httptest.Server
	s    *server.Server
	rt   *runtimetest.Fake
	key  string // key 1
	key2 string // key 2
	kid  string
	kid2 string
}

func newEnv(t testing.TB, mod ...func(*config.Config)) *env {
	t.Helper()
	ctx := context.Background()
	cfg := config.Default()
	cfg.DataDir = t.TempDir()
	cfg.MaxSandboxes = 16
	for _, m := range mod {
		m(&cfg)
	}
	rt, err := runtimetest.New("")
	if err != nil {
		t.Fatal(err)
	}
	rt.Handler = runtimetest.EnvdLike
	for _, id := range []string{"base", "code-interpreter"} {
		rt.BakeTemplate(ctx, runtime.Template{ID: id})
	}
	s, err := server.New(ctx, cfg, rt, logging.Discard())
	if err != nil {
		t.Fatal(err)
	}
	s.Store.PutTemplate(ctx, &store.Template{ID: "base", Aliases: []string{"base"}, EnvdVersion: "0.6.13", CPUCount: 1, MemoryMB: 512, DiskMB: 1024, State: "ready", Public: true})
	s.Store.PutTemplate(ctx, &store.Template{ID: "code-interpreter", Aliases: []string{"code-interpreter-v1"}, EnvdVersion: "0.6.13", CPUCount: 2, MemoryMB: 1024, DiskMB: 2048, State: "ready", Public: true})
	e := &env{t: t, s: s, rt: rt}
	var k1, k2 store.APIKey
	e.key, k1, _ = s.Store.CreateAPIKey(ctx, "one")
	e.key2, k2, _ = s.Store.CreateAPIKey(ctx, "two")
	e.kid, e.kid2 = k1.ID, k2.ID
	e.srv = httptest.NewServer(s.Handler())
	t.Cleanup(func() {
		e.srv.CloseClientConnections()
		e.srv.Close()
		s.Close()
		rt.Close()
	})
	return e
}

type resp struct {
	Status int
	Header http.Header
	Body   []byte
}

func (r resp) json(t testing.TB, v any) {
	t.Helper()
	if err := json.Unmarshal(r.Body, v); err != nil {
		t.Fatalf("decode %s: %v", r.Body, err)
	}
}

// do sends a request with key (none if ""); body may be a string, []byte
// or a value to marshal.
func (e *env) do(method, path, key string, body any, hdr ...string) resp {
	e.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = bytes.NewBufferString(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		rd = bytes.NewReader(j)
	}
	req, _ := http.NewRequest(method, e.srv.URL+path, rd)
	if key != "" {
		req.Header.Set("X-API-KEY", key)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	c := &http.Client{Timeout: 10 * time.Second}
	res, err := c.Do(req)
	if err != nil {
		e.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return resp{Status: res.StatusCode, Header: res.Header, Body: b}
}

type sandboxBody struct {
	SandboxID          string  `json:"sandboxID"`
	TemplateID         string  `json:"templateID"`
	Alias              string  `json:"alias"`
	ClientID           string  `json:"clientID"`
	EnvdVersion        string  `json:"envdVersion"`
	EnvdAccessToken    string  `json:"envdAccessToken"`
	TrafficAccessToken *string `json:"trafficAccessToken"`
	Domain             *string `json:"domain"`
}

func (e *env) create(key string, body any) sandboxBody {
	e.t.Helper()
	r := e.do("POST", "/v2/sandboxes", key, body)
	if r.Status != http.StatusCreated {
		e.t.Fatalf("create: %d %s", r.Status, r.Body)
	}
	var sb sandboxBody
	r.json(e.t, &sb)
	return sb
}

// wantErr checks an E2B error answer.
func wantErr(t testing.TB, r resp, status int) {
	t.Helper()
	if r.Status != status {
		t.Fatalf("status %d, want %d: %s", r.Status, status, r.Body)
	}
	var b struct {
		Code    int    `json:"code"`
		Message string `json:"message"`
	}
	if err := json.Unmarshal(r.Body, &b); err != nil || b.Code != status || b.Message == "" {
		t.Fatalf("error body %q (want code %d and a message)", r.Body, status)
	}
	if ct := r.Header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("content type %q", ct)
	}
}
