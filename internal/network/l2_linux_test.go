//go:build linux

package network

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// TestTapAttachment plays the microVM at layer 2 on a tap-mode slot: it
// opens the tap as the VMM would and exchanges Ethernet frames with the
// gateway (ARP, ICMP) and the internet (UDP through both NATs) with no
// guest booted.
func TestTapAttachment(t *testing.T) {
	s := acquire(t, env.tapMgr)
	if s.Tap == "" || s.NetnsPath != s.RouterNetnsPath {
		t.Fatalf("tap slot %+v", s)
	}
	f, err := OpenTap(s, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gmac, gwmac := mustMAC(GuestMAC), mustMAC(GatewayMAC)
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

	// ARP: who has the gateway?
	req := ethFrame(bcast, gmac, 0x0806, arpPacket(1, gmac, GuestIP, make(net.HardwareAddr, 6), GatewayIP))
	if _, err := f.Write(req); err != nil {
		t.Fatal(err)
	}
	isARPReply := func(b []byte) bool {
		return len(b) >= 42 && binary.BigEndian.Uint16(b[12:]) == 0x0806 && binary.BigEndian.Uint16(b[20:]) == 2
	}
	rep, ok := readFrame(f, 2*time.Second, isARPReply)
	if !ok {
		t.Fatal("no ARP reply from the gateway")
	}
	if !bytes.Equal(rep[22:28], gwmac) || !bytes.Equal(rep[28:32], ip4(GatewayIP)) || !bytes.Equal(rep[0:6], gmac) {
		t.Fatalf("ARP reply %x", rep)
	}

	// ICMP echo to the gateway.
	ping := ethFrame(gwmac, gmac, 0x0800, ipv4Packet(GuestIP, GatewayIP, unix.IPPROTO_ICMP, icmpEcho(0x77, 1, []byte("cube"))))
	if _, err := f.Write(ping); err != nil {
		t.Fatal(err)
	}
	isEchoReply := func(b []byte) bool {
		return len(b) >= 42 && binary.BigEndian.Uint16(b[12:]) == 0x0800 && b[23] == unix.IPPROTO_ICMP && b[34] == 0 &&
			binary.BigEndian.Uint16(b[38:]) == 0x77
	}
	if rep, ok = readFrame(f, 2*time.Second, isEchoReply); !ok {
		t.Fatal("no ICMP echo reply from the gateway")
	}
	if !bytes.Equal(rep[30:34], ip4(GuestIP)) || !bytes.Equal(rep[6:12], gwmac) {
		t.Fatalf("echo reply %x", rep)
	}

	// UDP to the internet leaves through the slot and the host NAT.
	if _, err := f.Write(guestUDP(gmac, GuestIP, env.inetA, "tap-ok")); err != nil {
		t.Fatal(err)
	}
	if !env.expectUDP("tap-ok", 2*time.Second) {
		t.Fatal("UDP from the tap did not reach the internet")
	}

	// Spoofing on the tap: other source addresses or MACs go nowhere.
	other := mustMAC("02:cb:5b:00:00:99")
	spoofs := map[string][]byte{
		"tap-spoof-ip":      guestUDP(gmac, netip.MustParseAddr("169.254.20.3"), env.inetA, "tap-spoof-ip"),
		"tap-spoof-slotip":  guestUDP(gmac, netip.MustParseAddr(s.HostIP).Next(), env.inetA, "tap-spoof-slotip"),
		"tap-spoof-mac":     guestUDP(other, GuestIP, env.inetA, "tap-spoof-mac"),
		"tap-spoof-gateway": guestUDP(gmac, GatewayIP, env.inetA, "tap-spoof-gateway"),
	}
	before := counter(t, env.tapMgr, s.ID, "cube/pre")
	for _, fr := range spoofs {
		if _, err := f.Write(fr); err != nil {
			t.Fatal(err)
		}
	}
	for msg := range spoofs {
		if env.expectUDP(msg, 300*time.Millisecond) {
			t.Errorf("%s reached the internet", msg)
		}
	}
	if after := counter(t, env.tapMgr, s.ID, "cube/pre"); after < before+uint64(len(spoofs)) {
		t.Errorf("anti-spoof counter %d -> %d", before, after)
	}

	// ARP spoofing: claiming another address (or MAC) gets no answer and
	// does not change the gateway's neighbour table.
	arpBefore := counter(t, env.tapMgr, s.ID, "cubearp/in")
	for _, fr := range [][]byte{
		ethFrame(bcast, gmac, 0x0806, arpPacket(1, gmac, netip.MustParseAddr("169.254.20.3"), make(net.HardwareAddr, 6), GatewayIP)),
		ethFrame(bcast, other, 0x0806, arpPacket(2, other, GuestIP, gwmac, GatewayIP)),
		ethFrame(bcast, gmac, 0x0806, arpPacket(2, other, GuestIP, gwmac, GatewayIP)),
	} {
		if _, err := f.Write(fr); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := readFrame(f, 300*time.Millisecond, isARPReply); ok {
		t.Error("gateway answered a spoofed ARP request")
	}
	if after := counter(t, env.tapMgr, s.ID, "cubearp/in"); after < arpBefore+3 {
		t.Errorf("ARP anti-spoof counter %d -> %d", arpBefore, after)
	}
	assertGuestNeighbour(t, s.RouterNetnsPath, tapName)
}

func assertGuestNeighbour(t *testing.T, nsPath, link string) {
	t.Helper()
	ns, err := netns.GetFromPath(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(link)
	if err != nil {
		t.Fatal(err)
	}
	neighs, err := h.NeighList(l.Attrs().Index, unix.AF_INET)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range neighs {
		if n.IP.Equal(GuestIP.AsSlice()) {
			if n.HardwareAddr.String() != GuestMAC || n.State != netlink.NUD_PERMANENT {
				t.Errorf("guest neighbour poisoned: %v %v", n.HardwareAddr, n.State)
			}
			return
		}
	}
	t.Error("guest neighbour entry missing")
}

// TestNetnsSpoofing plays a hostile gVisor-style guest: raw frames on its
// eth0 with forged source addresses.
func TestNetnsSpoofing(t *testing.T) {
	a := acquire(t, env.nsMgr)
	b := acquire(t, env.nsMgr)
	ns := guestNS(t, a)
	p := openPacketSocket(t, ns, guestIf)
	gmac := mustMAC(GuestMAC)
	if err := p.send(guestUDP(gmac, GuestIP, env.inetA, "ns-ok")); err != nil {
		t.Fatal(err)
	}
	if !env.expectUDP("ns-ok", 2*time.Second) {
		t.Fatal("raw UDP with the right addresses did not arrive")
	}
	other := mustMAC("02:cb:5b:00:00:99")
	spoofs := map[string][]byte{
		"ns-spoof-b-router": guestUDP(gmac, netip.MustParseAddr(b.HostIP).Next(), env.inetA, "ns-spoof-b-router"),
		"ns-spoof-b-host":   guestUDP(gmac, netip.MustParseAddr(b.HostIP), env.inetA, "ns-spoof-b-host"),
		"ns-spoof-mac":      guestUDP(other, GuestIP, env.inetA, "ns-spoof-mac"),
		"ns-spoof-inet":     guestUDP(gmac, env.inetB, env.inetA, "ns-spoof-inet"),
	}
	for _, fr := range spoofs {
		if err := p.send(fr); err != nil {
			t.Fatal(err)
		}
	}
	for msg := range spoofs {
		if env.expectUDP(msg, 300*time.Millisecond) {
			t.Errorf("%s reached the internet", msg)
		}
	}
	// ARP poisoning of the router.
	bcast := net.HardwareAddr{0xff, 0xff, 0xff, 0xff, 0xff, 0xff}
	for _, fr := range [][]byte{
		ethFrame(bcast, other, 0x0806, arpPacket(2, other, GuestIP, mustMAC(GatewayMAC), GatewayIP)),
		ethFrame(bcast, gmac, 0x0806, arpPacket(1, gmac, netip.MustParseAddr(b.HostIP), make(net.HardwareAddr, 6), GatewayIP)),
	} {
		if err := p.send(fr); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(100 * time.Millisecond)
	assertGuestNeighbour(t, a.RouterNetnsPath, routerGuest)
	if c := counter(t, env.nsMgr, a.ID, "cubearp/in"); c < 2 {
		t.Errorf("ARP anti-spoof counter %d", c)
	}
}

// TestTapVnetHdr opens the tap the way the microVM's virtio-net device
// uses it (IFF_VNET_HDR, the fd handed to the VMM): frames carry a 10-byte
// virtio_net_hdr.
func TestTapVnetHdr(t *testing.T) {
	s := acquire(t, env.tapMgr)
	f, err := OpenTap(s, true)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	gmac := mustMAC(GuestMAC)
	const hdr = 10
	ping := ethFrame(mustMAC(GatewayMAC), gmac, 0x0800, ipv4Packet(GuestIP, GatewayIP, unix.IPPROTO_ICMP, icmpEcho(0x78, 1, []byte("vnet"))))
	if _, err := f.Write(append(make([]byte, hdr), ping...)); err != nil {
		t.Fatal(err)
	}
	_, ok := readFrame(f, 2*time.Second, func(b []byte) bool {
		if len(b) < hdr+42 {
			return false
		}
		e := b[hdr:]
		return binary.BigEndian.Uint16(e[12:]) == 0x0800 && e[23] == unix.IPPROTO_ICMP && e[34] == 0 && binary.BigEndian.Uint16(e[38:]) == 0x78
	})
	if !ok {
		t.Fatal("no echo reply through a vnet-header tap")
	}
}

// TestTapDial: Dial into a tap-mode slot. The test answers the SYN on the
// tap with a SYN-ACK as a guest TCP stack would, so the connection from
// the router namespace completes: the proxy path to a microVM works
// without a guest.
func TestTapDial(t *testing.T) {
	s := acquire(t, env.tapMgr)
	f, err := OpenTap(s, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	type res struct {
		err error
	}
	done := make(chan res, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := env.tapMgr.Dial(ctx, s.ID, 49983)
		if err == nil {
			c.Close()
		}
		done <- res{err}
	}()
	syn, ok := readFrame(f, 3*time.Second, func(b []byte) bool {
		return len(b) >= 54 && binary.BigEndian.Uint16(b[12:]) == 0x0800 && b[23] == unix.IPPROTO_TCP &&
			bytes.Equal(b[30:34], ip4(GuestIP)) && binary.BigEndian.Uint16(b[36:]) == 49983 && b[47]&0x02 != 0
	})
	if !ok {
		t.Fatal("no SYN from Dial on the tap")
	}
	if !bytes.Equal(syn[0:6], mustMAC(GuestMAC)) || !bytes.Equal(syn[26:30], ip4(GatewayIP)) {
		t.Fatalf("SYN %x", syn[:34])
	}
	ihl := int(syn[14]&0x0f) * 4
	tcp := syn[14+ihl:]
	sport := binary.BigEndian.Uint16(tcp[0:])
	seq := binary.BigEndian.Uint32(tcp[4:])
	// SYN-ACK from the "guest".
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], 49983)
	binary.BigEndian.PutUint16(h[2:], sport)
	binary.BigEndian.PutUint32(h[4:], 1000)
	binary.BigEndian.PutUint32(h[8:], seq+1)
	h[12] = 5 << 4
	h[13] = 0x12 // SYN|ACK
	binary.BigEndian.PutUint16(h[14:], 65535)
	pseudo := append(append(append([]byte{}, ip4(GuestIP)...), ip4(GatewayIP)...), 0, unix.IPPROTO_TCP, 0, 20)
	binary.BigEndian.PutUint16(h[16:], csum(append(pseudo, h...)))
	if _, err := f.Write(ethFrame(mustMAC(GatewayMAC), mustMAC(GuestMAC), 0x0800, ipv4Packet(GuestIP, GatewayIP, unix.IPPROTO_TCP, h))); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil {
		t.Fatalf("Dial into the tap slot: %v", r.err)
	}
}
