//go:build linux

package gvisor

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/cubesandbox/cube/internal/runtime/conformance"
	"github.com/cubesandbox/cube/internal/template"
)

// bakeBase builds the built-in "base" template (debootstrap output cached
// in the cache dir; `make test` builds it first) with the test agent
// injected, and bakes it into rt.
func bakeBase(t testing.TB, rt *Runtime) string {
	t.Helper()
	cat, err := template.NewFileCatalog(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b := &template.Builder{
		DataDir: artifactsDir, CacheDir: cacheDir(), AgentPath: conformance.AgentBinary(t),
		Runtime: rt, Catalog: cat,
	}
	r, err := b.CreateBuiltin(context.Background(), "base")
	if err != nil {
		t.Fatalf("build base: %v", err)
	}
	return r.ID
}

// artifactsDir holds template artifacts shared by this package's tests
// (content-addressed: built once per run).
var artifactsDir string

func TestMain(m *testing.M) {
	d, err := os.MkdirTemp("", "cube-gvisor-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	artifactsDir = d
	code := m.Run()
	os.RemoveAll(d)
	os.Exit(code)
}
