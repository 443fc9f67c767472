//go:build linux

package network

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// findRunsc returns runsc from the cube cache or PATH ("" if absent).
func findRunsc() string {
	for _, d := range []string{os.Getenv("CUBE_CACHE_DIR"), "/var/cache/cube"} {
		if d == "" {
			continue
		}
		if p := filepath.Join(d, "bin", "runsc"); fileExists(p) {
			return p
		}
	}
	p, _ := exec.LookPath("runsc")
	return p
}

// findRootfs returns a finished base rootfs with python3 from the cube cache.
func findRootfs() string {
	for _, d := range []string{os.Getenv("CUBE_CACHE_DIR"), "/var/cache/cube"} {
		if d == "" {
			continue
		}
		ms, _ := filepath.Glob(filepath.Join(d, "rootfs", "base-*.done"))
		for _, m := range ms {
			r := strings.TrimSuffix(m, ".done")
			if fileExists(filepath.Join(r, "usr", "bin", "python3")) {
				return r
			}
		}
	}
	return ""
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// runInGVisor runs a python3 one-liner in a gVisor sandbox whose network
// namespace is the slot's guest namespace.
func runInGVisor(t *testing.T, runsc, rootfs, nsPath, code string) (string, error) {
	return runInGVisorDuring(t, runsc, rootfs, nsPath, code, nil)
}

// runInGVisorDuring is runInGVisor calling during (if not nil) while the
// sandbox runs.
func runInGVisorDuring(t *testing.T, runsc, rootfs, nsPath, code string, during func()) (string, error) {
	t.Helper()
	dir := t.TempDir()
	spec := map[string]any{
		"ociVersion": "1.0.2",
		"process": map[string]any{"args": []string{"/usr/bin/python3", "-c", code}, "cwd": "/",
			"env": []string{"PATH=/usr/bin:/bin"}},
		"root":     map[string]any{"path": rootfs, "readonly": true},
		"hostname": "sandbox",
		"mounts": []map[string]any{
			{"destination": "/proc", "type": "proc", "source": "proc"},
			{"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"},
		},
		"linux": map[string]any{"namespaces": []map[string]any{
			{"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "network", "path": nsPath},
		}},
	}
	b, _ := json.Marshal(spec)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	cid := fmt.Sprintf("%s-%d", env.prefix, time.Now().UnixNano())
	root := filepath.Join(dir, "state")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, runsc, "--root="+root, "--network=sandbox", "--ignore-cgroups",
		"--overlay2=none", "run", "--bundle", dir, cid)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Start()
	if err == nil {
		if during != nil {
			during()
		}
		err = cmd.Wait()
	}
	_ = exec.Command(runsc, "--root="+root, "delete", "--force", cid).Run()
	for unix.Unmount(filepath.Join(root, "null-netns"), unix.MNT_DETACH) == nil {
	}
	return out.String(), err
}

// TestGVisorSandboxInSlot runs a real gVisor sandbox in a netns-mode slot:
// its HTTP request reaches the test internet through the slot, and a
// policy change denies it. Skips without runsc or a base rootfs (built by
// mk/runsc.mk and the template builder); TestNetnsSpoofing and
// TestDefaultEgressThroughHostNAT cover the same slot without them.
func TestGVisorSandboxInSlot(t *testing.T) {
	runsc, rootfs := findRunsc(), findRootfs()
	if runsc == "" || rootfs == "" {
		t.Skipf("needs runsc (%q) and a base rootfs with python3 (%q) in the cube cache", runsc, rootfs)
	}
	s := acquire(t, env.nsMgr)
	code := fmt.Sprintf("import urllib.request;print(urllib.request.urlopen('http://%s/',timeout=3).read().decode())", env.inetA)
	out, err := runInGVisor(t, runsc, rootfs, s.NetnsPath, code)
	if err != nil || !strings.Contains(out, "internet ") {
		t.Fatalf("gVisor sandbox egress: %v\n%s", err, out)
	}
	// runsc keeps eth0's address when it exits: a second sandbox in the
	// same slot needs PrepareGuest.
	if err := env.nsMgr.PrepareGuest(s.ID); err != nil {
		t.Fatal(err)
	}
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false)}); err != nil {
		t.Fatal(err)
	}
	before := counter(t, env.nsMgr, s.ID, "cube/egress")
	out, err = runInGVisor(t, runsc, rootfs, s.NetnsPath, code)
	if err == nil || strings.Contains(out, "internet ") {
		t.Fatalf("gVisor sandbox reached the internet with it turned off:\n%s", out)
	}
	if after := counter(t, env.nsMgr, s.ID, "cube/egress"); after <= before {
		t.Errorf("the denied request was not dropped by the policy (counter %d -> %d)", before, after)
	}
	if err := env.nsMgr.PrepareGuest(s.ID); err != nil {
		t.Fatal(err)
	}
	// Ingress: a web server in the gVisor sandbox is reachable through Dial
	// (what the proxy uses), from the router namespace.
	if err := env.nsMgr.SetPolicy(s.ID, Policy{}); err != nil {
		t.Fatal(err)
	}
	server := "import http.server as h\n" +
		"class H(h.BaseHTTPRequestHandler):\n" +
		"  def do_GET(s):\n    s.send_response(200); s.end_headers(); s.wfile.write(b'gvisor sandbox')\n" +
		"  def log_message(s, *a): pass\n" +
		"h.HTTPServer(('0.0.0.0', 8000), H).handle_request()\n"
	var body string
	out, err = runInGVisorDuring(t, runsc, rootfs, s.NetnsPath, server, func() {
		tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return env.nsMgr.Dial(ctx, s.ID, 8000)
		}}
		defer tr.CloseIdleConnections()
		for deadline := time.Now().Add(20 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
			r, err := (&http.Client{Transport: tr, Timeout: 3 * time.Second}).Get("http://sandbox/")
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(r.Body)
			r.Body.Close()
			body = string(b)
			return
		}
	})
	if body != "gvisor sandbox" {
		t.Fatalf("web server in the gVisor sandbox via Dial: got %q (%v)\n%s", body, err, out)
	}
	// Wiping (what Release does before pooling) restores the guest side
	// runsc took over: the next user of the slot has a working eth0.
	sl, err := env.nsMgr.get(s.ID)
	if err != nil {
		t.Fatal(err)
	}
	sl.mu.Lock()
	err = env.nsMgr.wipe(sl)
	sl.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := httpGet(guestNS(t, s), env.url(env.inetA)); err != nil {
		t.Fatalf("slot after gVisor and wipe: %v", err)
	}
}
