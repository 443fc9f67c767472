//go:build linux

package envd

import (
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzFilesGetPath: whatever path a client sends to GET /files, the agent
// answers with a JSON error or the file, never a 5xx, and a client acting
// as `nobody` never receives a root-only file (traversal, symlinks,
// `~`, relative paths, NUL bytes...).
func FuzzFilesGetPath(f *testing.F) {
	if os.Geteuid() != 0 {
		f.Skip("needs root to switch to nobody; resolvePath is fuzzed by FuzzResolvePath")
	}
	secretDir, _ := os.MkdirTemp("", "fuzz-secret-")
	defer os.RemoveAll(secretDir)
	secret := filepath.Join(secretDir, "secret")
	os.WriteFile(secret, []byte("FUZZSECRET"), 0o600)
	pub, _ := os.MkdirTemp("", "fuzz-pub-")
	defer os.RemoveAll(pub)
	os.Chmod(pub, 0o755)
	os.Symlink(secret, filepath.Join(pub, "link"))
	os.Symlink(secretDir, filepath.Join(pub, "dirlink"))
	os.WriteFile(filepath.Join(pub, "ok"), []byte("fine"), 0o644)

	for _, s := range []string{secret, pub + "/link", pub + "/dirlink/secret", pub + "/../" + filepath.Base(secretDir) + "/secret",
		"~/../../" + strings.TrimPrefix(secret, "/"), pub + "/ok", "../../../../" + secret, "/proc/self/root" + secret, "\x00", "~"} {
		f.Add(s)
	}
	s := New(Options{DefaultUser: "root"})
	defer s.Close()
	h := s.Handler()
	f.Fuzz(func(t *testing.T, p string) {
		req := httptest.NewRequest("GET", "/files?username=nobody&path="+url.QueryEscape(p), nil)
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("path %q: status %d %s", p, rec.Code, rec.Body.String())
		}
		if strings.Contains(rec.Body.String(), "FUZZSECRET") {
			t.Fatalf("path %q leaked a root-only file to nobody", p)
		}
		if rec.Code != 200 && !strings.Contains(rec.Body.String(), `"code":`) {
			t.Fatalf("path %q: non-JSON error %q", p, rec.Body.String())
		}
	})
}

// FuzzResolvePath: results are absolute, clean and NUL-free.
func FuzzResolvePath(f *testing.F) {
	for _, s := range []string{"~", "~/a/../..", "a/b", "/x/../../y", "", "\x00", "~user"} {
		f.Add(s)
	}
	u := &User{Name: "u", Home: "/home/u"}
	f.Fuzz(func(t *testing.T, p string) {
		out, err := resolvePath(p, u)
		if err != nil {
			return
		}
		if !filepath.IsAbs(out) || filepath.Clean(out) != out || strings.IndexByte(out, 0) >= 0 {
			t.Fatalf("resolvePath(%q) = %q", p, out)
		}
	})
}
