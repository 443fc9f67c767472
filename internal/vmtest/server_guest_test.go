//go:build linux && vmtest

package vmtest

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
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
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// TestServerMicroVM (issue 7) runs the all-in-one `cube server --runtime
// microvm` end to end on real KVM, the way an operator does, through the
// product's own commands and its REST API only:
//   - a `docker save`-style image tarball of a busybox root (made here with
//     go-containerregistry: L1 has no network) is turned into a template by
//     `cube tpl --runtime microvm create-from-image` (unpack, agent
//     injection, mkfs.ext4, then the microVM bake: boot, probe, snapshot);
//   - `cube key create`, then `cube server --runtime microvm
//     --network-slots=false` on a loopback port;
//   - POST /v2/sandboxes, a command through the sandbox proxy (Host
//     `49983-<id>.<domain>`) with envd's Connect process API, a file
//     written, POST /sandboxes/{id}/pause, POST /sandboxes/{id}/connect
//     (resume), the file read back, DELETE;
//   - SIGTERM: the server exits and no process (VMM) is left that uses
//     its data dir.
func TestServerMicroVM(t *testing.T) {
	d := dir(t)
	bin := filepath.Join(d, "cube")
	data := t.TempDir()
	env := append(os.Environ(), "CUBE_KERNEL="+filepath.Join(d, "guest", "bzImage"), "CUBE_WARM_POOL_SIZE=1",
		"CUBE_AGENT="+filepath.Join(d, "cube-agent"))
	serverLog := filepath.Join(data, "server.log")
	defer func() {
		killUsers(t, data) // whatever is still up (on failure), so later tests have the machine
		if !t.Failed() {
			return
		}
		b, _ := os.ReadFile(serverLog)
		t.Logf("server log (last %d bytes):\n%s", min(len(b), 12000), tail(b, 12000))
		filepath.Walk(data, func(p string, fi os.FileInfo, err error) error {
			if err != nil || fi.IsDir() || p == serverLog || !strings.HasSuffix(p, ".log") {
				return nil
			}
			b, _ := os.ReadFile(p)
			t.Logf("%s (last %d bytes):\n%s", strings.TrimPrefix(p, data), min(len(b), 6000), tail(b, 6000))
			return nil
		})
	}()
	cube := func(timeout time.Duration, args ...string) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, bin, append([]string{"--data-dir", data}, args...)...)
		cmd.Env = env
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("cube %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, out, tail(stderr.Bytes(), 8000))
		}
		return string(out)
	}

	// 1. The template, from an image tarball, baked by the microVM runtime.
	t0 := time.Now()
	image := filepath.Join(t.TempDir(), "busybox.tar")
	writeBusyboxImage(t, image)
	t.Logf("image tarball %s written", image)
	out := cube(10*time.Minute, "tpl", "--runtime", "microvm", "create-from-image", "--image", image,
		"--template-id", "busybox", "--memory", "256", "--cpu", "1000", "--quiet")
	t.Logf("template built in %.1fs: %s", time.Since(t0).Seconds(), strings.TrimSpace(out))

	// 2. An API key, then the server.
	key := strings.TrimSpace(cube(time.Minute, "key", "create", "--name", "vmtest"))
	if !strings.HasPrefix(key, "e2b_") {
		t.Fatalf("cube key create printed %q", key)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	logf, err := os.Create(serverLog)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	srv := exec.Command(bin, "--data-dir", data, "server", "--runtime", "microvm", "--network-slots=false", "--listen", addr)
	srv.Env, srv.Stdout, srv.Stderr = env, logf, logf
	srv.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- srv.Wait() }()
	defer func() {
		select {
		case <-exited:
		default:
			syscall.Kill(-srv.Process.Pid, syscall.SIGKILL)
			<-exited
		}
	}()
	base := "http://" + addr
	hc := &http.Client{Timeout: 5 * time.Minute}
	call := func(method, path string, body any, want ...int) []byte {
		t.Helper()
		var rd io.Reader
		if body != nil {
			b, _ := json.Marshal(body)
			rd = bytes.NewReader(b)
		}
		req, _ := http.NewRequest(method, base+path, rd)
		req.Header.Set("X-API-Key", key)
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		t1 := time.Now()
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		t.Logf("%s %s -> %d in %.1fs", method, path, resp.StatusCode, time.Since(t1).Seconds())
		for _, w := range want {
			if resp.StatusCode == w {
				return b
			}
		}
		t.Fatalf("%s %s: %d %s, want %v", method, path, resp.StatusCode, b, want)
		return nil
	}
	t0 = time.Now()
	for {
		resp, err := http.Get(base + "/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode < 300 {
				break
			}
		}
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("server exited before it answered: %v", err)
		case <-time.After(time.Second):
		}
		if time.Since(t0) > 4*time.Minute {
			t.Fatalf("server did not answer GET /health in 4 minutes (last: %v)", err)
		}
	}
	t.Logf("server answers on %s after %.1fs", addr, time.Since(t0).Seconds())

	// 3. A sandbox through the REST API, commands through the proxy.
	type sandbox struct {
		SandboxID       string `json:"sandboxID"`
		EnvdAccessToken string `json:"envdAccessToken"`
		Domain          string `json:"domain"`
	}
	var sb sandbox
	t0 = time.Now()
	if err := json.Unmarshal(call("POST", "/v2/sandboxes", map[string]any{"templateID": "busybox", "timeout": 900}, 201), &sb); err != nil || sb.SandboxID == "" {
		t.Fatalf("create: %+v %v", sb, err)
	}
	t.Logf("sandbox %s created in %.1fs (domain %q, token %v)", sb.SandboxID, time.Since(t0).Seconds(), sb.Domain, sb.EnvdAccessToken != "")
	envd := func(sb sandbox) processconnect.ProcessClient {
		domain := sb.Domain
		if domain == "" {
			domain = "localhost"
		}
		host := fmt.Sprintf("%d-%s.%s", 49983, sb.SandboxID, domain)
		c := &http.Client{Transport: hostRoundTripper{host: host, token: sb.EnvdAccessToken}}
		return processconnect.NewProcessClient(c, base)
	}
	run := func(sb sandbox, script string) string {
		t.Helper()
		t1 := time.Now()
		out, code := runInGuest(t, envd(sb), script)
		t.Logf("ran %q in %.1fs: exit %d, %q", script, time.Since(t1).Seconds(), code, out)
		if code != 0 {
			t.Fatalf("%q: exit %d: %s", script, code, out)
		}
		return out
	}
	if got := run(sb, "cat /etc/cube-vmtest; echo kept-before-pause > /root/paused.txt; sync; echo ok"); got != "cube-vmtest-rootfs-ok\nok\n" {
		t.Fatalf("first command: %q", got)
	}
	// A process that must survive the pause (a memory snapshot, not a
	// cold boot on resume).
	run(sb, "sleep 1000 >/dev/null 2>&1 & echo started")
	pid := strings.TrimSpace(run(sb, "pidof sleep"))
	call("POST", "/sandboxes/"+sb.SandboxID+"/pause", map[string]any{}, 204)
	var info struct {
		State string `json:"state"`
	}
	json.Unmarshal(call("GET", "/sandboxes/"+sb.SandboxID, nil, 200), &info)
	if info.State != "paused" {
		t.Fatalf("after pause: state %q", info.State)
	}
	var sb2 sandbox
	t0 = time.Now()
	if err := json.Unmarshal(call("POST", "/sandboxes/"+sb.SandboxID+"/connect", map[string]any{"timeout": 900}, 200, 201), &sb2); err != nil || sb2.SandboxID != sb.SandboxID {
		t.Fatalf("connect: %+v %v", sb2, err)
	}
	t.Logf("resumed in %.1fs", time.Since(t0).Seconds())
	if sb2.EnvdAccessToken == "" {
		sb2.EnvdAccessToken = sb.EnvdAccessToken
	}
	if got := run(sb2, "cat /root/paused.txt; pidof sleep"); got != "kept-before-pause\n"+pid+"\n" {
		t.Fatalf("after resume: %q, want the file and sleep's pid %s", got, pid)
	}
	if json.Unmarshal(call("GET", "/sandboxes/"+sb.SandboxID, nil, 200), &info); info.State != "running" {
		t.Fatalf("after connect: state %q", info.State)
	}
	// The leftover check below must be able to see VMMs: the sandbox's
	// (and the pool's) are up now and name the data dir.
	// A jailed VMM is the server's child (its launcher exits once the
	// VMM serves) and gets its socket as an fd, so look for both.
	vmms := vmmChildren(srv.Process.Pid)
	for _, p := range usersOf(data) {
		if strings.Contains(p, " vmm") {
			vmms = append(vmms, p)
		}
	}
	if len(vmms) == 0 {
		t.Fatalf("no VMM process (child of the server, or naming the data dir) while a sandbox runs: %q", usersOf(data))
	}
	t.Logf("%d VMM processes up: %q", len(vmms), vmms)
	call("DELETE", "/sandboxes/"+sb.SandboxID, nil, 204)
	call("GET", "/sandboxes/"+sb.SandboxID, nil, 404)

	// 4. SIGTERM: a clean exit and nothing left running.
	t0 = time.Now()
	srv.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		exited <- err
		if err != nil {
			t.Fatalf("server exit after SIGTERM: %v", err)
		}
	case <-time.After(2 * time.Minute):
		t.Fatal("server still running 2 minutes after SIGTERM")
	}
	t.Logf("server stopped in %.1fs", time.Since(t0).Seconds())
	var left []string
	for deadline := time.Now().Add(30 * time.Second); ; {
		if left = usersOf(data); len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	if len(left) > 0 {
		t.Fatalf("processes left after the server stopped: %q", left)
	}
	for _, p := range vmms {
		pid, _ := strconv.Atoi(p[:strings.Index(p, ":")])
		for deadline := time.Now().Add(30 * time.Second); alive(pid); time.Sleep(time.Second) {
			if time.Now().After(deadline) {
				t.Fatalf("VMM left running after the server stopped: %s", p)
			}
		}
	}
}

