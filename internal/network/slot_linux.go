//go:build linux

package network

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/runtime"
)

// slot is one pre-created network slot.
type slot struct {
	idx      int
	id       string // = router namespace name
	routerNS string
	guestNS  string // ModeNetns only
	hostLink string
	hostIP   netip.Addr // host end of the /30
	routerIP netip.Addr // router end (the guest's traffic leaves with it)
	mode     Mode
	ns       netns.NsHandle // router namespace

	mu       sync.Mutex // serialises policy changes, release and destroy
	pol      Policy
	comp     compiled
	dns      *dnsForwarder
	released bool
}

func (s *slot) guestIfName() string {
	if s.mode == ModeTap {
		return tapName
	}
	return routerGuest
}

func (s *slot) netSlot() runtime.NetSlot {
	ns := runtime.NetSlot{
		ID:              s.id,
		NetnsPath:       filepath.Join(netnsDir, s.routerNS),
		RouterNetnsPath: filepath.Join(netnsDir, s.routerNS),
		GuestIP:         GuestIP.String(),
		GatewayIP:       GatewayIP.String(),
		PrefixLen:       PrefixLen,
		GuestMAC:        GuestMAC,
		HostIP:          s.hostIP.String(),
		DNS:             GatewayIP.String(),
	}
	if s.mode == ModeTap {
		ns.Tap = tapName
	} else {
		ns.NetnsPath = filepath.Join(netnsDir, s.guestNS)
	}
	return ns
}

func (s *slot) nft() (*nftables.Conn, error) {
	return nftables.New(nftables.WithNetNSFd(int(s.ns)), bigBuffers())
}

