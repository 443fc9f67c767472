package api_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// FuzzNewSandbox sends arbitrary bodies to POST /v2/sandboxes and
// POST /sandboxes: the answer is 201 or a clean E2B error (never a 5xx),
// and a refused request changes nothing.
func FuzzNewSandbox(f *testing.F) {
	for _, s := range []string{
		`{"templateID":"base"}`,
		`{"templateID":"base","timeout":60,"metadata":{"a":"b"},"envVars":{"X":"1"},"autoPause":true,"autoResume":{"enabled":true}}`,
		`{"templateID":"code-interpreter-v1","secure":true,"allow_internet_access":false}`,
		`{"templateID":"base","network":{"allowOut":["1.1.1.1/32","example.com"],"denyOut":["0.0.0.0/0"],"allowPublicTraffic":false}}`,
		`{"templateID":"nope"}`, `{"templateID":1}`, `{"timeout":-1}`, `[]`, `null`, `{"templateID":"base","metadata":null}`,
		`{"templateID":"base","timeout":1e309}`, `{"templateID":"base","volumeMounts":[{"name":"v","path":"/x"}]}`, "\x00\xff",
	} {
		f.Add(s, true)
	}
	e := newEnv(f)
	h := e.s.Handler()
	f.Fuzz(func(t *testing.T, body string, v2 bool) {
		path := "/sandboxes"
		if v2 {
			path = "/v2/sandboxes"
		}
		before := e.rt.Calls("Create")
		req := httptest.NewRequest("POST", path, strings.NewReader(body))
		req.Header.Set("X-API-KEY", e.key)
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		switch w.Code {
		case http.StatusCreated:
			var sb struct{ SandboxID, EnvdVersion string }
			if err := json.Unmarshal(w.Body.Bytes(), &sb); err != nil || !idRE.MatchString(sb.SandboxID) || !semverRE.MatchString(sb.EnvdVersion) {
				t.Fatalf("201 body %s", w.Body)
			}
			k := httptest.NewRequest("DELETE", "/sandboxes/"+sb.SandboxID, nil)
			k.Header.Set("X-API-KEY", e.key)
			kw := httptest.NewRecorder()
			h.ServeHTTP(kw, k)
			if kw.Code != 204 {
				t.Fatalf("kill: %d", kw.Code)
			}
		case 400, 404, 413:
			var b struct {
				Code    int
				Message string
			}
			if err := json.Unmarshal(w.Body.Bytes(), &b); err != nil || b.Code != w.Code || b.Message == "" {
				t.Fatalf("error body %q", w.Body)
			}
			if e.rt.Calls("Create") != before {
				t.Fatalf("refused request (%d) reached the runtime", w.Code)
			}
		default:
			t.Fatalf("status %d for %q: %s", w.Code, body, w.Body)
		}
	})
}
