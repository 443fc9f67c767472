//go:build linux

package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"mime/multipart"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"connectrpc.com/connect"
	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/agent/envd"
	"github.com/cubesandbox/cube/internal/agent/interp"
	"github.com/cubesandbox/cube/internal/logging"
	pb "github.com/cubesandbox/cube/proto/process"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

func init() { addBench(newBenchAgent) }

// benchAgentEnv adapts envd for the in-process code interpreter.
type benchAgentEnv struct{ s *envd.Server }

func (e benchAgentEnv) EnvVars() map[string]string { return e.s.EnvVars() }
func (e benchAgentEnv) AccessToken() string        { return e.s.AccessToken() }
func (e benchAgentEnv) KernelUser() (interp.RunAs, string, error) {
	u, err := e.s.DefaultUser()
	if err != nil {
		return interp.RunAs{}, "", err
	}
	return interp.RunAs{Cred: u.Credential(), UID: int(u.UID), GID: int(u.GID), Env: e.s.BaseEnv(u)}, u.Home, nil
}

func newBenchAgent() *cobra.Command {
	var runs, sizeMB int
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "cube-agent on loopback: commands.run(\"true\") and runCode(\"1+1\") p50/p99, 100 MB upload/download, vs fork+exec and cp",
		RunE: func(cmd *cobra.Command, args []string) error {
			return benchAgent(cmd.OutOrStdout(), runs, sizeMB)
		},
	}
	cmd.Flags().IntVar(&runs, "runs", 50, "iterations of each latency measurement")
	cmd.Flags().IntVar(&sizeMB, "size-mb", 100, "file size for the throughput measurements")
	return cmd
}

type lat []time.Duration

// pct is the sample at index q*(n-1), rounded down, of the n samples sorted.
func (l lat) pct(q float64) time.Duration {
	return sampleAt(l, func(n int) int { return int(q * float64(n-1)) })
}

// measurePair alternates a and b so that both see the same machine load
// (the build machines are shared and noisy).
func measurePair(runs int, a, b func() error) (lat, lat, error) {
	var la, lb lat
	for i := 0; i < runs; i++ {
		for _, x := range []struct {
			f func() error
			l *lat
		}{{a, &la}, {b, &lb}} {
			t0 := time.Now()
			if err := x.f(); err != nil {
				return nil, nil, err
			}
			*x.l = append(*x.l, time.Since(t0))
		}
	}
	return la, lb, nil
}

func serveLoopback(h http.Handler) (string, func(), error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", nil, err
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	return "http://" + l.Addr().String(), func() { srv.Close() }, nil
}

