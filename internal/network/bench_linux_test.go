//go:build linux

package network

import (
	"context"
	"net"
	"testing"
)

// BenchmarkDial: a TCP connection to a listener in a slot's guest via
// Dial, against the peer: a TCP connection to a loopback listener.
func BenchmarkDial(b *testing.B) {
	s := acquire(b, env.nsMgr)
	var l net.Listener
	if err := inNS(guestNS(b, s), func() error {
		var err error
		l, err = net.Listen("tcp4", ":4000")
		return err
	}); err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	lo, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer lo.Close()
	for _, x := range []net.Listener{l, lo} {
		go func(x net.Listener) {
			for {
				c, err := x.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}(x)
	}
	b.Run("slot", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			c, err := env.nsMgr.Dial(context.Background(), s.ID, 4000)
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
	b.Run("loopback", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			c, err := net.Dial("tcp4", lo.Addr().String())
			if err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
}

// BenchmarkSetPolicy10k applies a 10,000-entry policy.
func BenchmarkSetPolicy10k(b *testing.B) {
	s := acquire(b, env.nsMgr)
	p := Policy{DenyOut: big10k("203.255.255.255")}
	for i := 0; i < b.N; i++ {
		if err := env.nsMgr.SetPolicy(s.ID, p); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInNS is the cost of running a no-op in a slot's namespace.
func BenchmarkInNS(b *testing.B) {
	s := acquire(b, env.nsMgr)
	ns := guestNS(b, s)
	for i := 0; i < b.N; i++ {
		if err := inNS(ns, func() error { return nil }); err != nil {
			b.Fatal(err)
		}
	}
}
