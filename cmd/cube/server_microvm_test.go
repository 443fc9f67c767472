//go:build linux

package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/hostinfo"
)

var (
	cubeBinOnce sync.Once
	cubeBin     string
	cubeBinErr  error
)

// builtCube builds this command once per test run (go build's cache makes
// it cheap when nothing changed).
func builtCube(t *testing.T) string {
	t.Helper()
	cubeBinOnce.Do(func() {
		dir, err := os.MkdirTemp("", "cube-bin-")
		if err != nil {
			cubeBinErr = err
			return
		}
		cubeBin = filepath.Join(dir, "cube")
		out, err := exec.Command("go", "build", "-o", cubeBin, ".").CombinedOutput()
		if err != nil {
			cubeBinErr = errors.New(string(out))
		}
	})
	if cubeBinErr != nil {
		t.Fatalf("go build: %v", cubeBinErr)
	}
	return cubeBin
}

func TestMain(m *testing.M) {
	code := m.Run()
	if cubeBin != "" {
		os.RemoveAll(filepath.Dir(cubeBin))
	}
	os.Exit(code)
}

// serverEnv is a clean environment for a test server: no CUBE_* from the
// caller but CUBE_RUNSC, an agent path that does not exist (so no built-in template is
// built: the server logs that and keeps serving).
func serverEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "CUBE_") || strings.HasPrefix(kv, "CUBE_RUNSC=") {
			env = append(env, kv)
		}
	}
	return append(env, append([]string{"CUBE_AGENT=/nonexistent/cube-agent", "CUBE_WARM_POOL_SIZE=0"}, extra...)...)
}

func TestRuntimeName(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	for _, c := range []struct {
		name string
		kind hostinfo.Kind
		want string
	}{
		{"auto", hostinfo.KVMHardware, "microvm"},
		{"", hostinfo.KVMHardware, "microvm"},
		{"auto", hostinfo.KVMPVM, "gvisor"},
		{"auto", hostinfo.NoKVM, "gvisor"},
		{"microvm", hostinfo.KVMPVM, "microvm"},
		{"gvisor", hostinfo.KVMHardware, "gvisor"},
	} {
		if got := runtimeName(c.name, c.kind, log); got != c.want {
			t.Errorf("runtimeName(%q, %s) = %s, want %s", c.name, c.kind, got, c.want)
		}
	}
	for _, n := range []string{"gvisor", "microvm"} {
		if runtimeFactories[n] == nil {
			t.Errorf("runtime %s not registered", n)
		}
	}
}

func TestServerKernel(t *testing.T) {
	cache := t.TempDir()
	c := config.Default()
	c.CacheDir, c.KernelPath = cache, ""
	if _, err := serverKernel(c); errs.KindOf(err) != errs.FailedPrecondition || !strings.Contains(err.Error(), "make kernel") {
		t.Fatalf("no kernel: %v", err)
	}
	old, newer := filepath.Join(cache, "kernel", "aaa", "bzImage"), filepath.Join(cache, "kernel", "bbb", "bzImage")
	for i, p := range []string{newer, old} {
		os.MkdirAll(filepath.Dir(p), 0o755)
		os.WriteFile(p, []byte("k"), 0o644)
		ts := time.Now().Add(time.Duration(-i) * time.Hour)
		os.Chtimes(p, ts, ts)
	}
	if k, err := serverKernel(c); err != nil || k != newer {
		t.Fatalf("newest kernel: %q %v", k, err)
	}
	c.KernelPath = filepath.Join(cache, "missing")
	if _, err := serverKernel(c); errs.KindOf(err) != errs.FailedPrecondition || !strings.Contains(err.Error(), "make kernel") {
		t.Fatalf("missing configured kernel: %v", err)
	}
	c.KernelPath = old
	if k, err := serverKernel(c); err != nil || k != old {
		t.Fatalf("configured kernel: %q %v", k, err)
	}
}

// TestServerMicroVMFailsFast runs the built binary with --runtime microvm:
// on a host without hardware KVM it must exit 1 at once, naming the host
// kind, and listen on nothing.
func TestServerMicroVMFailsFast(t *testing.T) {
	kind := (hostinfo.Probe{}).Kind()
	if kind == hostinfo.KVMHardware {
		t.Skip("hardware KVM: `cube server --runtime microvm` starts here (covered inside make vmtest)")
	}
	bin := builtCube(t)
	data := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, args := range [][]string{
		{"server", "--runtime", "microvm", "--data-dir", data, "--listen", "127.0.0.1:0"},
		{"server", "--data-dir", data, "--listen", "127.0.0.1:0"}, // config runtime=microvm
	} {
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = serverEnv()
		if len(args) == 5 {
			cmd.Env = append(cmd.Env, "CUBE_RUNTIME=microvm")
		}
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ExitCode() != 1 {
			t.Fatalf("%v: want exit code 1, got %v\nstderr: %s", args, err, stderr.String())
		}
		msg := stderr.String()
		for _, want := range []string{"cube: ", "microvm runtime needs hardware KVM", "this host is " + string(kind), "--runtime gvisor"} {
			if !strings.Contains(msg, want) {
				t.Errorf("%v: stderr lacks %q:\n%s", args, want, msg)
			}
		}
		if strings.Contains(stdout.String(), "E2B_API_URL") {
			t.Errorf("%v: printed exports although it failed: %s", args, stdout.String())
		}
	}
}

// TestServerAutoPicksGvisor runs the built binary with the default runtime
// (auto) on a host without hardware KVM: it must choose gvisor and serve.
func TestServerAutoPicksGvisor(t *testing.T) {
	if (hostinfo.Probe{}).Kind() == hostinfo.KVMHardware {
		t.Skip("hardware KVM: auto picks microvm here (TestRuntimeName)")
	}
	bin := builtCube(t)
	data := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "server", "--data-dir", data, "--listen", "127.0.0.1:0", "--network-slots=false")
	cmd.Env = serverEnv()
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stdout bytes.Buffer
	cmd.Stdout = &stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	var log []string
	picked := ""
	for picked == "" {
		l, ok := <-lines
		if !ok {
			break
		}
		log = append(log, l)
		if strings.Contains(l, "msg=runtime ") {
			picked = l
		}
		if strings.Contains(l, "cube: runsc not found") {
			picked = "gvisor (runsc missing: " + l + ")"
		}
	}
	// Stop it (SIGTERM: a clean shutdown) and wait.
	go func() { done <- cmd.Wait() }()
	syscall.Kill(cmd.Process.Pid, syscall.SIGTERM)
	go func() {
		for range lines {
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		<-done
		t.Errorf("server did not stop on SIGTERM")
	}
	if !strings.Contains(picked, "gvisor") || strings.Contains(picked, "microvm") {
		t.Fatalf("auto did not pick gvisor: %q\n%s", picked, strings.Join(log, "\n"))
	}
	t.Logf("picked: %s", picked)
}
