// Package network gives every sandbox a network slot: a router network
// namespace with a veth to the host, NAT for egress, a per-slot nftables
// policy and a DNS forwarder, plus the guest side the runtime attaches to
// (a tap device for the microVM runtime, or a guest network namespace with
// an eth0 for the gVisor runtime). Every slot uses the same guest-side
// addresses (GuestIP, GatewayIP, GuestMAC) so that snapshot clones need no
// re-addressing; slots differ only in their host-side /30 taken from
// config.Config.SlotHostRange.
//
// Slots are pre-created in a pool refilled in the background; Acquire hands
// one out, SetPolicy changes its egress policy at any time, Dial connects to
// a port of the guest from inside the slot (nothing listens on the host for
// a sandbox port), Release wipes it (rules, DNS-learned addresses,
// conntrack) and returns it to the pool. See docs/network.md.
package network

import "net/netip"

// Guest-side addresses, identical in every slot. 169.254.20.0/30 is
// link-local, so it cannot clash with a LAN, and it is never routed.
var (
	GuestIP    = netip.MustParseAddr("169.254.20.2")
	GatewayIP  = netip.MustParseAddr("169.254.20.1")
	PrefixLen  = 30
	GuestMAC   = "02:cb:5b:00:00:02"
	GatewayMAC = "02:cb:5b:00:00:01"
)

// Mode selects the guest side of the slots a Manager builds.
type Mode string

const (
	// ModeTap: a persistent tap device "tap0" in the router namespace,
	// addressed as the gateway; the microVM's virtio-net is the guest.
	// NetSlot.NetnsPath is the router namespace (open the tap there).
	ModeTap Mode = "tap"
	// ModeNetns: a guest namespace whose eth0 holds GuestIP and GuestMAC,
	// linked by a veth to the router namespace; runsc (or any process) runs
	// in it. NetSlot.NetnsPath is the guest namespace.
	ModeNetns Mode = "netns"
)

// Interface names inside the namespaces.
const (
	routerUplink = "vh"   // router side of the host veth
	tapName      = "tap0" // ModeTap guest interface (router ns)
	routerGuest  = "vg"   // ModeNetns router side of the guest veth
	guestIf      = "eth0" // ModeNetns guest interface (guest ns)
)
