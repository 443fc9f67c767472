//go:build linux

package network

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	mnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Expression builders. Register 1 is used throughout.

func ifname(n string) []byte {
	b := make([]byte, 16)
	copy(b, n)
	return b
}

func metaIs(key expr.MetaKey, data []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: data},
	}
}

func metaNot(key expr.MetaKey, data []byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: data},
	}
}

// ipv4 matches IPv4 packets in an inet table.
func ipv4() []expr.Any { return metaIs(expr.MetaKeyNFPROTO, []byte{unix.NFPROTO_IPV4}) }

func ctState(bits uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bits), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
	}
}

// payload loads len bytes at off of base into register 1.
func payload(base expr.PayloadBase, off, n uint32) *expr.Payload {
	return &expr.Payload{DestRegister: 1, Base: base, Offset: off, Len: n}
}

func saddr4() *expr.Payload { return payload(expr.PayloadBaseNetworkHeader, 12, 4) }
func daddr4() *expr.Payload { return payload(expr.PayloadBaseNetworkHeader, 16, 4) }

func lookup(s *nftables.Set) *expr.Lookup {
	return &expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID}
}

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func one(e ...expr.Any) []expr.Any { return e }

func verdict(k expr.VerdictKind) []expr.Any { return []expr.Any{&expr.Verdict{Kind: k}} }

func dropCounted() []expr.Any {
	return []expr.Any{&expr.Counter{}, &expr.Verdict{Kind: expr.VerdictDrop}}
}

func jump(chain string) []expr.Any {
	return []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: chain}}
}

func ip4(a netip.Addr) []byte { b := a.As4(); return b[:] }

func u32be(v uint32) []byte { b := make([]byte, 4); binary.BigEndian.PutUint32(b, v); return b }

// rangeElems turns merged ranges into interval-set elements.
func rangeElems(rs []ipRange) []nftables.SetElement {
	els := make([]nftables.SetElement, 0, 2*len(rs))
	for _, r := range rs {
		els = append(els, nftables.SetElement{Key: u32be(r.lo)})
		if r.hi != 0xffffffff {
			els = append(els, nftables.SetElement{Key: u32be(r.hi + 1), IntervalEnd: true})
		}
	}
	return els
}

// bigBuffers lets one transaction carry a 10,000-entry policy (the
// default socket buffer holds about 200 KB).
func bigBuffers() nftables.ConnOption {
	return nftables.WithSockOptions(func(c *mnl.Conn) error {
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 8<<20)
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 8<<20)
			}
		}); err != nil {
			return err
		}
		return serr
	})
}

// Names of the slot table's objects.
const (
	slotTable  = "cube"
	setHard    = "hard"
	setAllow   = "allow"
	setDeny    = "deny"
	setDNS     = "dns"
	setPriv    = "priv"
	arpTable   = "cubearp"
	dnsMaxTTL  = time.Hour
	dnsMinTTL  = 30 * time.Second
	chainEgres = "egress"
	chainIngr  = "ingress"
)

// slotSets are the sets of a slot table (IDs are only valid per batch).
type slotSets struct {
	table                        *nftables.Table
	hard, allow, deny, dns, priv *nftables.Set
}

func newSlotSets() slotSets {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: slotTable}
	mk := func(name string, id uint32) *nftables.Set {
		return &nftables.Set{Table: t, Name: name, ID: id, KeyType: nftables.TypeIPAddr, Interval: true}
	}
	return slotSets{
		table: t,
		hard:  mk(setHard, 1), allow: mk(setAllow, 2), deny: mk(setDeny, 3),
		dns:  &nftables.Set{Table: t, Name: setDNS, ID: 4, KeyType: nftables.TypeIPAddr, HasTimeout: true},
		priv: mk(setPriv, 5),
	}
}

