//go:build linux

package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"github.com/vishvananda/netns"

	"github.com/cubesandbox/cube/internal/network"
)

// benchSubs are the children of `cube bench`; a bench_<x>.go file adds
// its own with addBench from an init function.
var benchSubs []func() *cobra.Command

func addBench(f func() *cobra.Command) { benchSubs = append(benchSubs, f) }

func init() {
	addCommand(func() *cobra.Command {
		b := &cobra.Command{Use: "bench", Short: "Benchmarks of Cube's parts, each against a peer measured in the same run"}
		for _, f := range benchSubs {
			b.AddCommand(f())
		}
		return b
	})
	addBench(newBenchNet)
}

func newBenchNet() *cobra.Command {
	var (
		hostRange string
		slots     int
		requests  int
		conc      int
		dur       time.Duration
	)
	cmd := &cobra.Command{
		Use:   "net",
		Short: "Network slots: acquire from the pool vs cold creation; HTTP into a slot via Dial vs loopback",
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig()
			if err != nil {
				return err
			}
			log := newLogger(cfg)
			r, err := netip.ParsePrefix(hostRange)
			if err != nil || r.Bits() > 23 {
				return fmt.Errorf("--range %q: want an IPv4 prefix of /23 or larger", hostRange)
			}
			halfBits := r.Bits() + 1
			r1 := netip.PrefixFrom(r.Masked().Addr(), halfBits)
			b := r.Masked().Addr().As4()
			v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
			v += 1 << (32 - halfBits)
			r2 := netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), halfBits)
			prefix := "cb" + strconv.FormatInt(int64(os.Getpid()%1000000), 36)
			out := cmd.OutOrStdout()

			pool, err := network.NewManagerWith(network.Options{Prefix: prefix + "p", HostRange: r1, PoolSize: slots, Mode: network.ModeNetns}, log)
			if err != nil {
				return err
			}
			defer pool.Purge()
			cold, err := network.NewManagerWith(network.Options{Prefix: prefix + "c", HostRange: r2, PoolSize: 0, Mode: network.ModeNetns}, log)
			if err != nil {
				return err
			}
			defer cold.Purge()

			ctx := context.Background()
			var poolT, coldT, relT []time.Duration
			for round := 0; round < 3; round++ {
				for deadline := time.Now().Add(60 * time.Second); pool.Stats().Pool < slots; time.Sleep(5 * time.Millisecond) {
					if time.Now().After(deadline) {
						return fmt.Errorf("pool did not fill")
					}
				}
				var ids []string
				for i := 0; i < slots; i++ {
					t0 := time.Now()
					s, err := pool.Acquire(ctx)
					poolT = append(poolT, time.Since(t0))
					if err != nil {
						return err
					}
					ids = append(ids, s.ID)
				}
				for _, id := range ids {
					t0 := time.Now()
					if err := pool.Release(ctx, id); err != nil {
						return err
					}
					relT = append(relT, time.Since(t0))
				}
			}
			for i := 0; i < slots; i++ {
				t0 := time.Now()
				s, err := cold.Acquire(ctx)
				coldT = append(coldT, time.Since(t0))
				if err != nil {
					return err
				}
				_ = cold.Release(ctx, s.ID)
			}
			tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "slot acquire\tn\tp50\tp99\n")
			fmt.Fprintf(tw, "from pool\t%d\t%v\t%v\n", len(poolT), pct(poolT, 50), pct(poolT, 99))
			fmt.Fprintf(tw, "cold creation (peer)\t%d\t%v\t%v\n", len(coldT), pct(coldT, 50), pct(coldT, 99))
			fmt.Fprintf(tw, "release (returns; wipe runs behind)\t%d\t%v\t%v\n", len(relT), pct(relT, 50), pct(relT, 99))
			tw.Flush()
			fmt.Fprintf(out, "pool acquire is %.0fx faster than cold creation (p50)\n\n", float64(pct(coldT, 50))/float64(max(pct(poolT, 50), 1)))

			// HTTP into a server inside a slot, via Dial, vs loopback.
			s, err := pool.Acquire(ctx)
			if err != nil {
				return err
			}
			defer pool.Release(ctx, s.ID)

			// Policy updates: 10,000 entries vs one.
			big := make([]string, 0, network.MaxPolicyEntries)
			for i := 0; i < network.MaxPolicyEntries; i++ {
				big = append(big, fmt.Sprintf("203.%d.%d.%d", i/65536%256, i/256%256, i%256*7%256))
			}
			var oneT, bigT []time.Duration
			for i := 0; i < 10; i++ {
				for _, x := range []struct {
					p  network.Policy
					ts *[]time.Duration
				}{{network.Policy{DenyOut: []string{"203.0.113.1"}}, &oneT}, {network.Policy{DenyOut: big}, &bigT}} {
					t0 := time.Now()
					if err := pool.SetPolicy(s.ID, x.p); err != nil {
						return err
					}
					*x.ts = append(*x.ts, time.Since(t0))
				}
			}
			_ = pool.SetPolicy(s.ID, network.Policy{})
			tw = tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "SetPolicy\tn\tp50\tp99\n")
			fmt.Fprintf(tw, "10,000 denyOut entries\t%d\t%v\t%v\n", len(bigT), pct(bigT, 50), pct(bigT, 99))
			fmt.Fprintf(tw, "1 entry (peer)\t%d\t%v\t%v\n", len(oneT), pct(oneT, 50), pct(oneT, 99))
			tw.Flush()
			fmt.Fprintln(out)
			body := []byte("ok")
			h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) })
			gns, err := netns.GetFromPath(s.NetnsPath)
			if err != nil {
				return err
			}
			defer gns.Close()
			slotL, err := listenIn(gns, ":8080")
			if err != nil {
				return err
			}
			loopL, err := net.Listen("tcp4", "127.0.0.1:0")
			if err != nil {
				return err
			}
			srv := &http.Server{Handler: h}
			go srv.Serve(slotL)
			go srv.Serve(loopL)
			defer srv.Close()

			slotDial := func(ctx context.Context, _, _ string) (net.Conn, error) { return pool.Dial(ctx, s.ID, 8080) }
			loopDial := func(ctx context.Context, _, _ string) (net.Conn, error) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp4", loopL.Addr().String())
			}
			type row struct {
				name      string
				keepAlive bool
				dial      func(context.Context, string, string) (net.Conn, error)
			}
			rows := []row{
				{"slot via Dial, keep-alive", true, slotDial}, {"loopback (peer), keep-alive", true, loopDial},
				{"slot via Dial, new conn/request", false, slotDial}, {"loopback (peer), new conn/request", false, loopDial},
			}
			tw = tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
			fmt.Fprintf(tw, "HTTP GET\tp50\tp99\treq/s (%d clients, %v)\n", conc, dur)
			res := map[string][3]float64{}
			for _, r := range rows {
				lat, err := latency(r.dial, r.keepAlive, requests)
				if err != nil {
					return fmt.Errorf("%s: %w", r.name, err)
				}
				rps, err := throughput(r.dial, r.keepAlive, conc, dur)
				if err != nil {
					return fmt.Errorf("%s: %w", r.name, err)
				}
				res[r.name] = [3]float64{float64(pct(lat, 50)), float64(pct(lat, 99)), rps}
				fmt.Fprintf(tw, "%s\t%v\t%v\t%.0f\n", r.name, pct(lat, 50), pct(lat, 99), rps)
			}
			tw.Flush()
			for _, pair := range [][2]string{{rows[0].name, rows[1].name}, {rows[2].name, rows[3].name}} {
				a, p := res[pair[0]], res[pair[1]]
				fmt.Fprintf(out, "%s / loopback: p50 %.2fx, p99 %.2fx, throughput %.2fx\n", pair[0], a[0]/p[0], a[1]/p[1], a[2]/p[2])
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&hostRange, "range", "10.212.0.0/22", "host range for the benchmark's slots (split in two)")
	cmd.Flags().IntVar(&slots, "slots", 8, "slots per acquire round")
	cmd.Flags().IntVar(&requests, "requests", 2000, "sequential requests for latency")
	cmd.Flags().IntVar(&conc, "clients", 4, "concurrent clients for throughput")
	cmd.Flags().DurationVar(&dur, "duration", 2*time.Second, "throughput run length")
	return cmd
}

