//go:build linux

package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/vmm/synth"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

func init() { addBench(newBenchVMM) }

func newBenchVMM() *cobra.Command {
	var (
		runs             int
		memMiB           int
		crunHelperBundle string
		noCrun           bool
		agent            agentBench
	)
	cmd := &cobra.Command{
		Use:   "vmm",
		Short: "VMM process start to first guest instruction (synthetic guest) vs `crun run /bin/true`",
		Long: `Starts 'cube vmm' with a synthetic guest whose first instructions write to
the serial port, and times process start to that byte reaching the host,
plain and jailed (namespaces, cgroup, seccomp). The peer, measured in the
same run, is 'crun run /bin/true' (busybox-static rootfs, private mount
namespace with cgroup2 mounted, --cgroup-manager=disabled).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if crunHelperBundle != "" {
				return crunHelper(cmd.OutOrStdout(), crunHelperBundle, runs, 1)
			}
			return benchVMM(cmd.Context(), cmd.OutOrStdout(), runs, memMiB, noCrun, agent)
		},
	}
	cmd.Flags().IntVar(&runs, "runs", 30, "iterations per variant")
	cmd.Flags().IntVar(&memMiB, "mem", 256, "guest RAM in MiB")
	cmd.Flags().BoolVar(&noCrun, "no-crun", false, "skip the crun peer")
	cmd.Flags().StringVar(&crunHelperBundle, "crun-helper", "", "internal: run crun in this bundle (in a private mount namespace)")
	cmd.Flags().StringVar(&agent.kernel, "agent-kernel", "", "boot-to-agent-ready: guest kernel (needs hardware KVM)")
	cmd.Flags().StringVar(&agent.rootfs, "agent-rootfs", "", "boot-to-agent-ready: root disk image with cube-agent (used read-only with a throwaway overlay)")
	cmd.Flags().StringVar(&agent.cmdline, "agent-cmdline", "console=ttyS0 reboot=k panic=-1 quiet root=/dev/vda rw init=/sbin/cube-agent", "boot-to-agent-ready: kernel command line")
	cmd.Flags().IntVar(&agent.port, "agent-port", 49983, "boot-to-agent-ready: agent port over vsock")
	_ = cmd.Flags().MarkHidden("crun-helper")
	return cmd
}

type benchStats struct {
	name    string
	samples []time.Duration
	err     error
}

// pct is the nearest-rank percentile p (0..100) of the samples.
func (s *benchStats) pct(p int) time.Duration { return percentile(s.samples, p) }

func ms(d time.Duration) string { return strconv.FormatFloat(float64(d)/1e6, 'f', 2, 64) }

// vmmFirstByte starts one VMM and returns the time from exec to the
// guest's first serial byte.
func vmmFirstByte(ctx context.Context, bin, kernel, dir string, memMiB int, jailed bool, i int) (time.Duration, error) {
	o := vmmapi.Options{Kernel: kernel, KernelFormat: "raw", MemMiB: memMiB, VCPUs: 1, SerialLog: "-"}
	if jailed {
		pr, pw, err := os.Pipe()
		if err != nil {
			return 0, err
		}
		defer pr.Close()
		start := time.Now()
		p, err := vmmapi.Launch(ctx, vmmapi.LaunchConfig{
			Binary: bin, Options: o, Socket: filepath.Join(dir, fmt.Sprintf("j%d.sock", i)),
			Isolate: true, Cgroup: fmt.Sprintf("bench-%d-%d", os.Getpid(), i), Stdout: pw,
		})
		pw.Close()
		if err != nil {
			return 0, err
		}
		defer p.Kill()
		var b [1]byte
		if _, err := io.ReadFull(pr, b[:]); err != nil {
			return 0, fmt.Errorf("no guest output: %w", err)
		}
		return time.Since(start), nil
	}
	c := exec.Command(bin, append([]string{"vmm"}, o.Args()...)...)
	c.Env = append(os.Environ(), "GODEBUG=updatemaxprocs=0")
	out, err := c.StdoutPipe()
	if err != nil {
		return 0, err
	}
	start := time.Now()
	if err := c.Start(); err != nil {
		return 0, err
	}
	defer func() {
		c.Process.Signal(syscall.SIGTERM)
		c.Wait()
	}()
	var b [1]byte
	if _, err := io.ReadFull(out, b[:]); err != nil {
		return 0, fmt.Errorf("no guest output: %w", err)
	}
	return time.Since(start), nil
}

func benchVMM(ctx context.Context, w io.Writer, runs, memMiB int, noCrun bool, agent agentBench) error {
	if runs < 1 {
		return errs.E(errs.InvalidArgument, "--runs must be positive")
	}
	bin, err := os.Executable()
	if err != nil {
		return errs.Wrap(errs.Internal, err, "executable")
	}
	dir, err := os.MkdirTemp("", "cube-bench-vmm-")
	if err != nil {
		return errs.Wrap(errs.Internal, err, "temp dir")
	}
	defer os.RemoveAll(dir)
	kernel := filepath.Join(dir, "guest.bin")
	if err := os.WriteFile(kernel, synth.Hello("!"), 0o644); err != nil {
		return errs.Wrap(errs.Internal, err, "guest")
	}
	plain := &benchStats{name: "cube vmm: exec -> first guest serial byte"}
	jailed := &benchStats{name: "cube vmm jailed (netns+mntns+cgroup+seccomp)"}
	crun := &benchStats{name: "crun run /bin/true (peer)"}
	// Interleave variants so drift on the shared machine hits all alike.
	crunBundle := filepath.Join(dir, "bundle")
	if !noCrun {
		crun.err = makeCrunBundle(crunBundle)
	}
	for i := 0; i < runs; i++ {
		for _, v := range []*benchStats{plain, jailed} {
			if v.err != nil {
				continue
			}
			d, err := vmmFirstByte(ctx, bin, kernel, dir, memMiB, v == jailed, i)
			if err != nil {
				v.err = err
				continue
			}
			v.samples = append(v.samples, d)
		}
	}
	if !noCrun && crun.err == nil {
		crun.samples, crun.err = runCrunHelper("bench", "vmm", "--crun-helper", crunBundle, "--runs", strconv.Itoa(runs))
	}
	var ready *benchStats
	if agent.kernel != "" {
		ready = &benchStats{name: "cube vmm: exec -> agent /health over vsock (Linux boot)"}
		if kind := hostKVMKind(); strings.HasPrefix(kind, "KVM-PVM") {
			ready.err = fmt.Errorf("skipped: no stock Linux boots on KVM-PVM")
		}
		for i := 0; i < min(runs, 10) && ready.err == nil; i++ {
			d, err := agent.run(ctx, bin, dir, memMiB, i)
			if err != nil {
				ready.err = err
				break
			}
			ready.samples = append(ready.samples, d)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "variant\truns\tp50 ms\tp99 ms\tmin ms\tp50 vs crun\n")
	base := crun.pct(50)
	all := []*benchStats{plain, jailed, crun}
	if ready != nil {
		all = append(all, ready)
	}
	for _, s := range all {
		if s.err != nil {
			fmt.Fprintf(tw, "%s\terror: %v\n", s.name, s.err)
			continue
		}
		if noCrun && s == crun {
			continue
		}
		ratio := "-"
		if base > 0 {
			ratio = strconv.FormatFloat(float64(s.pct(50))/float64(base), 'f', 2, 64) + "x"
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%s\n", s.name, len(s.samples), ms(s.pct(50)), ms(s.pct(99)), ms(s.pct(0)), ratio)
	}
	tw.Flush()
	fmt.Fprintf(w, "guest RAM %d MiB, 1 vCPU; host /dev/kvm %s\n", memMiB, hostKVMKind())
	return nil
}

func hostKVMKind() string {
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return "KVM-PVM (guest kernel mode emulated)"
	}
	for _, m := range []string{"kvm_intel", "kvm_amd"} {
		if _, err := os.Stat("/sys/module/" + m); err == nil {
			return m
		}
	}
	return "unknown"
}

// agentBench boots a real guest with cube-agent as init and times exec
// to the agent answering GET /health through the vsock bridge.
type agentBench struct {
	kernel, rootfs, cmdline string
	port                    int
}

func (a agentBench) run(ctx context.Context, bin, dir string, memMiB, i int) (time.Duration, error) {
	if a.rootfs == "" {
		return 0, fmt.Errorf("--agent-rootfs is required with --agent-kernel")
	}
	uds := filepath.Join(dir, fmt.Sprintf("vsock%d.sock", i))
	overlay := filepath.Join(dir, fmt.Sprintf("overlay%d.cow", i))
	defer os.Remove(overlay)
	o := vmmapi.Options{Kernel: a.kernel, MemMiB: memMiB, VCPUs: 1, Cmdline: a.cmdline, VsockUDS: uds, VsockCID: 3,
		Disks: []vmmapi.Disk{{Base: a.rootfs, Overlay: overlay}}}
	c := exec.Command(bin, append([]string{"vmm"}, o.Args()...)...)
	c.Env = append(os.Environ(), "GODEBUG=updatemaxprocs=0")
	start := time.Now()
	if err := c.Start(); err != nil {
		return 0, err
	}
	exited := make(chan error, 1)
	go func() { exited <- c.Wait() }()
	defer func() {
		c.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			c.Process.Kill()
			<-exited
		}
	}()
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			conn, err := d.DialContext(ctx, "unix", uds)
			if err != nil {
				return nil, err
			}
			fmt.Fprintf(conn, "CONNECT %d\n", a.port)
			line, err := bufio.NewReader(io.LimitReader(conn, 64)).ReadString('\n')
			if err != nil || !strings.HasPrefix(line, "OK ") {
				conn.Close()
				return nil, fmt.Errorf("vsock bridge: %q %v", line, err)
			}
			return conn, nil
		},
	}}
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			exited <- err
			return 0, fmt.Errorf("vmm exited before the agent answered: %v", err)
		default:
		}
		resp, err := hc.Get("http://agent/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode < 300 {
				return time.Since(start), nil
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return 0, fmt.Errorf("agent not ready after 2 minutes")
}
