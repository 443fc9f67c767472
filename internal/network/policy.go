package network

import (
	"encoding/binary"
	"net/netip"
	"sort"
	"strings"

	"github.com/cubesandbox/cube/internal/errs"
)

// MaxPolicyEntries is the largest allowOut or denyOut list accepted. A
// 10,000-entry list is applied in one nftables transaction (see
// docs/network.md for the measured time); longer lists get InvalidArgument.
const MaxPolicyEntries = 10000

// Policy is a sandbox's egress policy. It maps one to one onto the E2B
// create request (`allow_internet_access`, `network.allowOut`,
// `network.denyOut`) and onto `PUT /sandboxes/{id}/network`.
// allowPublicTraffic is enforced by the proxy, not here.
//
// Evaluation order for every packet the guest sends (and every reply it
// receives), first match wins:
//  1. always denied: link-local (incl. 169.254.169.254), loopback, 0/8,
//     multicast, reserved, the slot host range and the host's own addresses;
//  2. AllowOut CIDRs and IPs: accept;
//  3. the private ranges 10/8, 172.16/12, 192.168/16, 100.64/10: drop;
//  4. IPs learned from DNS answers for AllowOut domains: accept;
//  5. DenyOut, and 0.0.0.0/0 if AllowInternetAccess is false: drop;
//  6. accept.
//
// So allow wins over deny (as in E2B), and private ranges can be opened by
// listing them in AllowOut.
type Policy struct {
	// AllowInternetAccess false is E2B's allow_internet_access=false and
	// equals DenyOut ["0.0.0.0/0"]. nil means true.
	AllowInternetAccess *bool `json:"allow_internet_access,omitempty"`
	// AllowOut holds CIDRs, IP addresses and domains ("example.com",
	// "*.example.com" = any subdomain).
	AllowOut []string `json:"allowOut,omitempty"`
	// DenyOut holds CIDRs and IP addresses.
	DenyOut []string `json:"denyOut,omitempty"`
}

// Bool returns a pointer to b (for Policy.AllowInternetAccess).
func Bool(b bool) *bool { return &b }

// ipRange is an inclusive IPv4 range.
type ipRange struct{ lo, hi uint32 }

// compiled is a validated policy ready for nftables.
type compiled struct {
	allow   []ipRange // merged, sorted
	deny    []ipRange
	domains []string // normalised patterns: "example.com" or "*.example.com"
	denyAll bool     // 0.0.0.0/0 is in deny (internet off)
}

// defaultDeny are denied unless allowed by an allowOut CIDR (private and
// shared ranges). Addresses learned from DNS answers do not open them (no
// DNS rebinding into the host's LAN).
var defaultDeny = []string{"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10"}

// alwaysDeny can never be opened by a policy.
var alwaysDeny = []string{
	"0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
}

// compile validates p and turns it into IPv4 ranges. IPv6 entries are
// accepted and ignored: sandboxes have no IPv6 egress at all.
func compile(p Policy) (compiled, error) {
	var c compiled
	if len(p.AllowOut) > MaxPolicyEntries {
		return c, errs.E(errs.InvalidArgument, "network.allowOut has %d entries; at most %d are allowed", len(p.AllowOut), MaxPolicyEntries)
	}
	if len(p.DenyOut) > MaxPolicyEntries {
		return c, errs.E(errs.InvalidArgument, "network.denyOut has %d entries; at most %d are allowed", len(p.DenyOut), MaxPolicyEntries)
	}
	var allow, deny []ipRange
	seen := map[string]bool{}
	for i, e := range p.AllowOut {
		r, isIP, dom, err := parseEntry(e)
		if err != nil {
			return c, errs.E(errs.InvalidArgument, "network.allowOut[%d] %q: %s", i, truncate(e), err.Error())
		}
		if dom != "" {
			if !seen[dom] {
				seen[dom] = true
				c.domains = append(c.domains, dom)
			}
			continue
		}
		if isIP {
			allow = append(allow, r)
		}
	}
	for i, e := range p.DenyOut {
		r, isIP, dom, err := parseEntry(e)
		if err != nil {
			return c, errs.E(errs.InvalidArgument, "network.denyOut[%d] %q: %s", i, truncate(e), err.Error())
		}
		if dom != "" {
			return c, errs.E(errs.InvalidArgument, "network.denyOut[%d] %q: domains are only supported in allowOut", i, truncate(e))
		}
		if isIP {
			deny = append(deny, r)
		}
	}
	if p.AllowInternetAccess != nil && !*p.AllowInternetAccess {
		deny = append(deny, ipRange{0, 0xffffffff})
	}
	c.allow = mergeRanges(allow)
	c.deny = mergeRanges(deny)
	for _, r := range c.deny {
		if r.lo == 0 && r.hi == 0xffffffff {
			c.denyAll = true
		}
	}
	sort.Strings(c.domains)
	return c, nil
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "..."
	}
	return s
}

