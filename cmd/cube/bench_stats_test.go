//go:build linux

package main

import (
	"math"
	"math/rand"
	"slices"
	"testing"
	"time"
)

// TestBenchPercentiles checks each bench's percentile against its
// definition, computed here on the sorted samples, for 1 to 300 samples.
func TestBenchPercentiles(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	clamp := func(i, n int) int { return min(max(i, 0), n-1) }
	for n := 1; n <= 300; n++ {
		ds := make([]time.Duration, n)
		for i := range ds {
			ds[i] = time.Duration(rng.Int63n(1e9))
		}
		orig := slices.Clone(ds)
		s := slices.Sorted(slices.Values(ds))
		for _, p := range []int{0, 50, 95, 99, 100} {
			f := float64(p) / 100
			rank := clamp(int(math.Ceil(f*float64(n)))-1, n)
			if got := percentile(ds, p); got != s[rank] {
				t.Fatalf("n=%d p=%d: percentile %v, want %v", n, p, got, s[rank])
			}
			if got := (&benchStats{samples: ds}).pct(p); got != s[rank] {
				t.Fatalf("n=%d p=%d: benchStats.pct %v, want %v", n, p, got, s[rank])
			}
			if got, want := pct(ds, p), s[rank].Round(time.Microsecond); got != want {
				t.Fatalf("n=%d p=%d: pct %v, want %v", n, p, got, want)
			}
			if got, want := latencies(ds).pct(p), s[clamp(n*p/100, n)]; got != want {
				t.Fatalf("n=%d p=%d: latencies.pct %v, want %v", n, p, got, want)
			}
			if got, want := cpct(ds, f), s[clamp(int(math.Round(f*float64(n)))-1, n)]; got != want {
				t.Fatalf("n=%d p=%d: cpct %v, want %v", n, p, got, want)
			}
			if got, want := lat(ds).pct(f), s[int(math.Floor(f*float64(n-1)))]; got != want {
				t.Fatalf("n=%d p=%d: lat.pct %v, want %v", n, p, got, want)
			}
		}
		if !slices.Equal(ds, orig) {
			t.Fatal("samples reordered")
		}
	}
	if percentile(nil, 50) != 0 || cpct(nil, .5) != 0 || latencies(nil).pct(50) != 0 {
		t.Fatal("no samples: want 0")
	}
}
