package main

import (
	"bufio"
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
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	apiclient "github.com/cubesandbox/cube/internal/client"
	"github.com/cubesandbox/cube/internal/errs"
)

func init() { addBench(newBenchAPI) }

// apiSample is one sandbox's timings.
type apiSample struct {
	create time.Duration // POST -> 201
	total  time.Duration // POST -> first commands.run finished
}

func newBenchAPI() *cobra.Command {
	var (
		af        apiFlags
		levels    string
		template  string
		perLevel  int
		sdkScript string
		noSDK     bool
	)
	cmd := &cobra.Command{
		Use:   "api",
		Short: "End-to-end Sandbox.create latency: POST to 201, then the first commands.run through the proxy; Go client vs the stock SDK",
		Long: `Measures, at each concurrency level, the time from POST /v2/sandboxes to its 201 and to the end of
the first command run through the sandbox proxy (envd process.Start), then kills the sandbox.
The same is then measured with the stock e2b SDK from node (--sdk-script, needs NODE_PATH with
e2b installed, as make bench-api sets up). Without --api-url/E2B_API_URL a cube server is started
on a free port with a temporary data dir.`,
		RunE: func(cmd *cobra.Command, args []string) error {
			var cs []int
			for _, s := range strings.Split(levels, ",") {
				n, err := strconv.Atoi(strings.TrimSpace(s))
				if err != nil || n < 1 || n > 500 {
					return errs.E(errs.InvalidArgument, "-c: %q is not a concurrency from 1 to 500", s)
				}
				cs = append(cs, n)
			}
			ctx := cmd.Context()
			out := cmd.OutOrStdout()
			if af.url == "" && os.Getenv("E2B_API_URL") == "" {
				maxC := 0
				for _, c := range cs {
					maxC = max(maxC, c)
				}
				url, key, stop, err := benchServer(ctx, maxC)
				if err != nil {
					return err
				}
				defer stop()
				af.url, af.key = url, key
			}
			cl, err := af.client()
			if err != nil {
				return err
			}
			fmt.Fprintf(out, "cube bench api: template %s, server %s\n", template, cl.APIURL)
			// Warm-up: one sandbox, not counted.
			if _, err := benchOne(ctx, cl, template); err != nil {
				return err
			}
			type row struct {
				c             int
				n, fail       int
				create, total []time.Duration
			}
			var goRows []row
			for _, c := range cs {
				n := max(perLevel, c)
				samples, fails := benchLevel(ctx, cl, template, c, n)
				r := row{c: c, n: len(samples), fail: fails}
				for _, s := range samples {
					r.create = append(r.create, s.create)
					r.total = append(r.total, s.total)
				}
				goRows = append(goRows, r)
			}
			tw := tabwriter.NewWriter(out, 2, 4, 2, ' ', tabwriter.AlignRight)
			fmt.Fprintln(tw, "client\tconc\tn\tfailed\tcreate p50\tp95\tp99\t+first run p50\tp95\tp99\t")
			for _, r := range goRows {
				fmt.Fprintf(tw, "cube Go client\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.c, r.n, r.fail,
					apiMS(percentile(r.create, 50)), apiMS(percentile(r.create, 95)), apiMS(percentile(r.create, 99)),
					apiMS(percentile(r.total, 50)), apiMS(percentile(r.total, 95)), apiMS(percentile(r.total, 99)))
			}
			if noSDK {
				return tw.Flush()
			}
			sdk, err := runSDKBench(ctx, sdkScript, cl, template, cs, perLevel)
			if err != nil {
				tw.Flush()
				fmt.Fprintf(out, "stock SDK: not measured: %v\n", err)
				return nil
			}
			for i, r := range sdk {
				fmt.Fprintf(tw, "stock e2b SDK\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t\n", r.C, len(r.Create), r.Failed,
					apiMS(percentile(r.create(), 50)), apiMS(percentile(r.create(), 95)), apiMS(percentile(r.create(), 99)),
					apiMS(percentile(r.total(), 50)), apiMS(percentile(r.total(), 95)), apiMS(percentile(r.total(), 99)))
				_ = i
			}
			tw.Flush()
			for i, r := range sdk {
				if i < len(goRows) && percentile(goRows[i].total, 50) > 0 {
					fmt.Fprintf(out, "c=%d: stock SDK / Go client, create+first run p50: %.2fx\n", r.C,
						float64(percentile(r.total(), 50))/float64(percentile(goRows[i].total, 50)))
				}
			}
			return nil
		},
	}
	af.bind(cmd)
	cmd.Flags().StringVarP(&levels, "concurrency", "c", "1,10,50", "comma-separated concurrency levels")
	cmd.Flags().StringVar(&template, "template", "base", "template to create sandboxes from")
	cmd.Flags().IntVar(&perLevel, "n", 20, "sandboxes per level (at least the concurrency)")
	cmd.Flags().StringVar(&sdkScript, "sdk-script", "test/e2e/bench-sdk.mjs", "node script driving the stock SDK")
	cmd.Flags().BoolVar(&noSDK, "no-sdk", false, "skip the stock SDK measurement")
	return cmd
}

