//go:build linux

package envd

import (
	"context"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"

	pb "github.com/cubesandbox/cube/proto/process"
)

func TestStartStreamsAndExitCodes(t *testing.T) {
	e := newTestEnv(t, Options{EnvVars: map[string]string{"SANDBOX_VAR": "sv"}})
	for name, c := range map[string]interface {
		Start(context.Context, *connect.Request[pb.StartRequest]) (*connect.ServerStreamForClient[pb.StartResponse], error)
	}{"json": e.proc, "binary": e.bin} {
		t.Run(name, func(t *testing.T) {
			req := bashReq(`echo out; echo err >&2; echo "$SANDBOX_VAR $REQ_VAR $HOME"; exit 3`)
			req.Msg.Process.Envs = map[string]string{"REQ_VAR": "rv"}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			st, err := c.Start(ctx, req)
			if err != nil {
				t.Fatal(err)
			}
			r := collect(t, st, func() *pb.ProcessEvent { return st.Msg().Event })
			if r.events[0] != "start" || r.events[len(r.events)-1] != "end" {
				t.Fatalf("event order %v", r.events)
			}
			if !strings.Contains(r.stdout, "out\n") || !strings.Contains(r.stdout, "sv rv /") || r.stderr != "err\n" {
				t.Fatalf("stdout %q stderr %q", r.stdout, r.stderr)
			}
			if r.end.ExitCode != 3 || !r.end.Exited || r.end.Status != "exit status 3" || r.end.GetError() != "exit status 3" {
				t.Fatalf("end %+v", r.end)
			}
		})
	}
	r := run(t, e.proc, bashReq("true"))
	if r.end.ExitCode != 0 || r.end.Error != nil || !r.end.Exited {
		t.Fatalf("true: %+v", r.end)
	}
}

func TestStartCwdAndBadInput(t *testing.T) {
	e := newTestEnv(t, Options{})
	dir := t.TempDir()
	req := bashReq("pwd")
	req.Msg.Process.Cwd = &dir
	if r := run(t, e.proc, req); strings.TrimSpace(r.stdout) != dir {
		t.Fatalf("pwd = %q want %q", r.stdout, dir)
	}
	bad := "/does/not/exist"
	req = bashReq("pwd")
	req.Msg.Process.Cwd = &bad
	st, err := e.proc.Start(context.Background(), req)
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	if codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("bad cwd: %v", err)
	}
	st, err = e.proc.Start(context.Background(), connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "/no/such/binary"}}))
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	if codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("missing binary: %v", err)
	}
}

func TestBackgroundListKillAndConnect(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tag := "bg1"
	req := bashReq(`for i in $(seq 1 300); do echo tick $i; sleep 0.05; done`)
	req.Msg.Tag = &tag
	st, err := e.proc.Start(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Receive() {
		t.Fatal(st.Err())
	}
	pid := st.Msg().Event.GetStart().GetPid()
	list, err := e.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range list.Msg.Processes {
		if p.Pid == pid && p.GetTag() == tag && p.Config.Cmd == "/bin/bash" {
			found = true
		}
	}
	if !found {
		t.Fatalf("pid %d not in list %v", pid, list.Msg.Processes)
	}
	// A second client attaches by tag and sees live output.
	cctx, ccancel := context.WithTimeout(ctx, 10*time.Second)
	defer ccancel()
	cs, err := e.proc.Connect(cctx, connect.NewRequest(&pb.ConnectRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Tag{Tag: tag}}}))
	if err != nil {
		t.Fatal(err)
	}
	if !cs.Receive() || cs.Msg().Event.GetStart().GetPid() != pid {
		t.Fatalf("connect start: %v", cs.Err())
	}
	if !cs.Receive() || !strings.Contains(string(cs.Msg().Event.GetData().GetStdout()), "tick") {
		t.Fatalf("connect data: %v", cs.Err())
	}
	_, err = e.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{
		Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}, Signal: pb.Signal_SIGNAL_SIGKILL}))
	if err != nil {
		t.Fatal(err)
	}
	var end *pb.ProcessEvent_EndEvent
	for st.Receive() {
		if x := st.Msg().Event.GetEnd(); x != nil {
			end = x
		}
	}
	if end == nil || end.ExitCode != -1 || end.Exited || end.Status != "signal: killed" {
		t.Fatalf("end after kill: %+v (%v)", end, st.Err())
	}
	var cend *pb.ProcessEvent_EndEvent
	for cs.Receive() {
		if x := cs.Msg().Event.GetEnd(); x != nil {
			cend = x
		}
	}
	if cend == nil {
		t.Fatalf("connected stream had no end event: %v", cs.Err())
	}
	waitFor(t, "process gone from list", func() bool {
		l, _ := e.proc.List(ctx, connect.NewRequest(&pb.ListRequest{}))
		return len(l.Msg.Processes) == 0
	})
}

