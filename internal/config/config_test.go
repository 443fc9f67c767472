package config

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

func TestDefaultsAndOverrides(t *testing.T) {
	d := Default()
	if d.Listen != ":3000" || d.DataDir != "/var/lib/cube" || d.DefaultTimeout != 300*time.Second {
		t.Fatalf("defaults: %+v", d)
	}
	p := filepath.Join(t.TempDir(), "c.json")
	os.WriteFile(p, []byte(`{"listen":":4000","maxSandboxes":7}`), 0o644)
	t.Setenv("CUBE_MAX_SANDBOXES", "9")
	c, err := Load(p)
	if err != nil {
		t.Fatal(err)
	}
	if c.Listen != ":4000" || c.MaxSandboxes != 9 {
		t.Fatalf("overrides: %+v", c)
	}
}

func TestBadInput(t *testing.T) {
	t.Setenv("CUBE_MAX_SANDBOXES", "many")
	if _, err := Load(""); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("want invalid argument, got %v", err)
	}
	p := filepath.Join(t.TempDir(), "c.json")
	os.WriteFile(p, []byte(`{"nosuch":1}`), 0o644)
	os.Unsetenv("CUBE_MAX_SANDBOXES")
	if _, err := Load(p); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("unknown field: want invalid argument, got %v", err)
	}
}
