package proxy

import (
	"net/http/httptest"
	"testing"

	"github.com/cubesandbox/cube/internal/logging"
)

func TestMatch(t *testing.T) {
	p := New(nil, "cube.example", nil, nil, logging.Discard())
	any := New(nil, "", nil, nil, logging.Discard())
	cases := []struct {
		p        *Proxy
		host     string
		hdr      [2]string
		id       string
		port     int
		ok, fail bool
	}{
		{p, "localhost:3000", [2]string{"abc123", "49999"}, "abc123", 49999, true, false},
		{p, "localhost:3000", [2]string{"abc123", ""}, "abc123", 49983, true, false},
		{p, "localhost:3000", [2]string{"abc123", "x"}, "abc123", 0, true, true},
		{p, "localhost:3000", [2]string{"abc123", "70000"}, "abc123", 0, true, true},
		{p, "49983-abc123.cube.example", [2]string{}, "abc123", 49983, true, false},
		{p, "8080-abc123.CUBE.example:443", [2]string{}, "abc123", 8080, true, false},
		{p, "8080-abc123.other.example", [2]string{}, "", 0, false, false},
		{p, "api.cube.example", [2]string{}, "", 0, false, false},
		{p, "99999-abc.cube.example", [2]string{}, "abc", 0, true, true},
		{p, "localhost:3000", [2]string{}, "", 0, false, false},
		{p, "127.0.0.1:3000", [2]string{}, "", 0, false, false},
		{any, "49999-abc.anything.test", [2]string{}, "abc", 49999, true, false},
		{any, "49999-ABC_x.anything.test", [2]string{}, "", 0, false, false},
	}
	for _, c := range cases {
		r := httptest.NewRequest("GET", "/", nil)
		r.Host = c.host
		if c.hdr[0] != "" {
			r.Header.Set(HeaderSandboxID, c.hdr[0])
			if c.hdr[1] != "" {
				r.Header.Set(HeaderSandboxPort, c.hdr[1])
			}
		}
		id, port, ok, err := c.p.Match(r)
		if ok != c.ok || (err != nil) != c.fail || (!c.fail && (id != c.id || port != c.port)) {
			t.Errorf("%s %v: got %q %d %v %v", c.host, c.hdr, id, port, ok, err)
		}
	}
}

// FuzzMatch: routing never panics and only yields ports in range.
func FuzzMatch(f *testing.F) {
	for _, s := range []string{"49983-abc.cube.example", "x", "1-a.b", "65536-a.b", "-.", "0-a.cube.example:1"} {
		f.Add(s, "abc", "49999")
	}
	p := New(nil, "", nil, nil, logging.Discard())
	f.Fuzz(func(t *testing.T, host, id, port string) {
		r := httptest.NewRequest("GET", "/", nil)
		r.Host = host
		if id != "" {
			r.Header.Set(HeaderSandboxID, id)
			r.Header.Set(HeaderSandboxPort, port)
		}
		_, pt, ok, err := p.Match(r)
		if ok && err == nil && (pt < 1 || pt > 65535) {
			t.Fatalf("port %d", pt)
		}
	})
}
