package api

import (
	"math"
	"net/url"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

func TestQueryInt(t *testing.T) {
	for _, c := range []struct {
		query  string
		lo, hi int64
		want   int64
		bad    bool
	}{
		{"", 1, 100, 7, false},
		{"n=1", 1, 100, 1, false},
		{"n=100", 1, 100, 100, false},
		{"n=0", 1, 100, 0, true},
		{"n=101", 1, 100, 0, true},
		{"n=x", 0, math.MaxInt64, 0, true},
		{"n=-1", 0, math.MaxInt64, 0, true},
		{"n=-5", math.MinInt64, math.MaxInt64, -5, false},
		{"n=99999999999999999999", math.MinInt64, math.MaxInt64, 0, true},
	} {
		q, _ := url.ParseQuery(c.query)
		got, err := queryInt(q, "n", 7, c.lo, c.hi, "n is bad")
		if c.bad {
			if !errs.Is(err, errs.InvalidArgument) || errs.Message(err) != "n is bad" {
				t.Errorf("%q: err %v, want InvalidArgument \"n is bad\"", c.query, err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: %d, %v; want %d", c.query, got, err, c.want)
		}
	}
}

func TestTimeoutOr(t *testing.T) {
	i := func(v int64) *int64 { return &v }
	for _, c := range []struct {
		t    *int64
		want time.Duration
	}{{nil, time.Minute}, {i(0), time.Minute}, {i(30), 30 * time.Second}} {
		if got, err := timeoutOr(c.t, time.Minute); err != nil || got != c.want {
			t.Errorf("%v: %v, %v; want %v", c.t, got, err, c.want)
		}
	}
	if _, err := timeoutOr(i(-1), time.Minute); !errs.Is(err, errs.InvalidArgument) {
		t.Errorf("-1: %v, want InvalidArgument", err)
	}
}
