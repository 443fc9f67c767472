package main

import (
	"slices"
	"time"
)

// sampleAt returns the sample at index(len(ds)) of ds sorted ascending
// (the index clamped to the samples), or 0 when there are none.
func sampleAt(ds []time.Duration, index func(n int) int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(max(index(len(s)), 0), len(s)-1)]
}

// percentile is the nearest-rank p-th percentile (p from 0 to 100) of ds,
// or 0 when there are no samples.
func percentile(ds []time.Duration, p int) time.Duration {
	return sampleAt(ds, func(n int) int { return (n*p+99)/100 - 1 })
}
