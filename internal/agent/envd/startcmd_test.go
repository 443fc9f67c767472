//go:build linux

package envd

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/cubesandbox/cube/proto/process"
)

func startJSON(argv ...string) string {
	b, _ := json.Marshal(argv)
	return string(b)
}

func (e *testEnv) postInit(t *testing.T, body map[string]any) int {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(e.ts.URL+"/init", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func (e *testEnv) startStatus(t *testing.T) StartStatus {
	t.Helper()
	resp, err := http.Get(e.ts.URL + "/start")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st StartStatus
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /start: HTTP %d", resp.StatusCode)
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	return st
}

func waitExited(t *testing.T, s *Server) {
	t.Helper()
	ch := s.startExited()
	if ch == nil {
		t.Fatal("no start command")
	}
	select {
	case <-ch:
	case <-time.After(10 * time.Second):
		t.Fatal("start command did not end")
	}
}

func TestParseStartCmd(t *testing.T) {
	good, err := ParseStartCmd(`["/bin/sh","-c","echo hi"]`)
	if err != nil || len(good) != 3 || good[2] != "echo hi" {
		t.Fatalf("good: %q %v", good, err)
	}
	for _, bad := range []string{``, `"/bin/sh"`, `[]`, `[""]`, `{"cmd":"x"}`, `[1,2]`, `["a\u0000b"]`, `["x"` + strings.Repeat(" ", maxStartCmdBytes) + `]`, `null`} {
		if argv, err := ParseStartCmd(bad); err == nil {
			t.Errorf("%.40q accepted as %q", bad, argv)
		}
	}
}

// The start command given by /init runs once, with the template's env and
// workdir, in the process list under its tag, its output in GET /start;
// a later /init (as after a snapshot restore) does not start it again.
func TestStartCommandOnceFromInit(t *testing.T) {
	e := newTestEnv(t, Options{})
	dir := t.TempDir()
	script := `echo "hello $FOO from $(pwd)"; echo oops >&2; exec sleep 600`
	if code := e.postInit(t, map[string]any{
		"envVars":        map[string]string{"FOO": "bar", StartCmdEnv: startJSON("/bin/sh", "-c", script)},
		"defaultWorkdir": dir,
	}); code != http.StatusNoContent {
		t.Fatalf("init: HTTP %d", code)
	}
	var st StartStatus
	waitFor(t, "start command output", func() bool {
		st = e.startStatus(t)
		return strings.Contains(st.Log, "oops")
	})
	if st.State != StartRunning || st.Pid == 0 || !pidAlive(st.Pid) || !strings.Contains(st.Log, "hello bar from "+dir) || st.Cmd[0] != "/bin/sh" {
		t.Fatalf("status: %+v", st)
	}
	if _, ok := e.srv.EnvVars()[StartCmdEnv]; ok {
		t.Fatal("the start command leaked into the sandbox env vars")
	}
	ctx := context.Background()
	list, err := e.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil || len(list.Msg.Processes) != 1 || list.Msg.Processes[0].GetTag() != StartCmdTag || list.Msg.Processes[0].Pid != st.Pid {
		t.Fatalf("list: %v %v", list, err)
	}

	// The restart guard: a restored agent gets /init again, maybe naming
	// the command (or another); it keeps the one it runs.
	if code := e.postInit(t, map[string]any{"envVars": map[string]string{StartCmdEnv: startJSON("/bin/sh", "-c", "echo second; sleep 600"), "X": "1"}}); code != http.StatusNoContent {
		t.Fatalf("second init: HTTP %d", code)
	}
	if code := e.postInit(t, map[string]any{"envVars": map[string]string{StartCmdEnv: "not json"}}); code != http.StatusNoContent {
		t.Fatalf("init with a junk start command after the start: HTTP %d", code)
	}
	if err := e.srv.StartCommand([]string{"/bin/sh", "-c", script}, nil, ""); err != nil {
		t.Fatalf("same command again: %v", err)
	}
	if err := e.srv.StartCommand([]string{"/bin/true"}, nil, ""); err == nil {
		t.Fatal("another command started beside the first")
	}
	list, _ = e.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if st2 := e.startStatus(t); st2.Pid != st.Pid || st2.State != StartRunning || strings.Contains(st2.Log, "second") || len(list.Msg.Processes) != 1 {
		t.Fatalf("started again: %+v, %d processes", st2, len(list.Msg.Processes))
	}
	if e.srv.EnvVars()["X"] != "1" {
		t.Fatal("the rest of the second /init was not applied")
	}

	// It is an ordinary process: SendSignal by tag stops it.
	if _, err := e.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{
		Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: StartCmdTag}}, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
		t.Fatal(err)
	}
	waitExited(t, e.srv)
	if st := e.startStatus(t); st.State != StartExited || st.Error != "signal: killed" || st.EndedAt.IsZero() {
		t.Fatalf("after kill: %+v", st)
	}
}

