//go:build linux

package template

import (
	"archive/tar"
	"bytes"
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
	"testing"
	"time"

	"connectrpc.com/connect"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/conformance"
	"github.com/cubesandbox/cube/internal/runtime/readycheck"
	pb "github.com/cubesandbox/cube/proto/process"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// privateAgent builds this tree's cube-agent into the test's own dir (the
// shared test-agent path may be rebuilt by another tree's tests meanwhile).
func privateAgent(t testing.TB) string {
	t.Helper()
	mod, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(t.TempDir(), "cube-agent")
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, "./cmd/cube-agent")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(mod)))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build cube-agent: %v: %s", err, b)
	}
	return out
}

// busyboxImage is an image of the host's static busybox (httpd, wget, sh)
// and a web root, written as a docker tarball.
func busyboxImage(t testing.TB) string {
	t.Helper()
	if _, err := os.Stat("/bin/busybox"); err != nil {
		t.Skip("no static busybox (busybox-static, installed by make deps)")
	}
	es := []entry{hostFile(t, "/bin/busybox", "bin/busybox"),
		{name: "www/index.html", typ: tar.TypeReg, body: "hello from the start command\n"}}
	for _, a := range []string{"sh", "httpd", "wget", "sleep", "cat", "echo", "wc"} {
		es = append(es, entry{name: "bin/" + a, typ: tar.TypeSymlink, link: "busybox"})
	}
	l := mkTar(t, es...)
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(l)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = "amd64", "linux"
	cf.Config.Env = []string{"PATH=/bin"}
	cf.Config.WorkingDir = "/www"
	cf.Config.Cmd = []string{"sh"} // not run: only an explicit start command is
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "busybox.tar")
	ref, _ := name.ParseReference("cube.test/busybox:v1")
	if err := tarball.WriteToFile(p, ref, v1.Image(img)); err != nil {
		t.Fatal(err)
	}
	return p
}

// The start command's pid goes to /tmp/starts on every start, its cwd and
// env to /tmp/start-env; then it becomes the HTTP server.
const httpdStart = `echo $$ >> /tmp/starts; echo "$(pwd) $GREETING" > /tmp/start-env; exec httpd -f -p 8080 -h /www`

