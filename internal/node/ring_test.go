package node

import (
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/runtime"
)

// TestRing: the metrics ring keeps the newest samples, oldest first.
func TestRing(t *testing.T) {
	r := newRing(3)
	if _, ok := r.last(); ok || r.len() != 0 {
		t.Fatal("empty ring has samples")
	}
	t0 := time.Unix(1000, 0)
	for i := range 5 {
		r.add(runtime.Stats{Timestamp: t0.Add(time.Duration(i) * time.Second)})
		if want := min(i+1, 3); r.len() != want {
			t.Fatalf("after %d adds len %d, want %d", i+1, r.len(), want)
		}
	}
	for i := range 3 {
		if got := r.at(i).Timestamp.Unix(); got != 1002+int64(i) {
			t.Fatalf("at(%d) = %d", i, got)
		}
	}
	if l, _ := r.last(); l.Timestamp.Unix() != 1004 {
		t.Fatalf("last %v", l.Timestamp)
	}
}
