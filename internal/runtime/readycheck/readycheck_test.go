//go:build linux

package readycheck

import (
	"context"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/agent/envd"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
)

// agent is a real envd server on loopback (the ready checks run real
// processes through it) and a dialer to it.
func agent(t *testing.T) (*envd.Server, Dial) {
	t.Helper()
	user := "root"
	if os.Geteuid() != 0 {
		user = os.Getenv("USER")
		if _, err := envd.LookupUser(user); err != nil {
			t.Skip("cannot determine the current user")
		}
	}
	s := envd.New(envd.Options{DefaultUser: user})
	ts := httptest.NewServer(s.Handler())
	t.Cleanup(func() { ts.Close(); s.Close() })
	addr := strings.TrimPrefix(ts.URL, "http://")
	return s, func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
}

func sh(script string) []string { return []string{"/bin/sh", "-c", script} }

func start(t *testing.T, s *envd.Server, argv []string) {
	t.Helper()
	if err := s.StartCommand(argv, nil, ""); err != nil {
		t.Fatal(err)
	}
}

func TestNothingToWaitFor(t *testing.T) {
	if err := Wait(context.Background(), func(context.Context) (net.Conn, error) {
		t.Fatal("dialled without a start or ready command")
		return nil, nil
	}, runtime.Template{}); err != nil {
		t.Fatal(err)
	}
}