func TestStartCmdTemplate(t *testing.T) {
	b, rt := newBuilder(t)
	b.AgentPath = privateAgent(t)
	img := busyboxImage(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	req := func(id, start, ready string, timeout time.Duration) ImageRequest {
		r := ImageRequest{TemplateID: id, Source: ImageSource{Ref: img}, DiskMB: 64, MemoryMB: 128,
			Env: map[string]string{"GREETING": "hi"}, ReadyCmd: ready, ReadyTimeout: timeout}
		if start != "" {
			r.StartCmd = []string{"/bin/sh", "-c", start}
		}
		return r
	}
	// A failing ready check or start command fails the build and leaves
	// nothing: no runtime template, no sandbox, no artifacts.
	failing := func(r ImageRequest, want ...string) {
		t.Helper()
		got, err := b.CreateFromImage(ctx, r)
		if err == nil || got.Phase != PhaseFailed {
			t.Fatalf("%s: built: %+v", r.TemplateID, got)
		}
		for _, w := range want {
			if !strings.Contains(got.Reason, w) {
				t.Fatalf("%s: reason %q lacks %q", r.TemplateID, got.Reason, w)
			}
		}
		t.Logf("%s: %s", r.TemplateID, got.Reason)
		if _, err := rt.Create(ctx, runtime.CreateSpec{ID: "sbx-" + r.TemplateID, TemplateID: r.TemplateID}); !errs.Is(err, errs.NotFound) {
			t.Fatalf("%s: a sandbox could be created from the failed template: %v", r.TemplateID, err)
		}
		if l, _ := rt.List(ctx); len(l) != 0 {
			t.Fatalf("sandboxes left: %+v", l)
		}
		if ents, _ := os.ReadDir(filepath.Join(b.DataDir, "templates", "artifacts")); len(ents) != 0 {
			t.Fatalf("artifacts left: %v", ents)
		}
		if _, err := os.Stat(filepath.Join(b.DataDir, "gvisor", "templates", r.TemplateID)); err == nil {
			t.Fatalf("%s: runtime template dir left", r.TemplateID)
		}
		noLeaks(t, b, rt)
	}
	failing(req("never-ready", httpdStart, "echo probing; wget -q -O /dev/null http://127.0.0.1:9/", 2*time.Second),
		"ready command", "did not succeed within 2s", "probing")
	failing(req("start-exits", "echo cannot bind port 8080 >&2; exit 4", "", 0),
		"exited", "exit status 4", "cannot bind port 8080")
	failing(req("start-missing", "", "", 0).withStart("/no/such/server"), "failed", "/no/such/server")
	// Probing the port the start command should serve: its end fails the
	// probe at once, with its output (not after the bake timeout).
	t0 := time.Now()
	probed := req("probe-start-exits", "echo no config >&2; exit 2", "", 0)
	probed.ProbePort, probed.ProbePath = 8080, "/index.html"
	failing(probed, "probe :8080", "exit status 2", "no config")
	if d := time.Since(t0); d > 30*time.Second {
		t.Fatalf("the probe waited %v for a start command that had exited", d)
	}

	r, err := b.CreateFromImage(ctx, req("httpd", httpdStart, "wget -q -O /dev/null http://127.0.0.1:8080/index.html", 30*time.Second))
	if err != nil {
		t.Fatalf("build: %v (%s)", err, r.Reason)
	}
	stored, _ := b.Catalog.Get(ctx, "httpd")
	if strings.Join(stored.StartCmd, " ") != "/bin/sh -c "+httpdStart || stored.ReadyCmd == "" || stored.ReadyTimeoutSec != 30 || strings.Join(stored.Cmd, " ") != "sh" {
		t.Fatalf("metadata: %+v", stored)
	}

	// A sandbox from the template is a restore with the server running.
	id := "sbx-httpd"
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: "httpd"}); err != nil {
		t.Fatal(err)
	}
	defer rt.Destroy(context.Background(), id)
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return rt.Dial(ctx, id, 8080) }, DisableKeepAlives: true,
	}, Timeout: 10 * time.Second}
	resp, err := hc.Get("http://sandbox/index.html")
	if err != nil {
		t.Fatalf("first request to the server: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "hello from the start command\n" {
		t.Fatalf("HTTP %d %q", resp.StatusCode, body)
	}
	res, err := conformance.Exec(ctx, rt, id, `cat /tmp/starts; cat /tmp/start-env; wget -q -O - http://127.0.0.1:8080/index.html`)
	if err != nil || res.ExitCode != 0 {
		t.Fatalf("exec: %+v %v", res, err)
	}
	lines := strings.Split(strings.TrimSpace(res.Stdout), "\n")
	if len(lines) != 3 || lines[1] != "/www hi" || lines[2] != "hello from the start command" {
		t.Fatalf("in the sandbox: %q (started more than once, or without the template's env and workdir)", res.Stdout)
	}
	// The server is the process started before the snapshot: the pid it
	// wrote then is the one the agent supervises now, and it is listed.
	envdDial := func(ctx context.Context) (net.Conn, error) { return rt.Dial(ctx, id, runtime.EnvdPort) }
	st, err := readycheck.GetStatus(ctx, envdDial)
	if err != nil || st.State != "running" || lines[0] != strconv.FormatUint(uint64(st.Pid), 10) {
		t.Fatalf("start status %+v (%v); pid before the snapshot %s", st, err, lines[0])
	}
	pc := processconnect.NewProcessClient(&http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return envdDial(ctx) }}}, "http://sandbox")
	list, err := pc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range list.Msg.Processes {
		found = found || (p.Pid == st.Pid && p.GetTag() == "cube-start-cmd")
	}
	if !found {
		t.Fatalf("start command not in the process list: %v", list.Msg.Processes)
	}
	if err := rt.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}

	// The probe on the start command's port instead of a ready command
	// (then the 1 s settle): the template's env and workdir still reach
	// the agent's other processes.
	probed = req("httpd-probed", httpdStart, "", 0)
	probed.ProbePort, probed.ProbePath = 8080, "/index.html"
	if r, err := b.CreateFromImage(ctx, probed); err != nil {
		t.Fatalf("build: %v (%s)", err, r.Reason)
	}
	id = "sbx-httpd-probed"
	if _, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: "httpd-probed"}); err != nil {
		t.Fatal(err)
	}
	defer rt.Destroy(context.Background(), id)
	res, err = conformance.Exec(ctx, rt, id, `echo "$(pwd) $GREETING"; wc -l < /tmp/starts; wget -q -O - http://127.0.0.1:8080/index.html`)
	if err != nil || res.Stdout != "/www hi\n1\nhello from the start command\n" {
		t.Fatalf("exec: %+v %v", res, err)
	}
	if err := rt.Destroy(ctx, id); err != nil {
		t.Fatal(err)
	}
	for _, tpl := range []string{"httpd", "httpd-probed"} {
		if err := b.Delete(ctx, tpl); err != nil {
			t.Fatal(err)
		}
	}
	noLeaks(t, b, rt)
}

