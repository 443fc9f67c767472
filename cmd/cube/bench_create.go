//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/gvisor"
	"github.com/cubesandbox/cube/internal/template"
)

// benchRow is one measured path at one concurrency.
type benchRow struct {
	path    string
	c       int
	samples []time.Duration
	err     error
}

// cpct is the sample of rank p*n, rounded, of the n samples s sorted.
func cpct(s []time.Duration, p float64) time.Duration {
	return sampleAt(s, func(n int) int { return int(p*float64(n)+0.5) - 1 })
}

func cms(d time.Duration) string { return fmt.Sprintf("%.1f", float64(d.Microseconds())/1000) }

func benchCreateCmd() *cobra.Command {
	var (
		rtName, tpl, conc string
		n                 int
	)
	c := &cobra.Command{
		Use:   "create",
		Short: "Create-to-agent-ready latency (warm pool, cold restore) beside crun and runsc /bin/true",
		RunE: func(cmd *cobra.Command, args []string) error {
			if rtName != "gvisor" {
				return errs.E(errs.Unimplemented, "runtime %q: only gvisor is benchmarked here", rtName)
			}
			var cs []int
			for _, s := range strings.Split(conc, ",") {
				v, err := strconv.Atoi(strings.TrimSpace(s))
				if err != nil || v < 1 || v > 64 {
					return errs.E(errs.InvalidArgument, "bad concurrency %q", s)
				}
				cs = append(cs, v)
			}
			ctx, cancel := signalContext()
			defer cancel()
			e, err := newTplEnv(ctx, false)
			if err != nil {
				return err
			}
			rec, err := e.catalog.Resolve(ctx, tpl)
			if err != nil {
				return err
			}
			if rec.Phase != template.PhaseReady {
				return errs.E(errs.FailedPrecondition, "template %s is %s", rec.ID, rec.Phase)
			}
			runsc, err := findRunsc(e.cfg)
			if err != nil {
				return err
			}
			// A private state dir: the bench never touches a server's sandboxes.
			state, err := os.MkdirTemp(e.cfg.DataDir, "bench-")
			if err != nil {
				return err
			}
			defer os.RemoveAll(state)
			b := &createBench{cmd: cmd, runsc: runsc, state: state, rec: rec, n: n}
			if err := b.bake(ctx); err != nil {
				return err
			}
			var rows []benchRow
			for _, c := range cs {
				rows = append(rows, b.gvisor(ctx, c, true), b.gvisor(ctx, c, false), b.crun(ctx, c), b.runscTrue(ctx, c))
			}
			out := cmd.OutOrStdout()
			fmt.Fprintf(out, "\ncreate-to-ready latency, template %s (runsc %s, platform systrap), ms\n", rec.ID, filepath.Base(runsc))
			tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, "path\tc\tn\tp50\tp95\tp99\tp50 / crun p50\t")
			base := map[int]time.Duration{}
			for _, r := range rows {
				if r.path == "crun run /bin/true" && r.err == nil {
					base[r.c] = cpct(r.samples, 0.5)
				}
			}
			for _, r := range rows {
				if r.err != nil {
					fmt.Fprintf(tw, "%s\t%d\t-\t-\t-\t-\t%s\t\n", r.path, r.c, errs.Message(r.err))
					continue
				}
				ratio := "-"
				if b := base[r.c]; b > 0 {
					ratio = fmt.Sprintf("%.2fx", float64(cpct(r.samples, 0.5))/float64(b))
				}
				fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t\n", r.path, r.c, len(r.samples), cms(cpct(r.samples, 0.5)), cms(cpct(r.samples, 0.95)), cms(cpct(r.samples, 0.99)), ratio)
			}
			return tw.Flush()
		},
	}
	c.Flags().StringVar(&rtName, "runtime", "gvisor", "runtime to measure")
	c.Flags().StringVar(&tpl, "template", "base", "template (id or alias)")
	c.Flags().StringVarP(&conc, "concurrency", "c", "1,10", "concurrency levels, comma-separated")
	c.Flags().IntVarP(&n, "samples", "n", 20, "samples per path and level (rounded up to a multiple of c)")
	return c
}