type entryError string

func (e entryError) Error() string { return string(e) }

// parseEntry parses a CIDR, an IP address or a domain pattern. isIP is
// false for IPv6 entries (ignored) and domains.
func parseEntry(e string) (r ipRange, isIP bool, domain string, err error) {
	s := strings.TrimSpace(e)
	if s == "" {
		return r, false, "", entryError("empty entry")
	}
	if strings.Contains(s, "/") {
		p, perr := netip.ParsePrefix(s)
		if perr != nil {
			return r, false, "", entryError("not a valid CIDR")
		}
		p = p.Masked()
		if !p.Addr().Is4() {
			if p.Addr().Is4In6() {
				return r, false, "", entryError("IPv4-mapped IPv6 prefixes are not supported; use the IPv4 form")
			}
			return r, false, "", nil
		}
		return prefixRange(p), true, "", nil
	}
	if a, aerr := netip.ParseAddr(s); aerr == nil {
		if a.Is4In6() {
			a = a.Unmap()
		}
		if !a.Is4() {
			return r, false, "", nil
		}
		return prefixRange(netip.PrefixFrom(a, 32)), true, "", nil
	}
	d, derr := normalizeDomain(s)
	if derr != nil {
		return r, false, "", derr
	}
	return r, false, d, nil
}

// normalizeDomain validates a domain or wildcard pattern and lower-cases it.
func normalizeDomain(s string) (string, error) {
	s = strings.ToLower(strings.TrimSuffix(s, "."))
	wild := strings.HasPrefix(s, "*.")
	name := strings.TrimPrefix(s, "*.")
	if len(name) == 0 || len(name) > 253 {
		return "", entryError("not a CIDR, an IP address or a domain")
	}
	labels := strings.Split(name, ".")
	allDigits := true
	for _, l := range labels {
		if len(l) == 0 || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return "", entryError("not a CIDR, an IP address or a domain")
		}
		for i := 0; i < len(l); i++ {
			ch := l[i]
			switch {
			case ch >= 'a' && ch <= 'z', ch == '-', ch == '_':
				allDigits = false
			case ch >= '0' && ch <= '9':
			default:
				return "", entryError("not a CIDR, an IP address or a domain")
			}
		}
	}
	if allDigits {
		return "", entryError("not a valid IP address")
	}
	if wild {
		return "*." + name, nil
	}
	return name, nil
}

// matchDomain reports whether name (lower case, no trailing dot) matches
// one of the patterns. "*.example.com" matches strict subdomains only.
func matchDomain(patterns []string, name string) bool {
	name = strings.ToLower(strings.TrimSuffix(name, "."))
	for _, p := range patterns {
		if strings.HasPrefix(p, "*.") {
			if strings.HasSuffix(name, p[1:]) && len(name) > len(p)-1 {
				return true
			}
		} else if name == p {
			return true
		}
	}
	return false
}

func prefixRange(p netip.Prefix) ipRange {
	b := p.Addr().As4()
	lo := binary.BigEndian.Uint32(b[:])
	bits := p.Bits()
	var mask uint32
	if bits > 0 {
		mask = ^uint32(0) << (32 - bits)
	}
	lo &= mask
	return ipRange{lo, lo | ^mask}
}

func mustRange(s string) ipRange {
	r, ok, _, err := parseEntry(s)
	if err != nil || !ok {
		panic("bad built-in range " + s)
	}
	return r
}

// mergeRanges sorts rs and merges overlapping and adjacent ranges: an
// nftables interval set rejects overlapping elements.
func mergeRanges(rs []ipRange) []ipRange {
	if len(rs) == 0 {
		return nil
	}
	s := append([]ipRange(nil), rs...)
	sort.Slice(s, func(i, j int) bool { return s[i].lo < s[j].lo })
	out := []ipRange{s[0]}
	for _, r := range s[1:] {
		last := &out[len(out)-1]
		if last.hi == 0xffffffff || r.lo <= last.hi+1 {
			if r.hi > last.hi {
				last.hi = r.hi
			}
			continue
		}
		out = append(out, r)
	}
	return out
}

// contains reports whether ip is in one of the merged ranges.
func contains(rs []ipRange, ip netip.Addr) bool {
	if !ip.Is4() {
		return false
	}
	b := ip.As4()
	v := binary.BigEndian.Uint32(b[:])
	i := sort.Search(len(rs), func(i int) bool { return rs[i].hi >= v })
	return i < len(rs) && rs[i].lo <= v
}