func (r ImageRequest) withStart(argv ...string) ImageRequest { r.StartCmd = argv; return r }

// BenchmarkStartCmdCreate: time from Create to the first HTTP answer of
// the template's server, for a template baked with the server as its start
// command (a restore with it running), against its peer in the same run: a
// plain template where the same command is started after the restore (exec
// through the agent, then polled until it answers). Interleaved. The
// server is busybox httpd after a warm-up (0 s, 1 s: a server that loads
// before it listens).
func BenchmarkStartCmdCreate(b *testing.B) {
	bl, rt := newBuilder(b)
	bl.AgentPath = privateAgent(b)
	img := busyboxImage(b)
	ctx := context.Background()
	build := func(r ImageRequest) {
		if _, err := bl.CreateFromImage(ctx, r); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { bl.Delete(context.Background(), r.TemplateID) })
	}
	build(ImageRequest{TemplateID: "bench-plain", Source: ImageSource{Ref: img}, DiskMB: 64, MemoryMB: 128})
	get := func(id string) error {
		hc := &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) { return rt.Dial(ctx, id, 8080) }, DisableKeepAlives: true,
		}, Timeout: 5 * time.Second}
		resp, err := hc.Get("http://sandbox/index.html")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			return fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		return nil
	}
	for _, warmup := range []int{0, 1} {
		server := fmt.Sprintf("sleep %d; exec httpd -f -p 8080 -h /www", warmup)
		tpl := fmt.Sprintf("bench-start-%d", warmup)
		build(ImageRequest{TemplateID: tpl, Source: ImageSource{Ref: img}, DiskMB: 64, MemoryMB: 128,
			StartCmd: []string{"/bin/sh", "-c", server}, ReadyCmd: "wget -q -O /dev/null http://127.0.0.1:8080/index.html"})
		b.Run(fmt.Sprintf("warmup=%ds", warmup), func(b *testing.B) {
			var withStart, startAfter time.Duration
			for i := 0; i < b.N; i++ {
				id := fmt.Sprintf("bench-s-%d", i)
				t0 := time.Now()
				if _, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: tpl}); err != nil {
					b.Fatal(err)
				}
				if err := get(id); err != nil {
					b.Fatalf("server of the start command: %v", err)
				}
				withStart += time.Since(t0)
				rt.Destroy(ctx, id)

				id = fmt.Sprintf("bench-p-%d", i)
				t0 = time.Now()
				if _, err := rt.Create(ctx, runtime.CreateSpec{ID: id, TemplateID: "bench-plain"}); err != nil {
					b.Fatal(err)
				}
				if res, err := conformance.Exec(ctx, rt, id, "("+server+") >/dev/null 2>&1 &"); err != nil || res.ExitCode != 0 {
					b.Fatalf("start httpd: %+v %v", res, err)
				}
				deadline := time.Now().Add(20 * time.Second)
				for get(id) != nil {
					if time.Now().After(deadline) {
						b.Fatal("httpd started after the restore never answered")
					}
					time.Sleep(5 * time.Millisecond)
				}
				startAfter += time.Since(t0)
				rt.Destroy(ctx, id)
			}
			n := float64(b.N)
			b.ReportMetric(float64(withStart.Milliseconds())/n, "ms-restore-running")
			b.ReportMetric(float64(startAfter.Milliseconds())/n, "ms-restore+start")
			b.ReportMetric(float64(withStart)/float64(startAfter), "ratio")
			b.ReportMetric(0, "ns/op")
		})
	}
}