func benchAgent(out io.Writer, runs, sizeMB int) error {
	log := logging.New(os.Stderr, "warn", "text")
	user := "root"
	if os.Geteuid() != 0 {
		user = os.Getenv("USER")
	}
	es := envd.New(envd.Options{Logger: log, DefaultUser: user})
	defer es.Close()
	base, stop, err := serveLoopback(es.Handler())
	if err != nil {
		return err
	}
	defer stop()
	is := interp.New(log, benchAgentEnv{es})
	defer is.Close()
	ibase, istop, err := serveLoopback(is.Handler())
	if err != nil {
		return err
	}
	defer istop()

	w := tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintln(w, "measurement\tp50\tp99\tpeer\tpeer p50\tratio p50")
	row := func(name string, a lat, peer string, b lat) {
		fmt.Fprintf(w, "%s\t%v\t%v\t%s\t%v\t%.2fx\n", name, a.pct(.5).Round(time.Microsecond), a.pct(.99).Round(time.Microsecond),
			peer, b.pct(.5).Round(time.Microsecond), float64(a.pct(.5))/float64(b.pct(.5)))
	}

	// commands.run("true"): what the SDK sends, a Connect stream over loopback.
	c := processconnect.NewProcessClient(http.DefaultClient, base, connect.WithProtoJSON())
	f := false
	run := func() error {
		st, err := c.Start(context.Background(), connect.NewRequest(&pb.StartRequest{
			Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-l", "-c", "true"}}, Stdin: &f}))
		if err != nil {
			return err
		}
		for st.Receive() {
		}
		return st.Err()
	}
	// The agent runs `bash -l -c` (a login shell, as the SDK asks); the
	// login shell's cost depends on the image's /etc/profile, so both
	// peers are shown.
	agentRun, bashC, err := measurePair(runs, run, func() error { return exec.Command("/bin/bash", "-c", "true").Run() })
	if err != nil {
		return err
	}
	row(`commands.run("true")`, agentRun, "bash -c true", bashC)
	agentRun, bashLC, err := measurePair(runs, run, func() error { return exec.Command("/bin/bash", "-l", "-c", "true").Run() })
	if err != nil {
		return err
	}
	row(`commands.run("true")`, agentRun, "bash -l -c true", bashLC)
	// The agent's own overhead: the same RPC running `bash -c true`.
	runPlain := func() error {
		st, err := c.Start(context.Background(), connect.NewRequest(&pb.StartRequest{
			Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-c", "true"}}, Stdin: &f}))
		if err != nil {
			return err
		}
		for st.Receive() {
		}
		return st.Err()
	}
	rpcPlain, bashC2, err := measurePair(runs, runPlain, func() error { return exec.Command("/bin/bash", "-c", "true").Run() })
	if err != nil {
		return err
	}
	row(`Start("bash -c true")`, rpcPlain, "bash -c true", bashC2)

	// runCode("1+1") on a warm default Python context.
	exe := func() error {
		res, err := http.Post(ibase+"/execute", "application/json", strings.NewReader(`{"code":"1+1"}`))
		if err != nil {
			return err
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		if !strings.Contains(string(b), `"text":"2"`) {
			return fmt.Errorf("runCode: %s", b)
		}
		return nil
	}
	if err := exe(); err != nil {
		fmt.Fprintf(w, "runCode(\"1+1\")\tunavailable: %v\n", err)
	} else {
		rc, py, err := measurePair(runs, exe, func() error { return exec.Command(interp.Python(), "-c", "1+1").Run() })
		if err != nil {
			return err
		}
		row(`runCode("1+1")`, rc, "python3 -c 1+1", py)
	}
	w.Flush()

	// Throughput: upload and download through /files vs cp.
	dir, err := os.MkdirTemp("/var/tmp", "cube-bench-agent-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	size := int64(sizeMB) << 20
	src := filepath.Join(dir, "src")
	buf := make([]byte, size)
	rand.Read(buf)
	if err := os.WriteFile(src, buf, 0o644); err != nil {
		return err
	}
	buf = nil
	tput := func(f func() error) (float64, error) {
		best := time.Duration(1 << 62)
		for i := 0; i < 3; i++ {
			t0 := time.Now()
			if err := f(); err != nil {
				return 0, err
			}
			best = min(best, time.Since(t0))
		}
		return float64(size) / (1 << 20) / best.Seconds(), nil
	}
	// Go's client asks for gzip by default, which the agent honours; the
	// SDK does not (undici sends "gzip, deflate"), so neither do we. Large
	// client buffers: the client should not be the bottleneck.
	plain := &http.Client{Transport: &http.Transport{DisableCompression: true, WriteBufferSize: 1 << 20, ReadBufferSize: 1 << 20}}
	up, err := tput(func() error {
		pr, pw := io.Pipe()
		mw := multipart.NewWriter(pw)
		go func() {
			f, _ := os.Open(src)
			defer f.Close()
			part, _ := mw.CreateFormFile("file", filepath.Join(dir, "up"))
			io.Copy(part, f)
			mw.Close()
			pw.Close()
		}()
		res, err := plain.Post(base+"/files?path="+url.QueryEscape(filepath.Join(dir, "up")), mw.FormDataContentType(), pr)
		if err != nil {
			return err
		}
		res.Body.Close()
		if res.StatusCode != 200 {
			return fmt.Errorf("upload: %s", res.Status)
		}
		return nil
	})
	if err != nil {
		return err
	}
	down, err := tput(func() error {
		res, err := plain.Get(base + "/files?path=" + url.QueryEscape(src))
		if err != nil {
			return err
		}
		defer res.Body.Close()
		_, err = io.Copy(io.Discard, res.Body)
		return err
	})
	if err != nil {
		return err
	}
	cp, err := tput(func() error { return exec.Command("cp", src, filepath.Join(dir, "cp")).Run() })
	if err != nil {
		return err
	}
	w = tabwriter.NewWriter(out, 2, 4, 2, ' ', 0)
	fmt.Fprintf(w, "\nthroughput (%d MB, best of 3)\tMB/s\tvs cp (%.0f MB/s)\n", sizeMB, cp)
	fmt.Fprintf(w, "upload POST /files\t%.0f\t%.2fx\n", up, up/cp)
	fmt.Fprintf(w, "download GET /files\t%.0f\t%.2fx\n", down, down/cp)
	return w.Flush()
}