// slotAddrs returns the host and router addresses of slot idx.
func slotAddrs(r netip.Prefix, idx int) (host, router netip.Addr) {
	b := r.Masked().Addr().As4()
	base := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	base += uint32(idx) * 4
	mk := func(v uint32) netip.Addr {
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	return mk(base + 1), mk(base + 2)
}

func (m *Manager) names(idx int) (router, guest, host string) {
	n := strconv.Itoa(idx)
	return m.opts.Prefix + "r" + n, m.opts.Prefix + "g" + n, m.opts.Prefix + "h" + n
}

func (m *Manager) newSlotStruct(idx int) *slot {
	r, g, h := m.names(idx)
	hip, rip := slotAddrs(m.opts.HostRange, idx)
	s := &slot{idx: idx, id: r, routerNS: r, hostLink: h, hostIP: hip, routerIP: rip, mode: m.opts.Mode, ns: -1}
	if m.opts.Mode == ModeNetns {
		s.guestNS = g
	}
	return s
}

// createSlot builds slot idx from nothing. On error it removes what it made.
func (m *Manager) createSlot(idx int) (s *slot, err error) {
	s = m.newSlotStruct(idx)
	defer func() {
		if err != nil {
			m.destroyKernel(s)
			s = nil
		}
	}()
	// Leftovers with our names (should not exist: stale cleanup ran).
	m.destroyKernel(s)

	if s.ns, err = newNamedNS(s.routerNS); err != nil {
		return s, fmt.Errorf("create netns %s: %w", s.routerNS, err)
	}
	var gns netns.NsHandle = -1
	if s.mode == ModeNetns {
		if gns, err = newNamedNS(s.guestNS); err != nil {
			return s, fmt.Errorf("create netns %s: %w", s.guestNS, err)
		}
		defer gns.Close()
	}
	// Host veth.
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: s.hostLink}, PeerName: routerUplink, PeerNamespace: netlink.NsFd(int(s.ns))}
	if err = netlink.LinkAdd(veth); err != nil {
		return s, fmt.Errorf("add veth %s: %w", s.hostLink, err)
	}
	hl, err := netlink.LinkByName(s.hostLink)
	if err != nil {
		return s, err
	}
	if err = netlink.AddrAdd(hl, &netlink.Addr{IPNet: ipnet(s.hostIP, 30)}); err != nil {
		return s, fmt.Errorf("address %s: %w", s.hostLink, err)
	}
	if err = netlink.LinkSetUp(hl); err != nil {
		return s, err
	}
	// Router namespace.
	if err = inNS(s.ns, func() error {
		if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
			return err
		}
		if err := disableIPv6(); err != nil {
			return err
		}
		if s.mode == ModeTap {
			return createTap(tapName)
		}
		return nil
	}); err != nil {
		return s, fmt.Errorf("router setup: %w", err)
	}
	h, err := netlink.NewHandleAt(s.ns)
	if err != nil {
		return s, err
	}
	defer h.Close()
	if err = linkUp(h, "lo"); err != nil {
		return s, err
	}
	up, err := h.LinkByName(routerUplink)
	if err != nil {
		return s, err
	}
	if err = h.AddrAdd(up, &netlink.Addr{IPNet: ipnet(s.routerIP, 30)}); err != nil {
		return s, err
	}
	if err = h.LinkSetUp(up); err != nil {
		return s, err
	}
	if err = h.RouteAdd(&netlink.Route{LinkIndex: up.Attrs().Index, Gw: s.hostIP.AsSlice()}); err != nil {
		return s, fmt.Errorf("default route: %w", err)
	}
	if s.mode == ModeNetns {
		v := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: routerGuest}, PeerName: guestIf, PeerNamespace: netlink.NsFd(int(gns))}
		if err = h.LinkAdd(v); err != nil {
			return s, fmt.Errorf("add guest veth: %w", err)
		}
	}
	gl, err := h.LinkByName(s.guestIfName())
	if err != nil {
		return s, err
	}
	gwMAC, _ := net.ParseMAC(GatewayMAC)
	gMAC, _ := net.ParseMAC(GuestMAC)
	if err = h.LinkSetHardwareAddr(gl, gwMAC); err != nil {
		return s, err
	}
	if err = h.AddrAdd(gl, &netlink.Addr{IPNet: ipnet(GatewayIP, PrefixLen)}); err != nil {
		return s, err
	}
	if err = h.LinkSetUp(gl); err != nil {
		return s, err
	}
	// The router never learns the guest's MAC from the guest.
	if err = h.NeighSet(&netlink.Neigh{LinkIndex: gl.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: GuestIP.AsSlice(), HardwareAddr: gMAC}); err != nil {
		return s, fmt.Errorf("guest neighbour: %w", err)
	}
	if s.mode == ModeNetns {
		if err = configureGuestNS(gns); err != nil {
			return s, err
		}
	}
	// Policy (default) and DNS forwarder.
	s.comp, _ = compile(Policy{})
	c, err := s.nft()
	if err != nil {
		return s, err
	}
	if err = buildSlotRules(c, s.guestIfName(), m.hard, s.comp, m.opts.ConnRate, m.opts.MaxConns); err != nil {
		return s, err
	}
	if err = c.Flush(); err != nil {
		return s, fmt.Errorf("nftables: %w", err)
	}
	if s.dns, err = startDNS(s, m.opts.DNSUpstream, m.log); err != nil {
		return s, fmt.Errorf("dns forwarder: %w", err)
	}
	return s, nil
}

// configureGuestNS (re)applies the guest side in a guest namespace: runsc
// removes eth0's address when it takes the interface over, so Release
// calls this again.
func configureGuestNS(gns netns.NsHandle) error {
	if err := inNS(gns, func() error {
		return disableIPv6()
	}); err != nil {
		return err
	}
	g, err := netlink.NewHandleAt(gns)
	if err != nil {
		return err
	}
	defer g.Close()
	if err := linkUp(g, "lo"); err != nil {
		return err
	}
	eth, err := g.LinkByName(guestIf)
	if err != nil {
		return err
	}
	gMAC, _ := net.ParseMAC(GuestMAC)
	gwMAC, _ := net.ParseMAC(GatewayMAC)
	if err := g.LinkSetHardwareAddr(eth, gMAC); err != nil {
		return err
	}
	if err := g.AddrReplace(eth, &netlink.Addr{IPNet: ipnet(GuestIP, PrefixLen)}); err != nil {
		return err
	}
	if err := g.LinkSetUp(eth); err != nil {
		return err
	}
	if err := g.NeighSet(&netlink.Neigh{LinkIndex: eth.Attrs().Index, State: netlink.NUD_PERMANENT,
		IP: GatewayIP.AsSlice(), HardwareAddr: gwMAC}); err != nil {
		return err
	}
	if err := g.RouteReplace(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: GatewayIP.AsSlice()}); err != nil {
		return fmt.Errorf("guest default route: %w", err)
	}
	return nil
}