// buildSlotRules programs the whole slot ruleset (both tables) in c's
// batch. guestIf is the guest-facing interface in the router namespace.
func buildSlotRules(c *nftables.Conn, guestIfName string, hard []ipRange, pol compiled, connRate, maxConns int) error {
	s := newSlotSets()
	// Replace any previous ruleset of ours atomically.
	c.AddTable(s.table)
	c.DelTable(s.table)
	c.AddTable(s.table)
	var priv []ipRange
	for _, r := range defaultDeny {
		priv = append(priv, mustRange(r))
	}
	for _, set := range []*nftables.Set{s.hard, s.allow, s.deny, s.priv} {
		var els []nftables.SetElement
		switch set {
		case s.hard:
			els = rangeElems(hard)
		case s.priv:
			els = rangeElems(mergeRanges(priv))
		case s.allow:
			els = rangeElems(pol.allow)
		case s.deny:
			els = rangeElems(pol.deny)
		}
		if err := c.AddSet(set, nil); err != nil {
			return err
		}
		if err := addElemsChunked(c, set, els); err != nil {
			return err
		}
	}
	if err := c.AddSet(s.dns, nil); err != nil {
		return err
	}
	gi := ifname(guestIfName)
	drop := nftables.ChainPolicyDrop
	accept := nftables.ChainPolicyAccept

	// Anti-spoofing, before conntrack: only GuestMAC / GuestIP / IPv4 leave
	// the guest interface.
	pre := c.AddChain(&nftables.Chain{Name: "pre", Table: s.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRaw, Policy: &accept})
	mac, _ := net.ParseMAC(GuestMAC)
	c.AddRule(&nftables.Rule{Table: s.table, Chain: pre, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		one(payload(expr.PayloadBaseLLHeader, 6, 6), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: mac}), dropCounted())})
	c.AddRule(&nftables.Rule{Table: s.table, Chain: pre, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		metaNot(expr.MetaKeyNFPROTO, []byte{unix.NFPROTO_IPV4}), dropCounted())})
	c.AddRule(&nftables.Rule{Table: s.table, Chain: pre, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		one(saddr4(), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ip4(GuestIP)}), dropCounted())})

	// Forwarding: guest <-> uplink only.
	fwd := c.AddChain(&nftables.Chain{Name: "fwd", Table: s.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &drop})
	eg := c.AddChain(&nftables.Chain{Name: chainEgres, Table: s.table})
	in := c.AddChain(&nftables.Chain{Name: chainIngr, Table: s.table})
	up := ifname(routerUplink)
	c.AddRule(&nftables.Rule{Table: s.table, Chain: fwd, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		metaIs(expr.MetaKeyOIFNAME, up), ipv4(), jump(chainEgres))})
	c.AddRule(&nftables.Rule{Table: s.table, Chain: fwd, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, up),
		metaIs(expr.MetaKeyOIFNAME, gi), ipv4(), ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), jump(chainIngr))})
	c.AddRule(&nftables.Rule{Table: s.table, Chain: fwd, Exprs: dropCounted()})

	// Egress policy, evaluated on every packet (not only NEW), so a policy
	// change applies to live connections at their next packet.
	if connRate > 0 {
		c.AddRule(&nftables.Rule{Table: s.table, Chain: eg, Exprs: cat(ctState(expr.CtStateBitNEW),
			one(&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(connRate), Over: true, Unit: expr.LimitTimeSecond, Burst: uint32(connRate)}),
			dropCounted())})
	}
	if maxConns > 0 {
		// Concurrent connections (conntrack entries) per slot: a guest
		// cannot fill the host's conntrack memory with idle connections.
		c.AddRule(&nftables.Rule{Table: s.table, Chain: eg, Exprs: cat(ctState(expr.CtStateBitNEW),
			one(&expr.Connlimit{Count: uint32(maxConns), Flags: expr.NFT_CONNLIMIT_F_INV}), dropCounted())})
	}
	for _, ch := range []struct {
		c    *nftables.Chain
		addr func() *expr.Payload
	}{{eg, daddr4}, {in, saddr4}} {
		c.AddRule(&nftables.Rule{Table: s.table, Chain: ch.c, Exprs: cat(one(ch.addr(), lookup(s.hard)), dropCounted())})
		c.AddRule(&nftables.Rule{Table: s.table, Chain: ch.c, Exprs: cat(one(ch.addr(), lookup(s.allow)), verdict(expr.VerdictAccept))})
		c.AddRule(&nftables.Rule{Table: s.table, Chain: ch.c, Exprs: cat(one(ch.addr(), lookup(s.priv)), dropCounted())})
		c.AddRule(&nftables.Rule{Table: s.table, Chain: ch.c, Exprs: cat(one(ch.addr(), lookup(s.dns)), verdict(expr.VerdictAccept))})
		c.AddRule(&nftables.Rule{Table: s.table, Chain: ch.c, Exprs: cat(one(ch.addr(), lookup(s.deny)), dropCounted())})
		c.AddRule(&nftables.Rule{Table: s.table, Chain: ch.c, Exprs: verdict(expr.VerdictAccept)})
	}

	// The router itself: the guest may reach the DNS forwarder and ping the
	// gateway; replies to Dial are established. Nothing from the uplink.
	inp := c.AddChain(&nftables.Chain{Name: "in", Table: s.table, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	for _, ifn := range [][]byte{gi, up} {
		c.AddRule(&nftables.Rule{Table: s.table, Chain: inp, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, ifn),
			ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), verdict(expr.VerdictAccept))})
	}
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		c.AddRule(&nftables.Rule{Table: s.table, Chain: inp, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
			one(daddr4(), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ip4(GatewayIP)}),
			metaIs(expr.MetaKeyL4PROTO, []byte{proto}),
			one(payload(expr.PayloadBaseTransportHeader, 2, 2), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 53}}),
			verdict(expr.VerdictAccept))})
	}
	c.AddRule(&nftables.Rule{Table: s.table, Chain: inp, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		metaIs(expr.MetaKeyL4PROTO, []byte{unix.IPPROTO_ICMP}),
		one(payload(expr.PayloadBaseTransportHeader, 0, 1), &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{8}}),
		one(&expr.Limit{Type: expr.LimitTypePkts, Rate: 100, Unit: expr.LimitTimeSecond, Burst: 100}),
		verdict(expr.VerdictAccept))})
	for _, ifn := range [][]byte{gi, up} {
		c.AddRule(&nftables.Rule{Table: s.table, Chain: inp, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, ifn), dropCounted())})
	}

	// NAT: the guest address is the same in every slot, so the router
	// masquerades it to its uplink address; the host masquerades again.
	post := c.AddChain(&nftables.Chain{Name: "post", Table: s.table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: s.table, Chain: post, Exprs: cat(metaIs(expr.MetaKeyOIFNAME, up), ipv4(),
		one(&expr.Masq{}))})

	// ARP: the guest may only claim GuestIP / GuestMAC.
	at := &nftables.Table{Family: nftables.TableFamilyARP, Name: arpTable}
	c.AddTable(at)
	c.DelTable(at)
	c.AddTable(at)
	ain := c.AddChain(&nftables.Chain{Name: "in", Table: at, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookRef(0) /* NF_ARP_IN */, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	// ARP header (Ethernet/IPv4): sha at 8 (6 bytes), spa at 14 (4 bytes).
	c.AddRule(&nftables.Rule{Table: at, Chain: ain, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		one(payload(expr.PayloadBaseNetworkHeader, 8, 6), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: mac}), dropCounted())})
	c.AddRule(&nftables.Rule{Table: at, Chain: ain, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		one(payload(expr.PayloadBaseNetworkHeader, 14, 4), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: ip4(GuestIP)}), dropCounted())})
	// Ethernet source must match too.
	c.AddRule(&nftables.Rule{Table: at, Chain: ain, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, gi),
		one(payload(expr.PayloadBaseLLHeader, 6, 6), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: mac}), dropCounted())})
	return nil
}

