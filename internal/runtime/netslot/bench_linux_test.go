//go:build linux

package netslot

import (
	"context"
	"fmt"
	"testing"

	"github.com/cubesandbox/cube/internal/runtime"
)

// BenchmarkCreateDestroy: a gVisor sandbox created and destroyed through
// the wrapper (slot from the pool, default policy applied, record saved)
// against the same runtime without it (a private namespace made per
// sandbox), in the same run.
func BenchmarkCreateDestroy(b *testing.B) {
	e := gvisorEnv(b)
	ctx := context.Background()
	for _, c := range []struct {
		name string
		rt   runtime.Runtime
	}{{"slot", e.rt}, {"plain", e.inner}} {
		b.Run(c.name, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				id := fmt.Sprintf("bench-%s-%d", c.name, i)
				if _, err := c.rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: e.tid}); err != nil {
					b.Fatal(err)
				}
				if err := c.rt.Destroy(ctx, id); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
