//go:build linux

package network

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/hostinfo"
	"github.com/cubesandbox/cube/internal/runtime"
)

// Options configure a Manager (NewManager derives them from config.Config).
type Options struct {
	Prefix      string       // name prefix, [a-z][a-z0-9]{0,7}
	HostRange   netip.Prefix // IPv4, split into /30s (one per slot)
	PoolSize    int          // slots kept ready
	Mode        Mode
	ConnRate    int    // new connections per second per slot; 0 = unlimited
	MaxConns    int    // concurrent outbound connections per slot; 0 = unlimited
	DNSUpstream string // host:port
	// AdoptGrace: orphans not adopted this long after start are reaped
	// (0 = 2 minutes; negative = only by ReapStale).
	AdoptGrace time.Duration
}

// Manager owns the slots of one cube process.
type Manager struct {
	opts Options
	log  *slog.Logger
	hard []ipRange // never reachable from a guest

	mu      sync.Mutex
	used    map[int]bool
	pool    []*slot
	active  map[string]*slot
	orphans map[string]int // slots of a previous run, by id
	closed  bool

	refill chan struct{}
	done   chan struct{}
	wg     sync.WaitGroup
	lock   *os.File // flock on /run/cube/net-<prefix>.lock: one manager per prefix
	reaper *time.Timer
}

var prefixRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,7}$`)

// NewManager builds a Manager from the node configuration.
func NewManager(cfg config.Config, log *slog.Logger) (*Manager, error) {
	r, err := netip.ParsePrefix(cfg.SlotHostRange)
	if err != nil {
		return nil, errs.E(errs.InvalidArgument, "slotHostRange %q is not a CIDR", cfg.SlotHostRange)
	}
	mode := Mode(cfg.SlotMode)
	if cfg.SlotMode == "" || cfg.SlotMode == "auto" {
		rt := cfg.Runtime
		if rt == "" || rt == "auto" {
			rt = hostinfo.RuntimeFor(hostinfo.Probe{}.Kind())
		}
		mode = ModeNetns
		if rt == "microvm" {
			mode = ModeTap
		}
	}
	return NewManagerWith(Options{Prefix: cfg.SlotPrefix, HostRange: r, PoolSize: cfg.SlotPoolSize,
		Mode: mode, ConnRate: cfg.SlotConnRate, MaxConns: cfg.SlotMaxConns, DNSUpstream: cfg.SlotDNSUpstream}, log)
}

// NewManagerWith builds a Manager: it installs the host-side nftables table
// (NAT, isolation), records slots left by a previous run as orphans (see
// Adopt and ReapStale) and starts filling the pool.
func NewManagerWith(o Options, log *slog.Logger) (*Manager, error) {
	if !prefixRE.MatchString(o.Prefix) {
		return nil, errs.E(errs.InvalidArgument, "slot prefix %q: want 1-8 lower-case letters and digits, starting with a letter", o.Prefix)
	}
	if !o.HostRange.Addr().Is4() || o.HostRange.Bits() > 30 {
		return nil, errs.E(errs.InvalidArgument, "slot host range %s: want an IPv4 prefix of /30 or larger", o.HostRange)
	}
	o.HostRange = o.HostRange.Masked()
	if o.Mode != ModeTap && o.Mode != ModeNetns {
		return nil, errs.E(errs.InvalidArgument, "slot mode %q: want tap or netns", o.Mode)
	}
	if o.PoolSize < 0 || o.ConnRate < 0 || o.MaxConns < 0 {
		return nil, errs.E(errs.InvalidArgument, "slot pool size, connection rate and connection limit must not be negative")
	}
	if o.DNSUpstream == "" {
		o.DNSUpstream = defaultUpstream()
	}
	if os.Geteuid() != 0 {
		return nil, errs.E(errs.FailedPrecondition, "network slots need root (CAP_NET_ADMIN, CAP_SYS_ADMIN)")
	}
	m := &Manager{opts: o, log: log, used: map[int]bool{}, active: map[string]*slot{}, orphans: map[string]int{},
		refill: make(chan struct{}, 1), done: make(chan struct{})}
	if err := m.takeLock(); err != nil {
		return nil, err
	}
	if err := m.checkRange(); err != nil {
		m.releaseLock()
		return nil, err
	}
	if err := m.setupHost(); err != nil {
		m.releaseLock()
		return nil, err
	}
	m.scanOrphans()
	if n := len(m.orphans); n > 0 {
		log.Info("network: slots of a previous run found", "count", n)
	}
	grace := o.AdoptGrace
	if grace == 0 {
		grace = 2 * time.Minute
	}
	if grace > 0 {
		m.reaper = time.AfterFunc(grace, func() { m.ReapStale() })
	}
	m.wg.Add(1)
	go m.refiller()
	m.kick()
	return m, nil
}

const lockDir = "/run/cube"

// takeLock makes sure no other live process manages the same prefix (two
// managers would hand out, and reap, each other's slots).
func (m *Manager) takeLock() error {
	if err := os.MkdirAll(lockDir, 0o755); err != nil {
		return errs.Wrap(errs.Internal, err, "create %s", lockDir)
	}
	p := filepath.Join(lockDir, "net-"+m.opts.Prefix+".lock")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "open %s", p)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return errs.E(errs.FailedPrecondition, "network slot prefix %q is in use by another process (%s); set slotPrefix", m.opts.Prefix, p)
	}
	m.lock = f
	return nil
}

func (m *Manager) releaseLock() {
	if m.lock != nil {
		m.lock.Close()
		m.lock = nil
	}
}

// checkRange refuses a host range that overlaps addresses or routes of the
// host that are not ours.
func (m *Manager) checkRange() error {
	routes, err := netlink.RouteList(nil, unix.AF_INET)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "list routes")
	}
	for _, r := range routes {
		if r.Dst == nil {
			continue
		}
		l, err := netlink.LinkByIndex(r.LinkIndex)
		if err == nil && m.isOurHostLink(l.Attrs().Name) {
			continue
		}
		ones, _ := r.Dst.Mask.Size()
		a, _ := netip.AddrFromSlice(r.Dst.IP.To4())
		if ones == 0 {
			continue // default route
		}
		if netip.PrefixFrom(a, ones).Overlaps(m.opts.HostRange) {
			return errs.E(errs.FailedPrecondition, "slot host range %s overlaps the host route %s", m.opts.HostRange, r.Dst)
		}
	}
	return nil
}

var slotNameRE = regexp.MustCompile(`^([a-z][a-z0-9]*)([rgh])([0-9]+)$`)

func (m *Manager) parseName(name string) (kind byte, idx int, ok bool) {
	sm := slotNameRE.FindStringSubmatch(name)
	if sm == nil || sm[1] != m.opts.Prefix {
		return 0, 0, false
	}
	n, err := strconv.Atoi(sm[3])
	if err != nil || n >= m.maxSlots() {
		return 0, 0, false
	}
	return sm[2][0], n, true
}

func (m *Manager) isOurHostLink(name string) bool {
	k, _, ok := m.parseName(name)
	return ok && k == 'h'
}

func (m *Manager) maxSlots() int { return 1 << (32 - m.opts.HostRange.Bits() - 2) }

// hostAddrs returns the host's own IPv4 addresses.
func hostAddrs() []ipRange {
	addrs, err := netlink.AddrList(nil, unix.AF_INET)
	if err != nil {
		return nil
	}
	var rs []ipRange
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP.To4()); ok {
			rs = append(rs, prefixRange(netip.PrefixFrom(ip, 32)))
		}
	}
	return rs
}

func hostTableName(prefix string) string { return "cubehost_" + prefix }

// setupHost enables forwarding and installs the host table: masquerade of
// the slot range, no slot-to-slot and no slot-to-host traffic, nothing
// new towards a slot from outside.
func (m *Manager) setupHost() error {
	if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return errs.Wrap(errs.Internal, err, "enable IPv4 forwarding")
	}
	m.hard = mergeRanges(append(append(hostAddrs(), prefixRange(m.opts.HostRange)), func() []ipRange {
		var rs []ipRange
		for _, s := range alwaysDeny {
			rs = append(rs, mustRange(s))
		}
		return rs
	}()...))
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: hostTableName(m.opts.Prefix)}
	c.AddTable(t)
	c.DelTable(t)
	c.AddTable(t)
	accept := nftables.ChainPolicyAccept
	hp := []byte(m.opts.Prefix + "h") // prefix match on the interface name
	netw := m.opts.HostRange.Addr().As4()
	mask := net.CIDRMask(m.opts.HostRange.Bits(), 32)
	inRange := func(p *expr.Payload) []expr.Any {
		return []expr.Any{p, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: []byte{0, 0, 0, 0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: netw[:]}}
	}
	post := c.AddChain(&nftables.Chain{Name: "post", Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: post, Exprs: cat(ipv4(), inRange(saddr4()),
		metaNot(expr.MetaKeyOIFNAME, hp), one(&expr.Masq{}))})
	fwd := c.AddChain(&nftables.Chain{Name: "fwd", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, hp), metaIs(expr.MetaKeyOIFNAME, hp), dropCounted())})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, hp), ipv4(), inRange(daddr4()), dropCounted())})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(metaIs(expr.MetaKeyOIFNAME, hp),
		ctState(expr.CtStateBitESTABLISHED|expr.CtStateBitRELATED), verdict(expr.VerdictAccept))})
	c.AddRule(&nftables.Rule{Table: t, Chain: fwd, Exprs: cat(metaIs(expr.MetaKeyOIFNAME, hp), dropCounted())})
	in := c.AddChain(&nftables.Chain{Name: "in", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter, Policy: &accept})
	c.AddRule(&nftables.Rule{Table: t, Chain: in, Exprs: cat(metaIs(expr.MetaKeyIIFNAME, hp), dropCounted())})
	if err := c.Flush(); err != nil {
		return errs.Wrap(errs.Internal, err, "install host nftables table")
	}
	return nil
}

// scanOrphans records the slots a previous run left behind.
func (m *Manager) scanOrphans() {
	m.mu.Lock()
	defer m.mu.Unlock()
	add := func(idx int) {
		r, _, _ := m.names(idx)
		m.orphans[r] = idx
		m.used[idx] = true
	}
	if ents, err := os.ReadDir(netnsDir); err == nil {
		for _, e := range ents {
			if k, idx, ok := m.parseName(e.Name()); ok && k != 'h' {
				add(idx)
			}
		}
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			if k, idx, ok := m.parseName(l.Attrs().Name); ok && k == 'h' {
				add(idx)
			}
		}
	}
}

// Orphans lists the ids of slots left by a previous run, not yet adopted
// or reaped.
func (m *Manager) Orphans() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []string
	for id := range m.orphans {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// ReapStale removes every orphan slot not adopted. Call it after adopting
// the slots of the sandboxes that survived a restart.
func (m *Manager) ReapStale() int {
	m.mu.Lock()
	var ss []*slot
	for id, idx := range m.orphans {
		delete(m.orphans, id)
		ss = append(ss, m.newSlotStruct(idx))
	}
	m.mu.Unlock()
	for _, s := range ss {
		m.destroyKernel(s)
		m.mu.Lock()
		delete(m.used, s.idx)
		m.mu.Unlock()
	}
	if len(ss) > 0 {
		m.log.Info("network: removed stale slots", "count", len(ss))
	}
	return len(ss)
}

// Adopt takes over a slot of a previous run (a sandbox that survived a
// restart of cube): it re-installs its rules with policy p and restarts its
// DNS forwarder. Addresses learned from DNS are forgotten.
func (m *Manager) Adopt(ctx context.Context, ns runtime.NetSlot, p Policy) error {
	comp, err := compile(p)
	if err != nil {
		return err
	}
	m.mu.Lock()
	idx, ok := m.orphans[ns.ID]
	if ok {
		delete(m.orphans, ns.ID)
	}
	m.mu.Unlock()
	if !ok {
		return errs.E(errs.NotFound, "no stale network slot %q to adopt", ns.ID)
	}
	s := m.newSlotStruct(idx)
	if s.ns, err = netns.GetFromName(s.routerNS); err != nil {
		m.forget(s)
		return errs.Wrap(errs.NotFound, err, "network slot %q is gone", ns.ID)
	}
	// The slot keeps the mode it was built with, whatever the config says now.
	if h, herr := netlink.NewHandleAt(s.ns); herr == nil {
		if _, lerr := h.LinkByName(tapName); lerr == nil {
			s.mode, s.guestNS = ModeTap, ""
		} else {
			_, g, _ := m.names(idx)
			s.mode, s.guestNS = ModeNetns, g
		}
		h.Close()
	}
	s.comp, s.pol = comp, p
	c, err := s.nft()
	if err == nil {
		if err = buildSlotRules(c, s.guestIfName(), m.hard, comp, m.opts.ConnRate, m.opts.MaxConns); err == nil {
			err = c.Flush()
		}
	}
	if err == nil {
		s.dns, err = startDNS(s, m.opts.DNSUpstream, m.log)
	}
	if err != nil {
		m.destroyKernel(s)
		m.forget(s)
		return errs.Wrap(errs.Internal, err, "adopt network slot %s", ns.ID)
	}
	m.mu.Lock()
	m.active[s.id] = s
	m.mu.Unlock()
	return nil
}

func (m *Manager) forget(s *slot) {
	m.mu.Lock()
	delete(m.used, s.idx)
	m.mu.Unlock()
}

// Detach forgets an active slot without touching it (before a restart:
// the next process adopts it).
func (m *Manager) Detach(id string) error {
	m.mu.Lock()
	s, ok := m.active[id]
	delete(m.active, id)
	m.mu.Unlock()
	if !ok {
		return errs.E(errs.NotFound, "network slot %q not found", id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.released = true
	if s.dns != nil {
		s.dns.close()
		s.dns = nil
	}
	s.ns.Close()
	s.ns = -1
	return nil
}

func (m *Manager) kick() {
	select {
	case m.refill <- struct{}{}:
	default:
	}
}

func (m *Manager) allocIdx() (int, error) {
	for i := 0; i < m.maxSlots(); i++ {
		if !m.used[i] {
			m.used[i] = true
			return i, nil
		}
	}
	return 0, errs.E(errs.ResourceExhausted, "no free network slot in %s", m.opts.HostRange)
}

func (m *Manager) refiller() {
	defer m.wg.Done()
	for {
		select {
		case <-m.done:
			return
		case <-m.refill:
		}
		for {
			m.mu.Lock()
			if m.closed || len(m.pool) >= m.opts.PoolSize {
				m.mu.Unlock()
				break
			}
			idx, err := m.allocIdx()
			m.mu.Unlock()
			if err != nil {
				break
			}
			s, err := m.createSlot(idx)
			m.mu.Lock()
			if err != nil {
				delete(m.used, idx)
				m.mu.Unlock()
				m.log.Error("network: create slot", "err", err)
				select {
				case <-m.done:
					return
				case <-time.After(time.Second):
				}
				continue
			}
			if m.closed {
				m.mu.Unlock()
				m.destroyKernel(s)
				return
			}
			m.pool = append(m.pool, s)
			m.mu.Unlock()
		}
	}
}

// Acquire hands out a slot: from the pool, or created now if the pool is
// empty. Its policy is the default one (internet allowed, private ranges
// denied).
func (m *Manager) Acquire(ctx context.Context) (runtime.NetSlot, error) {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return runtime.NetSlot{}, errs.E(errs.Unavailable, "network manager is closed")
	}
	var s *slot
	if n := len(m.pool); n > 0 {
		s = m.pool[n-1]
		m.pool = m.pool[:n-1]
		m.active[s.id] = s
		m.mu.Unlock()
		m.kick()
		return s.netSlot(), nil
	}
	idx, err := m.allocIdx()
	m.mu.Unlock()
	if err != nil {
		return runtime.NetSlot{}, err
	}
	m.kick()
	if err := ctx.Err(); err != nil {
		m.forget(&slot{idx: idx})
		return runtime.NetSlot{}, err
	}
	s, err = m.createSlot(idx)
	if err != nil {
		m.forget(&slot{idx: idx})
		return runtime.NetSlot{}, errs.Wrap(errs.Internal, err, "create network slot")
	}
	m.mu.Lock()
	m.active[s.id] = s
	m.mu.Unlock()
	return s.netSlot(), nil
}

func (m *Manager) get(id string) (*slot, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.active[id]
	if !ok {
		return nil, errs.E(errs.NotFound, "network slot %q not found", id)
	}
	return s, nil
}

// lockActive returns slot id with its lock held, or NotFound when the
// slot is unknown or released.
func (m *Manager) lockActive(id string) (*slot, error) {
	s, err := m.get(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.released {
		s.mu.Unlock()
		return nil, errs.E(errs.NotFound, "network slot %q not found", id)
	}
	return s, nil
}

// ValidatePolicy checks p without applying it (InvalidArgument on bad input).
func ValidatePolicy(p Policy) error {
	_, err := compile(p)
	return err
}

// SetPolicy replaces the egress policy of an active slot in one nftables
// transaction. Rules match every packet, so established connections are
// affected from their next packet on. Bad input changes nothing.
func (m *Manager) SetPolicy(id string, p Policy) error {
	comp, err := compile(p)
	if err != nil {
		return err
	}
	s, err := m.lockActive(id)
	if err != nil {
		return err
	}
	defer s.mu.Unlock()
	return m.applyPolicy(s, p, comp)
}

func (m *Manager) applyPolicy(s *slot, p Policy, comp compiled) error {
	apply := func(keep []nftables.SetElement) error {
		c, err := s.nft()
		if err != nil {
			return errs.Wrap(errs.Internal, err, "nftables")
		}
		if err := updatePolicySets(c, comp, keep); err != nil {
			return errs.Wrap(errs.Internal, err, "nftables")
		}
		if err := c.Flush(); err != nil {
			return errs.Wrap(errs.Internal, err, "apply network policy")
		}
		return nil
	}
	var err error
	if s.dns != nil {
		err = s.dns.update(comp, apply)
	} else {
		err = apply(nil)
	}
	if err != nil {
		return err
	}
	s.pol, s.comp = p, comp
	return nil
}

// Policy returns the policy of an active slot.
func (m *Manager) Policy(id string) (Policy, error) {
	s, err := m.get(id)
	if err != nil {
		return Policy{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pol, nil
}

// Release takes a slot back. It is no longer usable when Release returns
// (Dial and SetPolicy report NotFound); the wipe (default policy,
// DNS-learned addresses, conntrack, guest-side configuration) runs in the
// background, after which the slot returns to the pool, or is destroyed if
// the pool is full or the wipe failed. Call it after the sandbox is gone.
func (m *Manager) Release(ctx context.Context, id string) error {
	m.mu.Lock()
	s, ok := m.active[id]
	delete(m.active, id)
	closed := m.closed
	if ok && !closed {
		m.wg.Add(1)
	}
	m.mu.Unlock()
	if !ok {
		return errs.E(errs.NotFound, "network slot %q not found", id)
	}
	s.mu.Lock()
	s.released = true
	s.mu.Unlock()
	if closed {
		m.destroyKernel(s)
		m.forget(s)
		return nil
	}
	go func() {
		defer m.wg.Done()
		m.recycle(s)
	}()
	return nil
}

func (m *Manager) recycle(s *slot) {
	s.mu.Lock()
	err := m.wipe(s)
	s.mu.Unlock()
	m.mu.Lock()
	if err == nil && !m.closed && len(m.pool) < m.opts.PoolSize {
		s.mu.Lock()
		s.released = false
		s.mu.Unlock()
		m.pool = append(m.pool, s)
		m.mu.Unlock()
		return
	}
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("network: wipe failed, destroying slot", "slot", s.id, "err", err)
	}
	m.destroyKernel(s)
	m.forget(s)
}

func (m *Manager) wipe(s *slot) error {
	def, _ := compile(Policy{})
	if s.dns != nil {
		s.dns.reset()
	}
	if err := m.applyPolicy(s, Policy{}, def); err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(s.ns, unix.NETLINK_NETFILTER)
	if err != nil {
		return err
	}
	err = h.ConntrackTableFlush(netlink.ConntrackTable)
	h.Close()
	if err != nil {
		return fmt.Errorf("flush conntrack: %w", err)
	}
	f := &netlink.ConntrackFilter{}
	if err := f.AddIP(netlink.ConntrackOrigSrcIP, s.routerIP.AsSlice()); err == nil {
		_, _ = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, f)
	}
	switch s.mode {
	case ModeNetns:
		g, err := netns.GetFromName(s.guestNS)
		if err != nil {
			return err
		}
		defer g.Close()
		return configureGuestNS(g)
	case ModeTap:
		rh, err := netlink.NewHandleAt(s.ns)
		if err != nil {
			return err
		}
		defer rh.Close()
		_, err = rh.LinkByName(tapName)
		return err
	}
	return nil
}

// PrepareGuest restores the guest side of an active netns-mode slot:
// runsc (--network=sandbox) takes eth0's address and routes over and does
// not give them back when it exits, so call this before starting another
// sandbox process in a slot that has been used (restore after pause, a
// second runsc). Release does it anyway. No-op in tap mode.
func (m *Manager) PrepareGuest(id string) error {
	s, err := m.lockActive(id)
	if err != nil {
		return err
	}
	defer s.mu.Unlock()
	if s.mode != ModeNetns {
		return nil
	}
	g, err := netns.GetFromName(s.guestNS)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "open guest namespace")
	}
	defer g.Close()
	if err := configureGuestNS(g); err != nil {
		return errs.Wrap(errs.Internal, err, "configure guest namespace")
	}
	return nil
}

// Dial connects to port on the guest of an active slot. The socket is
// created in the slot's router namespace (setns on a locked OS thread) and
// connects to GuestIP directly: no port of a sandbox is ever bound on the host.
func (m *Manager) Dial(ctx context.Context, id string, port int) (net.Conn, error) {
	if port < 1 || port > 65535 {
		return nil, errs.E(errs.InvalidArgument, "port %d out of range", port)
	}
	s, err := m.get(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	ns, err := s.ns, error(nil)
	if s.released || ns < 0 {
		err = errs.E(errs.NotFound, "network slot %q not found", id)
	} else if fd, derr := unix.FcntlInt(uintptr(s.ns), unix.F_DUPFD_CLOEXEC, 0); derr != nil {
		err = errs.Wrap(errs.Internal, derr, "open slot namespace")
	} else {
		ns = netns.NsHandle(fd)
	}
	s.mu.Unlock()
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	var c net.Conn
	var d net.Dialer
	addr := netip.AddrPortFrom(GuestIP, uint16(port)).String()
	err = inNS(ns, func() error {
		var derr error
		c, derr = d.DialContext(ctx, "tcp4", addr)
		return derr
	})
	if err != nil {
		return nil, errs.Wrap(errs.Unavailable, err, "connect to port %d of the sandbox", port)
	}
	return c, nil
}

// Close stops the pool and destroys idle slots. Active slots stay in place
// (their sandboxes keep running) so that the next process can Adopt them;
// their DNS forwarders stop until then. The prefix lock is released: a
// new Manager (in this process or another) can adopt them.
func (m *Manager) Close() error {
	err := m.shutdown()
	m.releaseLock()
	return err
}

// shutdown is Close keeping the prefix lock.
func (m *Manager) shutdown() error {
	m.mu.Lock()
	if m.closed {
		m.mu.Unlock()
		return nil
	}
	m.closed = true
	pool := m.pool
	m.pool = nil
	var act []*slot
	for _, s := range m.active {
		act = append(act, s)
	}
	m.mu.Unlock()
	close(m.done)
	m.wg.Wait()
	if m.reaper != nil {
		m.reaper.Stop()
	}
	for _, s := range pool {
		m.destroyKernel(s)
	}
	for _, s := range act {
		s.mu.Lock()
		if s.dns != nil {
			s.dns.close()
			s.dns = nil
		}
		s.mu.Unlock()
	}
	return nil
}

// Purge closes the manager and removes every slot, orphan and the host
// table of its prefix (tests, uninstall).
func (m *Manager) Purge() error {
	_ = m.shutdown()
	if m.lock == nil { // closed before: take the prefix back
		if err := m.takeLock(); err != nil {
			return err
		}
	}
	m.mu.Lock()
	act := m.active
	m.active = map[string]*slot{}
	m.mu.Unlock()
	for _, s := range act {
		s.mu.Lock()
		s.released = true
		m.destroyKernel(s)
		s.mu.Unlock()
	}
	m.scanOrphans()
	m.ReapStale()
	c, err := nftables.New()
	if err != nil {
		return err
	}
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: hostTableName(m.opts.Prefix)})
	err = c.Flush()
	if m.lock != nil {
		_ = os.Remove(m.lock.Name())
	}
	m.releaseLock()
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// Mode is the kind of slots this manager builds (tap for the microVM
// runtime, netns for gVisor).
func (m *Manager) Mode() Mode { return m.opts.Mode }

// Stats are counts for metrics and tests.
type Stats struct{ Pool, Active, Orphans int }

// Stats returns the current counts.
func (m *Manager) Stats() Stats {
	m.mu.Lock()
	defer m.mu.Unlock()
	return Stats{len(m.pool), len(m.active), len(m.orphans)}
}

// DropCounters returns packets dropped per chain of a slot (diagnostics).
func (m *Manager) DropCounters(id string) (map[string]uint64, error) {
	s, err := m.get(id)
	if err != nil {
		return nil, err
	}
	c, err := s.nft()
	if err != nil {
		return nil, err
	}
	return dropCounters(c)
}
