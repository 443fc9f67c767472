package ui

import (
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func get(t *testing.T, h http.Handler, path string) (int, string, http.Header) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest("GET", path, nil))
	b, _ := io.ReadAll(rec.Result().Body)
	return rec.Code, string(b), rec.Result().Header
}

func TestEmbeddedDashboard(t *testing.T) {
	h, err := Handler("")
	if err != nil {
		t.Fatal(err)
	}
	code, body, hdr := get(t, h, "/ui/")
	if code != 200 || !strings.Contains(body, "<title>Cube</title>") || !strings.Contains(body, `src="app.js"`) {
		t.Fatalf("GET /ui/: %d %q", code, body)
	}
	if csp := hdr.Get("Content-Security-Policy"); !strings.Contains(csp, "default-src 'self'") {
		t.Errorf("CSP %q", csp)
	}
	for _, p := range []string{"/ui/app.js", "/ui/style.css"} {
		if code, body, _ := get(t, h, p); code != 200 || body == "" {
			t.Errorf("GET %s: %d", p, code)
		}
	}
	// The dashboard sends the key only as X-API-Key to this origin, and
	// builds the page with textContent (no HTML from the API).
	_, js, _ := get(t, h, "/ui/app.js")
	if !strings.Contains(js, `"X-API-Key"`) || strings.Contains(js, "innerHTML") {
		t.Error("app.js: key header missing or innerHTML used")
	}
	if code, _, _ := get(t, h, "/ui/missing.js"); code != 404 {
		t.Errorf("missing file: %d", code)
	}
}

func TestUIDirConfined(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "ui")
	os.Mkdir(dir, 0o755)
	os.WriteFile(filepath.Join(dir, "index.html"), []byte("mine"), 0o644)
	os.WriteFile(filepath.Join(base, "secret"), []byte("secret"), 0o644)
	os.Symlink(filepath.Join(base, "secret"), filepath.Join(dir, "leak"))
	h, err := Handler(dir)
	if err != nil {
		t.Fatal(err)
	}
	if code, body, _ := get(t, h, "/ui/"); code != 200 || body != "mine" {
		t.Fatalf("GET /ui/: %d %q", code, body)
	}
	for _, p := range []string{"/ui/leak", "/ui/../secret", "/ui/%2e%2e/secret", "/ui/..%2fsecret"} {
		if code, body, _ := get(t, h, p); code == 200 || strings.Contains(body, "secret") {
			t.Errorf("GET %s escaped the UI dir: %d %q", p, code, body)
		}
	}
	if _, err := Handler(filepath.Join(base, "nope")); err == nil {
		t.Error("a missing UI dir was accepted")
	}
}