// vmmChildren lists the VMM processes (`vmm-restore` in their command
// line) whose parent is pid, as "pid: cmdline".
func vmmChildren(pid int) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		st, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so split after ')'.
		i := bytes.LastIndexByte(st, ')')
		f := strings.Fields(string(st[i+1:]))
		if len(f) < 2 || f[1] != strconv.Itoa(pid) {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		cmd := strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
		if strings.Contains(cmd, "vmm-restore") {
			out = append(out, e.Name()+": "+cmd)
		}
	}
	return out
}

// alive reports whether pid runs (a zombie, whose parent is gone and not
// reaping, counts as ended).
func alive(pid int) bool {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(st, ')')
	f := strings.Fields(string(st[i+1:]))
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}

// hostRoundTripper sends every request to the server's listener with the
// sandbox proxy's Host and envd's access token.
type hostRoundTripper struct{ host, token string }

func (h hostRoundTripper) RoundTrip(r *http.Request) (*http.Response, error) {
	r = r.Clone(r.Context())
	r.Host = h.host
	if h.token != "" {
		r.Header.Set("X-Access-Token", h.token)
	}
	return http.DefaultTransport.RoundTrip(r)
}

// writeBusyboxImage writes a one-layer `docker save` tarball of a busybox
// root like test/vmtest/rootfs.sh's (busybox and its applet links, users,
// the marker file /etc/cube-vmtest); the builder injects cube-agent.
func writeBusyboxImage(t *testing.T, path string) {
	t.Helper()
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	list, err := exec.Command("/bin/busybox", "--list-full").Output()
	if err != nil {
		t.Fatalf("busybox --list-full: %v", err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	now := time.Now()
	add := func(h *tar.Header, body []byte) {
		h.ModTime = now
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		tw.Write(body)
	}
	for _, dr := range []string{"bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "run", "root", "home", "mnt", "var"} {
		add(&tar.Header{Typeflag: tar.TypeDir, Name: dr + "/", Mode: 0o755}, nil)
	}
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "tmp/", Mode: 0o1777}, nil)
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "var/tmp/", Mode: 0o1777}, nil)
	add(&tar.Header{Typeflag: tar.TypeDir, Name: "home/user/", Mode: 0o755, Uid: 1000, Gid: 1000}, nil)
	add(&tar.Header{Typeflag: tar.TypeReg, Name: "bin/busybox", Mode: 0o755, Size: int64(len(bb))}, bb)
	seen := map[string]bool{"bin/busybox": true}
	for _, a := range strings.Fields(string(list)) {
		a = strings.TrimPrefix(a, "/")
		if seen[a] || strings.Count(a, "/") == 0 {
			continue
		}
		seen[a] = true
		add(&tar.Header{Typeflag: tar.TypeSymlink, Name: a, Linkname: "/bin/busybox", Mode: 0o777}, nil)
	}
	for f, body := range map[string]string{
		"etc/passwd":      "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
		"etc/group":       "root:x:0:\nuser:x:1000:\n",
		"etc/hostname":    "cube\n",
		"etc/hosts":       "127.0.0.1 localhost\n",
		"etc/cube-vmtest": "cube-vmtest-rootfs-ok\n",
	} {
		add(&tar.Header{Typeflag: tar.TypeReg, Name: f, Mode: 0o644, Size: int64(len(body))}, []byte(body))
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	layerBytes := buf.Bytes()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(layerBytes)), nil })
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.Config(img, v1.Config{Env: []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin"}, WorkingDir: "/root"})
	if err != nil {
		t.Fatal(err)
	}
	ref, err := name.NewTag("cube-vmtest/busybox:latest")
	if err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(path, ref, img); err != nil {
		t.Fatal(err)
	}
}

// usersOf lists the processes (pid and command line) whose command line
// names something under dir: the VMMs of a server whose data dir it is.
func usersOf(dir string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(b, []byte(dir)) {
			continue
		}
		out = append(out, e.Name()+": "+strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " "))
	}
	return out
}

// killUsers SIGKILLs every process usersOf(dir) finds (a cleanup).
func killUsers(t *testing.T, dir string) {
	for _, p := range usersOf(dir) {
		pid, _ := strconv.Atoi(p[:strings.Index(p, ":")])
		t.Logf("killing leftover %s", p)
		syscall.Kill(pid, syscall.SIGKILL)
	}
}

func tail(b []byte, n int) []byte {
	if len(b) > n {
		return b[len(b)-n:]
	}
	return b
}