type createBench struct {
	cmd   *cobra.Command
	runsc string
	state string
	rec   template.Record
	n     int
}

func (b *createBench) logf(format string, args ...any) {
	fmt.Fprintf(b.cmd.ErrOrStderr(), format+"\n", args...)
}

func (b *createBench) open(ctx context.Context, pool int) (*gvisor.Runtime, error) {
	return gvisor.New(ctx, gvisor.Options{DataDir: b.state, RunscPath: b.runsc, PoolSize: pool})
}

func (b *createBench) bake(ctx context.Context) error {
	rt, err := b.open(ctx, 0)
	if err != nil {
		return err
	}
	defer rt.Close()
	b.logf("baking %s in %s", b.rec.ID, b.state)
	return rt.BakeTemplate(ctx, runtime.Template{
		ID: b.rec.ID, RootfsDir: b.rec.RootfsDir, Workdir: b.rec.Workdir,
		Resources: runtime.Resources{CPUCount: b.rec.CPUCount, MemoryMB: b.rec.MemoryMB, DiskMB: b.rec.DiskMB},
		ProbePort: b.rec.ProbePort, ProbePath: b.rec.ProbePath,
	})
}

func (b *createBench) rounds(c int) int { return max(1, (max(b.n, c)+c-1)/c) }

// gvisor measures Create + first agent /health, from the warm pool or by
// cold restore.
func (b *createBench) gvisor(ctx context.Context, c int, warm bool) benchRow {
	row := benchRow{path: "gvisor cold restore", c: c}
	pool := 0
	if warm {
		row.path, pool = "gvisor warm pool", c
	}
	b.logf("measuring %s, c=%d", row.path, c)
	rt, err := b.open(ctx, pool)
	if err != nil {
		row.err = err
		return row
	}
	defer rt.Close()
	tid := b.rec.ID
	waitPool := func() error {
		deadline := time.Now().Add(2 * time.Minute)
		for warm && rt.PoolReady(tid) < c {
			if time.Now().After(deadline) {
				return errs.E(errs.Timeout, "warm pool did not fill")
			}
			time.Sleep(20 * time.Millisecond)
		}
		return nil
	}
	client := func(id string) *http.Client {
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return rt.Dial(ctx, id, runtime.EnvdPort) }}}
	}
	seq := 0
	for r := 0; r < b.rounds(c); r++ {
		if row.err = waitPool(); row.err != nil {
			return row
		}
		var mu sync.Mutex
		var wg sync.WaitGroup
		ids := make([]string, c)
		for i := 0; i < c; i++ {
			seq++
			ids[i] = fmt.Sprintf("bench-%d", seq)
			wg.Add(1)
			go func(id string) {
				defer wg.Done()
				t0 := time.Now()
				_, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: tid})
				if err == nil {
					var resp *http.Response
					if resp, err = client(id).Get("http://sandbox/health"); err == nil {
						resp.Body.Close()
						if resp.StatusCode/100 != 2 {
							err = fmt.Errorf("health: HTTP %d", resp.StatusCode)
						}
					}
				}
				d := time.Since(t0)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					row.err = err
					return
				}
				row.samples = append(row.samples, d)
			}(ids[i])
		}
		wg.Wait()
		for _, id := range ids {
			rt.Destroy(ctx, id)
		}
		if row.err != nil {
			return row
		}
	}
	return row
}

