package network

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/cubesandbox/cube/internal/errs"
)

func TestCompileMergesAndOrders(t *testing.T) {
	c, err := compile(Policy{AllowOut: []string{"8.8.8.0/24", "8.8.8.8", "8.8.9.0/24", "1.1.1.1/32", "*.Example.COM.", "2001:db8::/32"},
		DenyOut: []string{"0.0.0.0/0"}})
	if err != nil {
		t.Fatal(err)
	}
	want := []ipRange{{0x01010101, 0x01010101}, {0x08080800, 0x080809ff}}
	if len(c.allow) != 2 || c.allow[0] != want[0] || c.allow[1] != want[1] {
		t.Fatalf("allow %x", c.allow)
	}
	if !c.denyAll || len(c.deny) != 1 {
		t.Fatalf("deny %x denyAll %v", c.deny, c.denyAll)
	}
	if len(c.domains) != 1 || c.domains[0] != "*.example.com" {
		t.Fatalf("domains %v", c.domains)
	}
	d, _ := compile(Policy{})
	if contains(d.deny, netip.MustParseAddr("8.8.8.8")) || d.denyAll {
		t.Error("default policy denies the internet")
	}
	off, _ := compile(Policy{AllowInternetAccess: Bool(false)})
	if !off.denyAll {
		t.Error("allow_internet_access=false does not deny all")
	}
}

func TestMatchDomain(t *testing.T) {
	p := []string{"*.example.com", "exact.org"}
	for name, want := range map[string]bool{
		"a.example.com": true, "a.b.example.com.": true, "example.com": false, "badexample.com": false,
		"exact.org": true, "EXACT.ORG.": true, "a.exact.org": false, "": false,
	} {
		if matchDomain(p, name) != want {
			t.Errorf("%q: want %v", name, want)
		}
	}
}

func TestCompileRejects(t *testing.T) {
	for _, e := range []string{"10.0.0.0/33", "300.1.1.1", "1.2.3", "a..b", "*.", "*", "x y", "-a.com", "a-.com",
		strings.Repeat("a", 64) + ".com", "::ffff:1.2.3.4/128", "1.2.3.4/-1"} {
		if _, err := compile(Policy{AllowOut: []string{e}}); !errs.Is(err, errs.InvalidArgument) {
			t.Errorf("%q: %v", e, err)
		}
	}
}

func FuzzCompilePolicy(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "8.8.8.8", "*.example.com", "0.0.0.0/0", "::/0", "1.2.3.4/33", "a..b"} {
		f.Add(s, s)
	}
	f.Fuzz(func(t *testing.T, a, d string) {
		c, err := compile(Policy{AllowOut: strings.Split(a, ","), DenyOut: strings.Split(d, ",")})
		if err != nil {
			if !errs.Is(err, errs.InvalidArgument) {
				t.Fatalf("error kind %v", errs.KindOf(err))
			}
			return
		}
		for _, rs := range [][]ipRange{c.allow, c.deny} {
			for i, r := range rs {
				if r.lo > r.hi || (i > 0 && (rs[i-1].hi == 0xffffffff || rs[i-1].hi+1 >= r.lo)) {
					t.Fatalf("ranges not merged: %x", rs)
				}
			}
		}
	})
}