func apiMS(d time.Duration) string {
	return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond))
}

func benchOne(ctx context.Context, cl *apiclient.Client, template string) (apiSample, error) {
	start := time.Now()
	sb, err := cl.Create(ctx, template, apiclient.CreateOptions{Timeout: 120})
	if err != nil {
		return apiSample{}, err
	}
	created := time.Since(start)
	defer cl.Kill(context.WithoutCancel(ctx), sb.SandboxID)
	res, err := cl.Exec(ctx, sb.SandboxID, sb.EnvdAccessToken, "true", io.Discard, io.Discard)
	if err != nil {
		return apiSample{}, err
	}
	if res.ExitCode != 0 {
		return apiSample{}, fmt.Errorf("first command exited %d", res.ExitCode)
	}
	return apiSample{create: created, total: time.Since(start)}, nil
}

// benchLevel runs n sandboxes with c at a time.
func benchLevel(ctx context.Context, cl *apiclient.Client, template string, c, n int) ([]apiSample, int) {
	var (
		mu      sync.Mutex
		samples []apiSample
		fails   int
		wg      sync.WaitGroup
		next    = make(chan struct{}, n)
	)
	for i := 0; i < n; i++ {
		next <- struct{}{}
	}
	close(next)
	for w := 0; w < c; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range next {
				s, err := benchOne(ctx, cl, template)
				mu.Lock()
				if err != nil {
					fails++
					if fails <= 3 {
						fmt.Fprintf(os.Stderr, "bench: %v\n", err)
					}
				} else {
					samples = append(samples, s)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return samples, fails
}

// sdkRow is one level measured by the node script (milliseconds).
type sdkRow struct {
	C      int       `json:"c"`
	Create []float64 `json:"create"`
	Total  []float64 `json:"total"`
	Failed int       `json:"failed"`
}

func toDur(v []float64) []time.Duration {
	out := make([]time.Duration, len(v))
	for i, f := range v {
		out[i] = time.Duration(f * float64(time.Millisecond))
	}
	return out
}

func (r sdkRow) create() []time.Duration { return toDur(r.Create) }
func (r sdkRow) total() []time.Duration  { return toDur(r.Total) }

func runSDKBench(ctx context.Context, script string, cl *apiclient.Client, template string, cs []int, perLevel int) ([]sdkRow, error) {
	if _, err := os.Stat(script); err != nil {
		return nil, fmt.Errorf("no SDK script %s", script)
	}
	var levels []string
	for _, c := range cs {
		levels = append(levels, strconv.Itoa(c))
	}
	cmd := exec.CommandContext(ctx, "node", script, "--template", template, "-c", strings.Join(levels, ","), "-n", strconv.Itoa(perLevel))
	cmd.Env = append(os.Environ(), "E2B_API_URL="+cl.APIURL, "E2B_SANDBOX_URL="+firstNonEmpty(cl.SandboxURL, cl.APIURL), "E2B_API_KEY="+cl.APIKey)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", script, err)
	}
	var rows []sdkRow
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		var r sdkRow
		if json.Unmarshal(sc.Bytes(), &r) == nil && r.C > 0 {
			rows = append(rows, r)
		}
	}
	if len(rows) == 0 {
		return nil, fmt.Errorf("node %s printed no results", script)
	}
	return rows, nil
}

// benchServer starts `cube server` on a free port with a temporary data
// dir and returns its URL, API key and a stop function.
func benchServer(ctx context.Context, capacity int) (string, string, func(), error) {
	exe, err := os.Executable()
	if err != nil {
		return "", "", nil, err
	}
	dir, err := os.MkdirTemp("", "cube-bench-api-")
	if err != nil {
		return "", "", nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", "", nil, err
	}
	addr := ln.Addr().String()
	ln.Close()
	logf, _ := os.Create(filepath.Join(dir, "server.log"))
	cmd := exec.Command(exe, "--data-dir", dir, "server", "--listen", addr, "--max-sandboxes", strconv.Itoa(capacity+8))
	// Own network slot names and addresses: runs next to another cube.
	pid := os.Getpid()
	cmd.Env = append(os.Environ(), fmt.Sprintf("CUBE_SLOT_PREFIX=bn%d", pid%100000),
		fmt.Sprintf("CUBE_SLOT_HOST_RANGE=10.226.%d.0/22", (pid%64)*4))
	cmd.Stderr = logf
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		return "", "", nil, err
	}
	stop := func() {
		cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			cmd.Process.Kill()
			<-done
		}
		logf.Close()
		os.RemoveAll(dir)
	}
	fmt.Fprintf(os.Stderr, "bench: starting cube server on %s (data dir %s; templates are prepared first)\n", addr, dir)
	sc := bufio.NewScanner(stdout)
	for sc.Scan() {
		if k, ok := strings.CutPrefix(sc.Text(), "export E2B_API_KEY="); ok {
			go io.Copy(io.Discard, stdout)
			return "http://" + addr, k, stop, nil
		}
	}
	stop()
	return "", "", nil, errs.E(errs.Unavailable, "cube server did not start (see its log)")
}
