//go:build linux

package gvisor

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
)

func runscPath(t testing.TB) string {
	if os.Geteuid() != 0 {
		t.Skip("gvisor runtime tests need root (netns, cgroups)")
	}
	for _, p := range []string{os.Getenv("CUBE_RUNSC"), filepath.Join(cacheDir(), "bin", "runsc")} {
		if p != "" {
			if _, err := os.Stat(p); err == nil {
				return p
			}
		}
	}
	t.Skip("runsc not built: run `make runsc` (mk/runsc.mk)")
	return ""
}

func cacheDir() string {
	if d := os.Getenv("CUBE_CACHE_DIR"); d != "" {
		return d
	}
	return "/var/cache/cube"
}

func newRuntime(t testing.TB, pool int) *Runtime {
	rt, err := New(context.Background(), Options{DataDir: t.TempDir(), RunscPath: runscPath(t), PoolSize: pool})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rt.Close() })
	return rt
}

func harness(rt *Runtime, tid string) conformance.Harness {
	return conformance.Harness{
		Runtime:  rt,
		Template: tid,
		Footprint: func(id string) (any, error) {
			return rt.Inspect(id)
		},
		Leftovers: func(fp any) []string {
			res := fp.(Resources)
			l := rt.Leftovers(res.CID)
			if _, err := os.Stat(res.Dir); err == nil {
				l = append(l, res.Dir)
			}
			return l
		},
	}
}

func TestConformance(t *testing.T) {
	rt := newRuntime(t, 0)
	rootfs := testRootfs(t)
	if err := rt.BakeTemplate(context.Background(), runtime.Template{ID: "conf", RootfsDir: rootfs, Resources: runtime.Resources{DiskMB: 256, MemoryMB: 256, CPUCount: 1}}); err != nil {
		t.Fatal(err)
	}
	conformance.Run(t, harness(rt, "conf"))
}
