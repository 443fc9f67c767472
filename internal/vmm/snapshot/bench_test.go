//go:build linux

package snapshot_test

import (
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
)

// BenchmarkRestore: decode + map + set state + start, until the guest
// counter moves, in process (the pre-started VMM's path).
func BenchmarkRestore(b *testing.B) {
	dir := b.TempDir()
	orig, _ := takeSnapshot(b, dir)
	orig.VM.Close()
	s, err := snapshot.Load(dir)
	if err != nil {
		b.Fatal(err)
	}
	var tNew, tStart time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		m, err := snapshot.RestoreState(dir, s, st.Spec())
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		c0 := st.U64(m.VM, st.Counter)
		m.VM.Start()
		for st.U64(m.VM, st.Counter) == c0 {
		}
		t2 := time.Now()
		tNew += t1.Sub(t0)
		tStart += t2.Sub(t1)
		b.StopTimer()
		m.VM.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(tNew.Microseconds())/float64(b.N), "us-restore")
	b.ReportMetric(float64(tStart.Microseconds())/float64(b.N), "us-start")
}