// The ready command is retried until it exits 0.
func TestReadyAfterRetries(t *testing.T) {
	s, dial := agent(t)
	flag := filepath.Join(t.TempDir(), "ok")
	os.Chmod(filepath.Dir(flag), 0o777)
	argv := sh("sleep 0.5; touch " + flag + "; exec sleep 600")
	start(t, s, argv)
	t0 := time.Now()
	if err := Wait(context.Background(), dial, runtime.Template{StartCmd: argv, ReadyCmd: "test -e " + flag}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(flag); err != nil || time.Since(t0) < 300*time.Millisecond {
		t.Fatalf("ready before the flag existed: %v", err)
	}
	// A ready command alone (no start command) works too.
	if err := Wait(context.Background(), dial, runtime.Template{ReadyCmd: "test -e " + flag}); err != nil {
		t.Fatal(err)
	}
}

// A start command that exits fails the wait with its output, whether a
// ready command is waiting on it or not.
func TestStartExits(t *testing.T) {
	for _, ready := range []string{"", "exit 1"} {
		s, dial := agent(t)
		argv := sh("echo listening failed: address in use; sleep 0.3; exit 7")
		start(t, s, argv)
		err := Wait(context.Background(), dial, runtime.Template{StartCmd: argv, ReadyCmd: ready, ReadyTimeout: 20 * time.Second})
		if !errs.Is(err, errs.FailedPrecondition) || !strings.Contains(err.Error(), "address in use") || !strings.Contains(err.Error(), "exit status 7") {
			t.Fatalf("ready %q: %v", ready, err)
		}
		t.Logf("ready %q: %v", ready, err)
	}
}

func TestStartCannotStart(t *testing.T) {
	s, dial := agent(t)
	argv := []string{"/nonexistent/server"}
	s.StartCommand(argv, nil, "")
	err := Wait(context.Background(), dial, runtime.Template{StartCmd: argv, ReadyCmd: "true"})
	if !errs.Is(err, errs.FailedPrecondition) || !strings.Contains(err.Error(), "/nonexistent/server") || !strings.Contains(err.Error(), "failed") {
		t.Fatalf("%v", err)
	}
}

// A ready command that never succeeds ends at the timeout with its output.
func TestReadyTimeout(t *testing.T) {
	s, dial := agent(t)
	argv := sh("echo server log line; exec sleep 600")
	start(t, s, argv)
	err := Wait(context.Background(), dial, runtime.Template{StartCmd: argv, ReadyCmd: "echo not yet >&2; exit 1", ReadyTimeout: time.Second})
	if !errs.Is(err, errs.Timeout) || !strings.Contains(err.Error(), "not yet") || !strings.Contains(err.Error(), "server log line") {
		t.Fatalf("%v", err)
	}
	t.Log(err)
}

// Without a ready command, a start command that keeps running settles.
func TestSettle(t *testing.T) {
	s, dial := agent(t)
	argv := sh("exec sleep 600")
	start(t, s, argv)
	t0 := time.Now()
	if err := Wait(context.Background(), dial, runtime.Template{StartCmd: argv}); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d < runtime.DefaultSettle {
		t.Fatalf("settled after %v", d)
	}
	if st, err := GetStatus(context.Background(), dial); err != nil || st.State != "running" || st.Pid == 0 {
		t.Fatalf("%+v %v", st, err)
	}
}

// An agent without start command support is a clear error, not a timeout.
func TestOldAgent(t *testing.T) {
	ts := httptest.NewServer(http.NotFoundHandler())
	defer ts.Close()
	addr := strings.TrimPrefix(ts.URL, "http://")
	dial := func(ctx context.Context) (net.Conn, error) { var d net.Dialer; return d.DialContext(ctx, "tcp", addr) }
	err := Wait(context.Background(), dial, runtime.Template{StartCmd: []string{"x"}, ReadyTimeout: 30 * time.Second})
	if !errs.Is(err, errs.FailedPrecondition) || !strings.Contains(err.Error(), "no start command support") {
		t.Fatalf("%v", err)
	}
}

// WhileRunning ends its context when the start command ends, with the
// reason as the cause.
func TestWhileRunning(t *testing.T) {
	s, dial := agent(t)
	start(t, s, sh("echo going away; sleep 0.3; exit 5"))
	ctx, stop := WhileRunning(context.Background(), dial)
	defer stop()
	select {
	case <-ctx.Done():
	case <-time.After(20 * time.Second):
		t.Fatal("context not ended by the exit")
	}
	if err := Ended(ctx); err == nil || !strings.Contains(err.Error(), "going away") || !strings.Contains(err.Error(), "exit status 5") {
		t.Fatalf("cause: %v", err)
	}
	ctx2, stop2 := WhileRunning(context.Background(), dial)
	stop2()
	if Ended(ctx2) != nil {
		t.Fatal("a stopped watch reports an end")
	}
}

// FuzzStatus: whatever the guest answers to GET /start is read safely and
// quoted in bounded error messages.
func FuzzStatus(f *testing.F) {
	f.Add([]byte(`{"cmd":["/bin/sh","-c","x"],"state":"exited","exitCode":3,"error":"exit status 3","log":"boom\n"}`))
	f.Add([]byte(`{"state":"failed","error":"` + strings.Repeat("e", 5000) + `","log":"` + strings.Repeat("l\\n", 3000) + `"}`))
	f.Add([]byte(`{"state":"running","pid":-1}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, body []byte) {
		ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write(body) }))
		defer ts.Close()
		addr := strings.TrimPrefix(ts.URL, "http://")
		dial := func(ctx context.Context) (net.Conn, error) { var d net.Dialer; return d.DialContext(ctx, "tcp", addr) }
		st, err := GetStatus(context.Background(), dial)
		if err != nil {
			return
		}
		if msg := describe(st); len(msg) > 4*maxTail+200 {
			t.Fatalf("message of %d bytes", len(msg))
		}
	})
}

// A ready command the agent cannot run (an image without /bin/sh) fails
// at once, not at the timeout.
func TestReadyCannotRun(t *testing.T) {
	_, dial := agent(t)
	shell = "/nonexistent/sh"
	defer func() { shell = "/bin/sh" }()
	t0 := time.Now()
	err := Wait(context.Background(), dial, runtime.Template{ReadyCmd: "true", ReadyTimeout: time.Minute})
	if !errs.Is(err, errs.FailedPrecondition) || !strings.Contains(err.Error(), "cannot run") || !strings.Contains(err.Error(), "/nonexistent/sh") || time.Since(t0) > 30*time.Second {
		t.Fatalf("%v", err)
	}
	t.Log(err)
}