// listenIn opens a TCP listener inside namespace ns (the sandbox's server).
func listenIn(ns netns.NsHandle, addr string) (net.Listener, error) {
	type res struct {
		l   net.Listener
		err error
	}
	c := make(chan res, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			c <- res{nil, err}
			return
		}
		if err := netns.Set(ns); err != nil {
			c <- res{nil, err}
			return
		}
		l, err := net.Listen("tcp4", addr)
		if serr := netns.Set(orig); serr != nil {
			c <- res{l, err}
			return // thread stays locked and dies
		}
		runtime.UnlockOSThread()
		c <- res{l, err}
	}()
	r := <-c
	return r.l, r.err
}

func client(dial func(context.Context, string, string) (net.Conn, error), keepAlive bool) *http.Client {
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: dial,
		DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 64}}
}

func get(c *http.Client) error {
	r, err := c.Get("http://sandbox/")
	if err != nil {
		return err
	}
	_, err = io.Copy(io.Discard, r.Body)
	r.Body.Close()
	return err
}

func latency(dial func(context.Context, string, string) (net.Conn, error), keepAlive bool, n int) ([]time.Duration, error) {
	c := client(dial, keepAlive)
	defer c.CloseIdleConnections()
	if err := get(c); err != nil { // warm-up
		return nil, err
	}
	out := make([]time.Duration, 0, n)
	for i := 0; i < n; i++ {
		t0 := time.Now()
		if err := get(c); err != nil {
			return nil, err
		}
		out = append(out, time.Since(t0))
	}
	return out, nil
}

func throughput(dial func(context.Context, string, string) (net.Conn, error), keepAlive bool, conc int, d time.Duration) (float64, error) {
	c := client(dial, keepAlive)
	defer c.CloseIdleConnections()
	var n atomic.Int64
	var firstErr atomic.Value
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	t0 := time.Now()
	for i := 0; i < conc; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				if err := get(c); err != nil {
					firstErr.CompareAndSwap(nil, err)
					return
				}
				n.Add(1)
			}
		}()
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		return 0, e.(error)
	}
	return float64(n.Load()) / time.Since(t0).Seconds(), nil
}

func pct(ds []time.Duration, p int) time.Duration {
	return percentile(ds, p).Round(time.Microsecond)
}
