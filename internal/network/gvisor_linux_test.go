//go:build linux

package network

import (
	"context"
	"encoding/json"
	"fmt"
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
	out, err := cmd.CombinedOutput()
	_ = exec.Command(runsc, "--root="+root, "delete", "--force", cid).Run()
	for unix.Unmount(filepath.Join(root, "null-netns"), unix.MNT_DETACH) == nil {
	}
	return string(out), err
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
	if err := env.nsMgr.SetPolicy(s.ID, Policy{AllowInternetAccess: Bool(false)}); err != nil {
		t.Fatal(err)
	}
	out, err = runInGVisor(t, runsc, rootfs, s.NetnsPath, code)
	if err == nil || strings.Contains(out, "internet ") {
		t.Fatalf("gVisor sandbox reached the internet with it turned off:\n%s", out)
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