// addElemsChunked queues els in messages of bounded size (one batch, one
// transaction).
func addElemsChunked(c *nftables.Conn, s *nftables.Set, els []nftables.SetElement) error {
	const chunk = 2000
	for len(els) > 0 {
		n := min(chunk, len(els))
		if err := c.SetAddElements(s, els[:n]); err != nil {
			return err
		}
		els = els[n:]
	}
	return nil
}

// updatePolicySets replaces the allow and deny sets (one transaction) and
// empties the DNS set; dnsKeep are re-added with their remaining lifetime.
func updatePolicySets(c *nftables.Conn, pol compiled, dnsKeep []nftables.SetElement) error {
	s := newSlotSets()
	for _, x := range []struct {
		set *nftables.Set
		rs  []ipRange
	}{{s.allow, pol.allow}, {s.deny, pol.deny}} {
		c.FlushSet(x.set)
		if err := addElemsChunked(c, x.set, rangeElems(x.rs)); err != nil {
			return err
		}
	}
	c.FlushSet(s.dns)
	if len(dnsKeep) > 0 {
		if err := addElemsChunked(c, s.dns, dnsKeep); err != nil {
			return err
		}
	}
	return nil
}

// addDNSAddrs adds learned addresses to the DNS set.
func addDNSAddrs(c *nftables.Conn, addrs []netip.Addr, ttl time.Duration) error {
	s := newSlotSets()
	els := make([]nftables.SetElement, 0, len(addrs))
	for _, a := range addrs {
		els = append(els, nftables.SetElement{Key: ip4(a), Timeout: ttl})
	}
	if err := c.SetAddElements(s.dns, els); err != nil {
		return err
	}
	return c.Flush()
}

// dropCounters sums the packets counted by the drop rules of every chain
// of the slot's tables (the denial tests read it).
func dropCounters(c *nftables.Conn) (map[string]uint64, error) {
	out := map[string]uint64{}
	for _, t := range []*nftables.Table{{Family: nftables.TableFamilyINet, Name: slotTable}, {Family: nftables.TableFamilyARP, Name: arpTable}} {
		chains, err := c.ListChainsOfTableFamily(t.Family)
		if err != nil {
			return nil, err
		}
		for _, ch := range chains {
			if ch.Table.Name != t.Name {
				continue
			}
			rules, err := c.GetRules(t, ch)
			if err != nil {
				return nil, fmt.Errorf("rules of %s: %w", ch.Name, err)
			}
			for _, r := range rules {
				for _, e := range r.Exprs {
					if ct, ok := e.(*expr.Counter); ok {
						out[t.Name+"/"+ch.Name] += ct.Packets
					}
				}
			}
		}
	}
	return out, nil
}