// crun runs /bin/true from the template's rootfs, in a private mount
// namespace with cgroup2 mounted and crun's cgroup manager disabled (the
// host's cgroup v1 hierarchy is not usable by crun here). Each sample is
// timed in the shell around the crun process.
func (b *createBench) crun(ctx context.Context, c int) benchRow {
	row := benchRow{path: "crun run /bin/true", c: c}
	b.logf("measuring %s, c=%d", row.path, c)
	if _, err := exec.LookPath("crun"); err != nil {
		row.err = errs.E(errs.FailedPrecondition, "crun not installed")
		return row
	}
	dir, err := os.MkdirTemp(b.state, "crun-")
	if err != nil {
		row.err = err
		return row
	}
	if row.err = writeTrueBundle(dir, b.rec.RootfsDir); row.err != nil {
		return row
	}
	script := fmt.Sprintf(`set -e
mount -t cgroup2 none /sys/fs/cgroup
for r in $(seq %d); do
  for i in $(seq %d); do
    ( s=$(date +%%s%%N); crun --root %s/state --cgroup-manager=disabled run -b %s t$r-$i >/dev/null 2>&1; e=$(date +%%s%%N); echo $((e-s)) ) &
  done
  wait
done`, b.rounds(c), c, dir, dir)
	out, err := exec.CommandContext(ctx, "unshare", "-m", "--propagation", "private", "sh", "-c", script).Output()
	if err != nil {
		row.err = errs.Wrap(errs.Internal, err, "crun loop")
		return row
	}
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if ns, err := strconv.ParseInt(strings.TrimSpace(sc.Text()), 10, 64); err == nil {
			row.samples = append(row.samples, time.Duration(ns))
		}
	}
	return row
}

// runscTrue is a cold `runsc run /bin/true` with the same flags as the
// runtime (systrap, memory overlay), no network.
func (b *createBench) runscTrue(ctx context.Context, c int) benchRow {
	row := benchRow{path: "runsc run /bin/true", c: c}
	b.logf("measuring %s, c=%d", row.path, c)
	dir, err := os.MkdirTemp(b.state, "runsc-")
	if err != nil {
		row.err = err
		return row
	}
	root := filepath.Join(dir, "state")
	// runsc's shared gofer netns mount (stacked when runs overlap).
	defer func() {
		for unix.Unmount(filepath.Join(root, "null-netns"), unix.MNT_DETACH) == nil {
		}
	}()
	if row.err = writeTrueBundle(dir, b.rec.RootfsDir); row.err != nil {
		return row
	}
	seq := 0
	for r := 0; r < b.rounds(c); r++ {
		var mu sync.Mutex
		var wg sync.WaitGroup
		for i := 0; i < c; i++ {
			seq++
			wg.Add(1)
			go func(id string) {
				defer wg.Done()
				t0 := time.Now()
				out, err := exec.CommandContext(ctx, b.runsc, "--root="+root, "--platform=systrap", "--network=none",
					"--overlay2=root:memory", "run", "--bundle", dir, id).CombinedOutput()
				d := time.Since(t0)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					row.err = errs.Wrap(errs.Internal, err, "runsc run: %s", strings.TrimSpace(string(out)))
					return
				}
				row.samples = append(row.samples, d)
			}(fmt.Sprintf("true-%d", seq))
		}
		wg.Wait()
		if row.err != nil {
			return row
		}
	}
	return row
}

// writeTrueBundle writes an OCI bundle running /bin/true from rootfs.
func writeTrueBundle(dir, rootfs string) error {
	spec := map[string]any{
		"ociVersion": "1.0.2",
		"process": map[string]any{
			"user": map[string]int{"uid": 0, "gid": 0}, "args": []string{"/bin/true"}, "cwd": "/",
			"env": []string{"PATH=/usr/bin:/bin"},
		},
		"root":     map[string]any{"path": rootfs, "readonly": true},
		"hostname": "bench",
		"mounts": []map[string]any{
			{"destination": "/proc", "type": "proc", "source": "proc"},
			{"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": []string{"nosuid", "mode=755"}},
		},
		"linux": map[string]any{"namespaces": []map[string]string{{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network"}}},
	}
	bs, _ := json.MarshalIndent(spec, "", " ")
	return os.WriteFile(filepath.Join(dir, "config.json"), bs, 0o644)
}

func init() { addBench(benchCreateCmd) }