// disableIPv6 turns IPv6 off in the current thread's namespace (slots are
// IPv4 only); a kernel without IPv6 is fine.
func disableIPv6() error {
	for _, p := range []string{"net/ipv6/conf/all/disable_ipv6", "net/ipv6/conf/default/disable_ipv6"} {
		if err := writeSysctl(p, "1"); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return nil
}

func linkUp(h *netlink.Handle, name string) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return err
	}
	return h.LinkSetUp(l)
}

func ipnet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(bits, 32)}
}

// createTap creates a persistent tap device in the current thread's
// namespace. The runtime re-opens it by name (TUNSETIFF) in that namespace.
func createTap(name string) error {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return err
	}
	ifr.SetUint16(unix.IFF_TAP | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		return fmt.Errorf("TUNSETIFF %s: %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETPERSIST, 1); err != nil {
		return fmt.Errorf("TUNSETPERSIST: %w", err)
	}
	return nil
}

// OpenTap opens the tap device of a tap-mode slot (what the microVM VMM
// does), returning a non-blocking-capable file in raw Ethernet mode
// (IFF_NO_PI). vnetHdr selects IFF_VNET_HDR.
func OpenTap(slot runtime.NetSlot, vnetHdr bool) (*os.File, error) {
	if slot.Tap == "" {
		return nil, errors.New("slot has no tap device (netns mode)")
	}
	ns, err := netns.GetFromPath(slot.NetnsPath)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	var f *os.File
	err = inNS(ns, func() error {
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			return err
		}
		ifr, err := unix.NewIfreq(slot.Tap)
		if err != nil {
			unix.Close(fd)
			return err
		}
		flags := uint16(unix.IFF_TAP | unix.IFF_NO_PI)
		if vnetHdr {
			flags |= unix.IFF_VNET_HDR
		}
		ifr.SetUint16(flags)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			return fmt.Errorf("TUNSETIFF %s: %w", slot.Tap, err)
		}
		f = os.NewFile(uintptr(fd), "/dev/net/tun:"+slot.Tap)
		return nil
	})
	if err != nil {
		return nil, err
	}
	// Attaching turns the carrier on; the kernel activates the device's
	// queue asynchronously (link watch) and drops what the router sends
	// until then. Wait for it so that the first guest packet gets an answer.
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		f.Close()
		return nil, err
	}
	defer h.Close()
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(time.Millisecond) {
		l, err := h.LinkByName(slot.Tap)
		if err == nil && l.Attrs().OperState == netlink.OperUp {
			break
		}
		if time.Now().After(deadline) {
			break // usable anyway; the first packets may be lost
		}
	}
	return f, nil
}

// destroyKernel removes everything slot s has in the kernel. Idempotent.
func (m *Manager) destroyKernel(s *slot) {
	if s.dns != nil {
		s.dns.close()
		s.dns = nil
	}
	if l, err := netlink.LinkByName(s.hostLink); err == nil {
		if err := netlink.LinkDel(l); err != nil {
			m.log.Warn("network: delete link", "link", s.hostLink, "err", err)
		}
	}
	if s.ns >= 0 {
		s.ns.Close()
		s.ns = -1
	}
	for _, n := range []string{s.routerNS, s.guestNS} {
		if n == "" {
			continue
		}
		if err := deleteNamedNS(n); err != nil {
			m.log.Warn("network: delete netns", "netns", n, "err", err)
		}
	}
	// Host conntrack entries of this slot's address.
	f := &netlink.ConntrackFilter{}
	if err := f.AddIP(netlink.ConntrackOrigSrcIP, s.routerIP.AsSlice()); err == nil {
		_, _ = netlink.ConntrackDeleteFilters(netlink.ConntrackTable, unix.AF_INET, f)
	}
}