// A start command that exits is reported with its exit code and output.
func TestStartCommandExit(t *testing.T) {
	var logBuf syncBuffer
	e := newTestEnv(t, Options{Logger: slog.New(slog.NewTextHandler(&logBuf, nil))})
	if err := e.srv.StartCommand([]string{"/bin/sh", "-c", "echo boom; exit 3"}, map[string]string{"A": "b"}, ""); err != nil {
		t.Fatal(err)
	}
	waitExited(t, e.srv)
	st := e.startStatus(t)
	if st.State != StartExited || st.ExitCode != 3 || !strings.Contains(st.Log, "boom") || st.Error != "exit status 3" {
		t.Fatalf("status: %+v", st)
	}
	if l := logBuf.String(); !strings.Contains(l, "level=ERROR") || !strings.Contains(l, `msg="start command exited"`) || !strings.Contains(l, "exitCode=3") || !strings.Contains(l, "boom") {
		t.Fatalf("agent log: %s", l)
	}
	// An exited command is not restarted by a later /init either.
	e.postInit(t, map[string]any{"envVars": map[string]string{StartCmdEnv: startJSON("/bin/sh", "-c", "echo boom; exit 3")}})
	if st2 := e.startStatus(t); st2.Pid != st.Pid || st2.State != StartExited {
		t.Fatalf("restarted: %+v", st2)
	}
}

// Commands that cannot start, and bad start commands in /init.
func TestStartCommandBadArgv(t *testing.T) {
	e := newTestEnv(t, Options{})
	if st := e.startStatus(t); st.State != StartNone {
		t.Fatalf("fresh agent: %+v", st)
	}
	for _, bad := range []string{`"x"`, `[]`, `[""]`, `["a\u0000"]`} {
		if code := e.postInit(t, map[string]any{"envVars": map[string]string{StartCmdEnv: bad}}); code != http.StatusBadRequest {
			t.Fatalf("init with start command %s: HTTP %d", bad, code)
		}
	}
	if st := e.startStatus(t); st.State != StartNone {
		t.Fatalf("a refused /init changed the state: %+v", st)
	}
	var logBuf syncBuffer
	e.srv.log = slog.New(slog.NewTextHandler(&logBuf, nil))
	if err := e.srv.StartCommand([]string{"/nonexistent/server", "--port", "1"}, nil, ""); err == nil {
		t.Fatal("missing binary started")
	}
	waitExited(t, e.srv)
	st := e.startStatus(t)
	if st.State != StartFailed || !strings.Contains(st.Error, "/nonexistent/server") || st.Pid != 0 {
		t.Fatalf("status: %+v", st)
	}
	if l := logBuf.String(); !strings.Contains(l, "level=ERROR") || !strings.Contains(l, "cannot be started") || !strings.Contains(l, "no such file") {
		t.Fatalf("agent log: %s", l)
	}

	e2 := newTestEnv(t, Options{})
	if err := e2.srv.StartCommand([]string{"/bin/true"}, nil, "/nonexistent-dir"); err == nil {
		t.Fatal("missing workdir accepted")
	}
	if st := e2.startStatus(t); st.State != StartFailed || !strings.Contains(st.Error, "nonexistent-dir") {
		t.Fatalf("status: %+v", st)
	}

	e3 := newTestEnv(t, Options{})
	e3.srv.StartCommandFailed(errString("bad CUBE_START_CMD"))
	if st := e3.startStatus(t); st.State != StartFailed || st.Error != "bad CUBE_START_CMD" {
		t.Fatalf("status: %+v", st)
	}
}

type errString string

func (e errString) Error() string { return string(e) }

// The kept log is the tail, bounded.
func TestStartLogBounded(t *testing.T) {
	e := newTestEnv(t, Options{})
	// 200 KiB of numbered lines, then exit.
	if err := e.srv.StartCommand([]string{"/bin/sh", "-c", `i=0; while [ $i -lt 20000 ]; do echo "line $i ........"; i=$((i+1)); done`}, nil, ""); err != nil {
		t.Fatal(err)
	}
	waitExited(t, e.srv)
	st := e.startStatus(t)
	if len(st.Log) != StartLogBytes || !strings.HasSuffix(st.Log, "line 19999 ........\n") || strings.Contains(st.Log, "line 0 ") {
		t.Fatalf("log of %d bytes, tail %q", len(st.Log), st.Log[max(0, len(st.Log)-40):])
	}
}

func FuzzRing(f *testing.F) {
	f.Add([]byte("hello"), 3, 70000)
	f.Add([]byte{}, 0, 0)
	f.Add(bytes.Repeat([]byte("x"), 100), 700, 1)
	f.Fuzz(func(t *testing.T, chunk []byte, n, big int) {
		n, big = n%1000, big%(3*StartLogBytes)
		if n < 0 || big < 0 {
			return
		}
		var r ring
		var all []byte
		for i := 0; i < n; i++ {
			r.write(chunk)
			all = append(all, chunk...)
		}
		tail := bytes.Repeat([]byte{'y'}, big)
		r.write(tail)
		all = append(all, tail...)
		want := all[max(0, len(all)-StartLogBytes):]
		if got := r.String(); got != string(want) {
			t.Fatalf("ring: %d bytes, want %d", len(got), len(want))
		}
	})
}

func FuzzParseStartCmd(f *testing.F) {
	for _, s := range []string{`["/bin/sh","-c","x"]`, `[]`, `[""]`, `null`, `["a\u0000"]`, `[1]`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		argv, err := ParseStartCmd(s)
		if err != nil {
			return
		}
		if len(argv) == 0 || argv[0] == "" {
			t.Fatalf("accepted %q as %q", s, argv)
		}
		for _, a := range argv {
			if strings.IndexByte(a, 0) >= 0 {
				t.Fatalf("NUL accepted in %q", s)
			}
		}
	})
}

// syncBuffer is a bytes.Buffer safe for the logger's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}
