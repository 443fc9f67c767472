// Package agenttest holds helpers shared by cube-agent's tests and
// benchmarks.
package agenttest

import (
	"sort"
	"testing"
	"time"
)

// ReportLatencies reports the p50 and p99 of per-iteration durations l
// (sorted in place) as benchmark metrics, in microseconds.
func ReportLatencies(b *testing.B, l []time.Duration) {
	if len(l) == 0 {
		return
	}
	sort.Slice(l, func(i, j int) bool { return l[i] < l[j] })
	p := func(q float64) float64 { return float64(l[int(q*float64(len(l)-1))].Microseconds()) }
	b.ReportMetric(p(0.50), "p50-us")
	b.ReportMetric(p(0.99), "p99-us")
}