func TestUnknownProcess(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx := context.Background()
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: 999999}}
	_, err := e.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL}))
	if codeOf(err) != connect.CodeNotFound {
		t.Fatalf("signal unknown pid: %v", err)
	}
	_, err = e.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
	if codeOf(err) != connect.CodeNotFound {
		t.Fatalf("input unknown pid: %v", err)
	}
	_, err = e.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel}))
	if codeOf(err) != connect.CodeNotFound {
		t.Fatalf("close unknown pid: %v", err)
	}
	_, err = e.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{}))
	if codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("no selector: %v", err)
	}
	cs, err := e.proc.Connect(ctx, connect.NewRequest(&pb.ConnectRequest{Process: sel}))
	if err == nil {
		for cs.Receive() {
		}
		err = cs.Err()
	}
	if codeOf(err) != connect.CodeNotFound {
		t.Fatalf("connect unknown pid: %v", err)
	}
}

func TestStdinSendAndClose(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tr := true
	st, err := e.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "cat"}, Stdin: &tr}))
	if err != nil {
		t.Fatal(err)
	}
	if !st.Receive() {
		t.Fatal(st.Err())
	}
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: st.Msg().Event.GetStart().Pid}}
	if _, err := e.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("hello\n")}}})); err != nil {
		t.Fatal(err)
	}
	if !st.Receive() || string(st.Msg().Event.GetData().GetStdout()) != "hello\n" {
		t.Fatalf("echo back: %v %v", st.Msg(), st.Err())
	}
	if _, err := e.proc.CloseStdin(ctx, connect.NewRequest(&pb.CloseStdinRequest{Process: sel})); err != nil {
		t.Fatal(err)
	}
	r := collect(t, st, func() *pb.ProcessEvent { return st.Msg().Event })
	if r.end == nil || r.end.ExitCode != 0 {
		t.Fatalf("cat did not end after CloseStdin: %+v", r)
	}
	// stdin: false → input is refused.
	f := false
	st2, err := e.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "sleep", Args: []string{"5"}}, Stdin: &f}))
	if err != nil {
		t.Fatal(err)
	}
	st2.Receive()
	pid := st2.Msg().Event.GetStart().Pid
	sel2 := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
	_, err = e.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel2, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("x")}}}))
	if codeOf(err) != connect.CodeFailedPrecondition {
		t.Fatalf("input without stdin: %v", err)
	}
	e.proc.SendSignal(ctx, connect.NewRequest(&pb.SendSignalRequest{Process: sel2, Signal: pb.Signal_SIGNAL_SIGTERM}))
	r = collect(t, st2, func() *pb.ProcessEvent { return st2.Msg().Event })
	if r.end == nil || r.end.Status != "signal: terminated" {
		t.Fatalf("SIGTERM end: %+v", r.end)
	}
}

func TestPTY(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	st, err := e.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: "/bin/bash", Args: []string{"-i", "-l"}, Envs: map[string]string{"TERM": "xterm-256color", "PS1": "$ "}},
		Pty:     &pb.PTY{Size: &pb.PTY_Size{Cols: 100, Rows: 30}},
	}))
	if err != nil {
		t.Fatal(err)
	}
	if !st.Receive() {
		t.Fatal(st.Err())
	}
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: st.Msg().Event.GetStart().Pid}}
	if _, err := e.proc.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: sel, Pty: &pb.PTY{Size: &pb.PTY_Size{Cols: 123, Rows: 45}}})); err != nil {
		t.Fatal(err)
	}
	in := "stty size; echo $((6*7))X; tty >/dev/null && echo isatty; exit 5\n"
	if _, err := e.proc.SendInput(ctx, connect.NewRequest(&pb.SendInputRequest{Process: sel, Input: &pb.ProcessInput{Input: &pb.ProcessInput_Pty{Pty: []byte(in)}}})); err != nil {
		t.Fatal(err)
	}
	r := collect(t, st, func() *pb.ProcessEvent { return st.Msg().Event })
	for _, want := range []string{"45 123", "42X", "isatty"} {
		if !strings.Contains(r.pty, want) {
			t.Fatalf("pty output lacks %q: %q", want, r.pty)
		}
	}
	if r.stdout != "" || r.end.ExitCode != 5 {
		t.Fatalf("stdout %q end %+v", r.stdout, r.end)
	}
	_, err = e.proc.Update(ctx, connect.NewRequest(&pb.UpdateRequest{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: 999999}}}))
	if codeOf(err) != connect.CodeNotFound {
		t.Fatalf("update unknown: %v", err)
	}
}

