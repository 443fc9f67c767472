//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/kvm"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
)

func init() { addBench(newBenchRestore) }

func newBenchRestore() *cobra.Command {
	var (
		n                int
		concList         string
		noCrun           bool
		crunHelperBundle string
		crunConc         int
	)
	cmd := &cobra.Command{
		Use:   "restore",
		Short: "Snapshot restore-to-running latency and memory per idle clone (synthetic guest) vs crun run /bin/true",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if crunHelperBundle != "" {
				return crunHelper(cmd.OutOrStdout(), crunHelperBundle, n, crunConc)
			}
			var concs []int
			for _, f := range strings.Split(concList, ",") {
				c, err := strconv.Atoi(strings.TrimSpace(f))
				if err != nil || c < 1 {
					return fmt.Errorf("-c %q: want a comma-separated list of positive integers", concList)
				}
				concs = append(concs, c)
			}
			if n < 1 {
				return fmt.Errorf("-n must be positive")
			}
			return runBenchRestore(cmd.OutOrStdout(), n, concs, !noCrun)
		},
	}
	cmd.Flags().IntVarP(&n, "n", "n", 100, "clones (and crun runs) per concurrency level")
	cmd.Flags().StringVarP(&concList, "c", "c", "1,10", "concurrency levels")
	cmd.Flags().BoolVar(&noCrun, "no-crun", false, "skip the crun peer")
	cmd.Flags().StringVar(&crunHelperBundle, "crun-helper", "", "internal: run crun in this bundle (inside a private mount namespace)")
	cmd.Flags().IntVar(&crunConc, "crun-c", 1, "internal: crun helper concurrency")
	_ = cmd.Flags().MarkHidden("crun-helper")
	_ = cmd.Flags().MarkHidden("crun-c")
	return cmd
}

type latencies []time.Duration

// pct is the sample at index n*p/100 of the n samples sorted.
func (l latencies) pct(p int) time.Duration {
	return sampleAt(l, func(n int) int { return n * p / 100 })
}

func msStr(d time.Duration) string { return fmt.Sprintf("%.2f ms", float64(d.Microseconds())/1000) }

// parallel runs f(0..n-1) on c workers.
func parallel(n, c int, f func(i int) error) error {
	var mu sync.Mutex
	var first error
	next := 0
	var wg sync.WaitGroup
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				stop := first != nil
				mu.Unlock()
				if i >= n || stop {
					return
				}
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	return first
}

type vmmProc struct {
	cmd *exec.Cmd // plain: the VMM
	pid int       // the VMM
	sup *vmmapi.Supervised
	cl  *vmmapi.Client
}

// startVMM starts a pre-started VMM; jailed, as the microVM runtime
// does: `vmm-restore --jail` (namespaces, cgroup, seccomp), whose
// launcher exits once the VMM serves; the VMM is this process's child
// (CLONE_PARENT) and supervised here.
func startVMM(dir string, i int, prepare string, jailed, fullCube bool) (*vmmProc, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	sock := filepath.Join(dir, fmt.Sprintf("vmm-%d-%d.sock", i, time.Now().UnixNano()))
	args := []string{"vmm-restore", "--api-socket", sock}
	if prepare != "" {
		args = append(args, "--prepare", prepare)
	}
	cgName := fmt.Sprintf("bench-%d-%d-%d", os.Getpid(), i, time.Now().UnixNano()%1e9)
	if jailed {
		args = append(args, "--jail", "--cgroup", cgName)
	} else {
		args = append(args, "--no-seccomp")
	}
	bin := self // jailed: the launcher, which executes vmmBinary
	if !jailed && !fullCube {
		bin = vmmBinary("")
	}
	c := exec.Command(bin, args...)
	c.Stderr = os.Stderr
	if !jailed {
		c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	}
	var out strings.Builder
	c.Stdout = &out
	if err := c.Start(); err != nil {
		return nil, err
	}
	p := &vmmProc{cmd: c, pid: c.Process.Pid, cl: vmmapi.NewClient(sock)}
	if jailed {
		if err := c.Wait(); err != nil {
			return nil, fmt.Errorf("jailed vmm %d: launcher: %v", i, err)
		}
		var o struct{ PID int }
		if err := json.Unmarshal([]byte(out.String()), &o); err != nil || o.PID <= 0 {
			return nil, fmt.Errorf("jailed vmm %d: launcher printed %q", i, out.String())
		}
		cg, _ := jail.OpenCgroup(cgName)
		if p.sup, err = vmmapi.Supervise(o.PID, cg, sock); err != nil {
			syscall.Kill(o.PID, syscall.SIGKILL)
			return nil, err
		}
		p.cmd, p.pid = nil, o.PID
	}
	// Ready when the socket accepts.
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.Dial("unix", sock)
		if err == nil {
			conn.Close()
			break
		}
		if time.Now().After(deadline) {
			p.kill()
			return nil, fmt.Errorf("vmm %d did not come up: %v", i, err)
		}
		time.Sleep(200 * time.Microsecond)
	}
	if prepare != "" {
		// A pool keeps its control connection open: warm it.
		if _, err := p.cl.Status(context.Background()); err != nil {
			p.stop()
			return nil, err
		}
	}
	return p, nil
}