func TestConnectTimeoutIsLifetime(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
	defer cancel()
	st, err := e.proc.Start(ctx, bashReq("sleep 30"))
	if err != nil {
		t.Fatal(err)
	}
	if !st.Receive() {
		t.Fatal(st.Err())
	}
	pid := st.Msg().Event.GetStart().Pid
	for st.Receive() {
	}
	if c := codeOf(st.Err()); c != connect.CodeDeadlineExceeded {
		t.Fatalf("want deadline_exceeded, got %v", st.Err())
	}
	waitFor(t, "process killed at its deadline", func() bool { return !pidAlive(pid) })
}

func TestDisconnectKeepsProcessAndServer(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx, cancel := context.WithCancel(context.Background())
	st, err := e.proc.Start(ctx, bashReq("while true; do echo spam; done"))
	if err != nil {
		t.Fatal(err)
	}
	st.Receive()
	pid := st.Msg().Event.GetStart().Pid
	st.Receive()
	cancel() // client goes away mid-stream
	st.Close()
	// The process runs on (no lifetime was given) and other clients work.
	time.Sleep(100 * time.Millisecond)
	if !pidAlive(pid) {
		t.Fatal("process died with its client")
	}
	if r := run(t, e.proc, bashReq("echo ok")); r.stdout != "ok\n" {
		t.Fatalf("server unhealthy after a disconnect: %q", r.stdout)
	}
	sel := &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}
	if _, err := e.proc.SendSignal(context.Background(), connect.NewRequest(&pb.SendSignalRequest{Process: sel, Signal: pb.Signal_SIGNAL_SIGKILL})); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "spammer gone", func() bool { return !pidAlive(pid) })
}

func TestKeepalive(t *testing.T) {
	e := newTestEnv(t, Options{})
	req := bashReq("sleep 1.6")
	req.Header().Set("Keepalive-Ping-Interval", "1")
	r := run(t, e.proc, req)
	if r.keepalive < 1 {
		t.Fatalf("no keepalive: %v", r.events)
	}
}

func TestUsers(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Options{DefaultUser: "root"})
	req := bashReq("id -u; echo $USER $HOME")
	req.Header().Set("Authorization", basic("nobody"))
	r := run(t, e.proc, req)
	nb, err := LookupUser("nobody")
	if err != nil {
		t.Skip("no nobody account")
	}
	if want := fmtUint(nb.UID) + "\nnobody " + nb.Home + "\n"; r.stdout != want {
		t.Fatalf("as nobody: %q want %q", r.stdout, want)
	}
	if r := run(t, e.proc, bashReq("id -u")); r.stdout != "0\n" {
		t.Fatalf("default user: %q", r.stdout)
	}
	req = bashReq("true")
	req.Header().Set("Authorization", basic("no-such-user-xyz"))
	st, err := e.proc.Start(context.Background(), req)
	if err == nil {
		for st.Receive() {
		}
		err = st.Err()
	}
	if codeOf(err) != connect.CodeUnauthenticated {
		t.Fatalf("unknown user: %v", err)
	}
}

func TestStreamInput(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	tr := true
	st, err := e.proc.Start(ctx, connect.NewRequest(&pb.StartRequest{Process: &pb.ProcessConfig{Cmd: "head", Args: []string{"-c", "6"}}, Stdin: &tr}))
	if err != nil {
		t.Fatal(err)
	}
	st.Receive()
	pid := st.Msg().Event.GetStart().Pid
	// Client streaming needs HTTP/2 or the Connect client's half-duplex
	// HTTP/1.1 upload; the httptest client does the latter.
	cs := e.proc.StreamInput(ctx)
	cs.Send(&pb.StreamInputRequest{Event: &pb.StreamInputRequest_Start{Start: &pb.StreamInputRequest_StartEvent{Process: &pb.ProcessSelector{Selector: &pb.ProcessSelector_Pid{Pid: pid}}}}})
	cs.Send(&pb.StreamInputRequest{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("abc")}}}}})
	cs.Send(&pb.StreamInputRequest{Event: &pb.StreamInputRequest_Data{Data: &pb.StreamInputRequest_DataEvent{Input: &pb.ProcessInput{Input: &pb.ProcessInput_Stdin{Stdin: []byte("def")}}}}})
	if _, err := cs.CloseAndReceive(); err != nil {
		t.Fatal(err)
	}
	r := collect(t, st, func() *pb.ProcessEvent { return st.Msg().Event })
	if r.stdout != "abcdef" || r.end.ExitCode != 0 {
		t.Fatalf("stream input: %q %+v", r.stdout, r.end)
	}
}