func (p *vmmProc) kill() {
	if p.sup != nil {
		p.sup.Kill(10 * time.Second)
		return
	}
	p.cmd.Process.Kill()
	p.cmd.Wait()
}

func (p *vmmProc) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	p.cl.Stop(ctx)
	if p.sup != nil {
		if !p.sup.WaitFor(3 * time.Second) {
			p.sup.Kill(10 * time.Second)
		}
		return
	}
	done := make(chan struct{})
	go func() { p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		p.cmd.Process.Kill()
		<-done
	}
}

type restoreRow struct {
	c                      int
	path                   string
	lat                    latencies
	inVMM                  latencies
	pssAvg, rssAvg, pssSum uint64
	anonAvg, fileAvg       uint64
}

func runBenchRestore(out io.Writer, n int, concs []int, crun bool) error {
	if !kvm.Available() {
		return fmt.Errorf("bench restore needs /dev/kvm")
	}
	work, err := os.MkdirTemp("", "cube-bench-restore-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	snap := filepath.Join(work, "snap")
	m, err := st.Boot(st.Spec())
	if err != nil {
		return err
	}
	if err := st.RunToPhase1(m); err != nil {
		m.VM.Close()
		return err
	}
	t0 := time.Now()
	if _, err := snapshot.Take(m.VM, snap, snapshot.Options{}); err != nil {
		m.VM.Close()
		return err
	}
	takeDur := time.Since(t0)
	m.VM.Close()
	stFI, _ := os.Stat(filepath.Join(snap, snapshot.StateFile))
	memFI, _ := os.Stat(filepath.Join(snap, snapshot.MemoryFile))
	var memAlloc int64
	if s, ok := memFI.Sys().(*syscall.Stat_t); ok {
		memAlloc = s.Blocks * 512
	}
	fmt.Fprintf(out, "synthetic guest: %d MiB RAM, 1 vCPU, virtio-rng with a request in flight; snapshot taken in %s: state file %d bytes, memory file %.1f MiB allocated\n",
		st.MemSize>>20, msStr(takeDur), stFI.Size(), float64(memAlloc)/(1<<20))

	// Jailed VMMs (the microVM runtime's default) need root and cgroups;
	// their launchers exit once the VMM serves, and the VMM (created as
	// this process's child: CLONE_PARENT) is supervised here.
	jailOK := os.Geteuid() == 0 && jail.CgroupsAvailable() == nil
	if !jailOK {
		fmt.Fprintln(out, "jailed row skipped: needs root and cgroups")
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	fmt.Fprintf(out, "VMM executable (jailed and not): %s\n", vmmBinary(""))
	var rows []restoreRow
	ctx := context.Background()
	for _, c := range concs {
		for _, mode := range []string{"prepared", "jailed", "cube", "pre-started", "cold"} {
			row := restoreRow{c: c}
			procs := make([]*vmmProc, n)
			prepare := ""
			jailed := mode == "jailed"
			if jailed && !jailOK || mode == "cube" && vmmBinary("") == self {
				continue
			}
			switch mode {
			case "prepared":
				row.path = "pre-started VMM, restore prepared (request -> running)"
				prepare = snap
			case "jailed":
				row.path = "pre-started jailed VMM (runtime default: --jail, seccomp; launcher exited), restore prepared"
				prepare = snap
			case "cube":
				row.path = "pre-started VMM running the whole cube binary (not cube-vmm), restore prepared"
				prepare = snap
			case "pre-started":
				row.path = "pre-started VMM, not prepared (request -> running)"
			case "cold":
				row.path = "cold: fork/exec VMM + restore (exec -> running)"
			}
			if mode != "cold" {
				if err := parallel(n, 4, func(i int) error {
					p, err := startVMM(work, i, prepare, jailed, mode == "cube")
					procs[i] = p
					return err
				}); err != nil {
					stopAll(procs)
					return err
				}
			}
			var mu sync.Mutex
			err := parallel(n, c, func(i int) error {
				t0 := time.Now()
				if mode == "cold" {
					p, err := startVMM(work, i, "", false, false)
					if err != nil {
						return err
					}
					procs[i] = p
				}
				rep, err := procs[i].cl.Restore(ctx, vmmapi.RestoreRequest{Dir: snap, WaitWord: st.Counter})
				d := time.Since(t0)
				if err != nil {
					return err
				}
				// Idle the clone (a spinning synthetic guest would burn a core).
				if _, err := procs[i].cl.Pause(ctx); err != nil {
					return err
				}
				mu.Lock()
				row.lat = append(row.lat, d)
				row.inVMM = append(row.inVMM, time.Duration(rep.RestoreMillis*float64(time.Millisecond)))
				mu.Unlock()
				return nil
			})
			if err == nil && prepare != "" {
				for _, p := range procs {
					mm, err := st.ReadMem(p.pid)
					if err != nil {
						continue
					}
					row.pssSum += mm.PSS
					row.rssAvg += mm.RSS / uint64(n)
					row.anonAvg += mm.PSSAnon / uint64(n)
					row.fileAvg += mm.PSSFile / uint64(n)
				}
				row.pssAvg = row.pssSum / uint64(n)
			}
			stopAll(procs)
			if err != nil {
				return err
			}
			rows = append(rows, row)
		}
		if crun {
			lat, err := runCrun(work, n, c)
			if err != nil {
				fmt.Fprintf(out, "crun peer failed: %v\n", err)
			} else {
				rows = append(rows, restoreRow{c: c, path: "crun run /bin/true (busybox-static rootfs)", lat: lat})
			}
		}
	}
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "c\tpath\tn\tp50\tp99\tin-VMM p50\tPSS/idle clone\n")
	var crunP50, prepP50 = map[int]time.Duration{}, map[int]time.Duration{}
	for _, r := range rows {
		inv, pss := "-", "-"
		if len(r.inVMM) > 0 {
			inv = msStr(r.inVMM.pct(50))
		}
		if r.pssAvg > 0 {
			pss = fmt.Sprintf("%.2f MiB (anon %.2f, file %.2f; RSS %.1f; sum of %d: %.0f MiB)", mib(r.pssAvg), mib(r.anonAvg), mib(r.fileAvg), mib(r.rssAvg), n, mib(r.pssSum))
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%s\t%s\t%s\t%s\n", r.c, r.path, len(r.lat), msStr(r.lat.pct(50)), msStr(r.lat.pct(99)), inv, pss)
		if strings.HasPrefix(r.path, "crun") {
			crunP50[r.c] = r.lat.pct(50)
		}
		if strings.HasPrefix(r.path, "pre-started VMM, restore prepared (") {
			prepP50[r.c] = r.lat.pct(50)
		}
	}
	tw.Flush()
	for _, c := range concs {
		if crunP50[c] > 0 && prepP50[c] > 0 {
			fmt.Fprintf(out, "c=%d: restore-to-running p50 is %.1fx faster than crun run /bin/true p50\n", c, float64(crunP50[c])/float64(prepP50[c]))
		}
	}
	fmt.Fprintln(out, "goals (issue 7): ~2 ms restore, < 3 MiB per idle clone")
	return nil
}

func mib(b uint64) float64 { return float64(b) / (1 << 20) }

func stopAll(ps []*vmmProc) {
	var wg sync.WaitGroup
	for _, p := range ps {
		if p == nil {
			continue
		}
		wg.Add(1)
		go func() { defer wg.Done(); p.stop() }()
	}
	wg.Wait()
}

// runCrun times n `crun run` of /bin/true at concurrency c (see
// bench_crun.go).
func runCrun(work string, n, c int) (latencies, error) {
	bundle := filepath.Join(work, "crun-bundle")
	if err := makeCrunBundle(bundle); err != nil {
		return nil, err
	}
	lat, err := runCrunHelper("bench", "restore", "--crun-helper", bundle, "-n", strconv.Itoa(n), "--crun-c", strconv.Itoa(c))
	return latencies(lat), err
}
