//go:build linux

package envd

import (
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"connectrpc.com/connect"
	"github.com/creack/pty"
	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/agent/reaper"
	"github.com/cubesandbox/cube/internal/errs"
	pb "github.com/cubesandbox/cube/proto/process"
)

// defaultKeepalive is the keepalive period when the client sends no
// Keepalive-Ping-Interval header.
const defaultKeepalive = 50 * time.Second

// proc is one process started through Start.
type proc struct {
	pid  uint32
	tag  *string
	cfg  *pb.ProcessConfig
	cmd  *exec.Cmd
	ptyf *os.File // PTY master, nil without a PTY

	inMu  sync.Mutex
	stdin *os.File // write end of stdin, nil when closed or absent

	mu   sync.Mutex
	subs map[*subscriber]struct{}
	end  *pb.ProcessEvent_EndEvent // set once the process is finished
	done chan struct{}
}

type subscriber struct {
	ch   chan *pb.ProcessEvent
	quit chan struct{}
}

func (p *proc) subscribe() (*subscriber, *pb.ProcessEvent_EndEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.end != nil {
		return nil, p.end
	}
	s := &subscriber{ch: make(chan *pb.ProcessEvent, 256), quit: make(chan struct{})}
	p.subs[s] = struct{}{}
	return s, nil
}

func (p *proc) unsubscribe(s *subscriber) {
	if s == nil {
		return
	}
	close(s.quit)
	p.mu.Lock()
	delete(p.subs, s)
	p.mu.Unlock()
}

// broadcast hands ev to every subscriber; a slow subscriber slows the
// process's output (back pressure) but a gone one never blocks it.
func (p *proc) broadcast(ev *pb.ProcessEvent) {
	p.mu.Lock()
	subs := make([]*subscriber, 0, len(p.subs))
	for s := range p.subs {
		subs = append(subs, s)
	}
	if e, ok := ev.Event.(*pb.ProcessEvent_End); ok {
		p.end = e.End
	}
	p.mu.Unlock()
	for _, s := range subs {
		select {
		case s.ch <- ev:
		case <-s.quit:
		}
	}
}

// signal sends sig to the process's group (Start puts every process in
// its own group or session), falling back to the process alone.
func (p *proc) signal(sig syscall.Signal) error {
	if err := unix.Kill(-int(p.pid), sig); err == nil {
		return nil
	}
	return unix.Kill(int(p.pid), sig)
}

func (p *proc) info() *pb.ProcessInfo {
	return &pb.ProcessInfo{Config: p.cfg, Pid: p.pid, Tag: p.tag}
}

type processTable struct {
	mu    sync.Mutex
	procs map[uint32]*proc
}

func newProcessTable() *processTable { return &processTable{procs: map[uint32]*proc{}} }

func (t *processTable) add(p *proc) {
	t.mu.Lock()
	t.procs[p.pid] = p
	t.mu.Unlock()
}

func (t *processTable) remove(p *proc) {
	t.mu.Lock()
	if t.procs[p.pid] == p {
		delete(t.procs, p.pid)
	}
	t.mu.Unlock()
}

func (t *processTable) get(sel *pb.ProcessSelector) (*proc, error) {
	if sel == nil {
		return nil, errs.E(errs.InvalidArgument, "process selector is required")
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	switch s := sel.Selector.(type) {
	case *pb.ProcessSelector_Pid:
		if p, ok := t.procs[s.Pid]; ok {
			return p, nil
		}
		return nil, errs.E(errs.NotFound, "process with pid %d not found", s.Pid)
	case *pb.ProcessSelector_Tag:
		for _, p := range t.procs {
			if p.tag != nil && *p.tag == s.Tag {
				return p, nil
			}
		}
		return nil, errs.E(errs.NotFound, "process with tag %q not found", s.Tag)
	}
	return nil, errs.E(errs.InvalidArgument, "process selector is empty")
}

func (t *processTable) list() []*proc {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]*proc, 0, len(t.procs))
	for _, p := range t.procs {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].pid < out[j].pid })
	return out
}

func (t *processTable) killAll() {
	for _, p := range t.list() {
		_ = p.signal(syscall.SIGKILL)
	}
	for _, p := range t.list() {
		select {
		case <-p.done:
		case <-time.After(2 * time.Second):
		}
	}
}

type processService struct {
	s *Server
}

// buildEnv is PATH, HOME, USER, LOGNAME, then the sandbox env vars, then
// the request's envs (last wins).
func (s *Server) buildEnv(u *User, req map[string]string) []string {
	m := map[string]string{}
	path := os.Getenv("PATH")
	if path == "" {
		path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	}
	m["PATH"] = path
	m["HOME"] = u.Home
	m["USER"] = u.Name
	m["LOGNAME"] = u.Name
	for k, v := range s.envVars() {
		m[k] = v
	}
	for k, v := range req {
		m[k] = v
	}
	out := make([]string, 0, len(m))
	for k, v := range m {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.IndexByte(v, 0) >= 0 {
			continue
		}
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}

// workdir resolves the cwd of a new process.
func (s *Server) processDir(u *User, cwd *string) (string, error) {
	dir := ""
	switch {
	case cwd != nil && *cwd != "":
		dir = *cwd
	default:
		s.mu.RLock()
		dir = s.workdir
		s.mu.RUnlock()
	}
	if dir == "" {
		dir = u.Home
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return "/", nil
		}
	}
	p, err := resolvePath(dir, u)
	if err != nil {
		return "", err
	}
	st, err := os.Stat(p)
	if err != nil || !st.IsDir() {
		return "", errs.E(errs.InvalidArgument, "cwd %q does not exist or is not a directory", p)
	}
	return p, nil
}

// parseTimeout reads Connect-Timeout-Ms: envd uses it as the lifetime of
// the process (0 / absent = unbounded).
func parseTimeout(h string) time.Duration {
	if h == "" {
		return 0
	}
	ms, err := strconv.ParseInt(h, 10, 64)
	if err != nil || ms <= 0 {
		return 0
	}
	return time.Duration(ms) * time.Millisecond
}

func keepaliveInterval(h string) time.Duration {
	if n, err := strconv.Atoi(h); err == nil && n > 0 {
		return time.Duration(n) * time.Second
	}
	return defaultKeepalive
}

// start launches a process and registers it; the returned subscriber has
// seen every event since before the first byte of output.
func (s *Server) start(req *pb.StartRequest, u *User, lifetime time.Duration) (*proc, *subscriber, error) {
	cfg := req.GetProcess()
	if cfg == nil || cfg.Cmd == "" {
		return nil, nil, errs.E(errs.InvalidArgument, "process.cmd is required")
	}
	if strings.IndexByte(cfg.Cmd, 0) >= 0 {
		return nil, nil, errs.E(errs.InvalidArgument, "process.cmd contains a NUL byte")
	}
	for _, a := range cfg.Args {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, nil, errs.E(errs.InvalidArgument, "process.args contains a NUL byte")
		}
	}
	dir, err := s.processDir(u, cfg.Cwd)
	if err != nil {
		return nil, nil, err
	}
	cmd := exec.Command(cfg.Cmd, cfg.Args...)
	if filepath.Base(cfg.Cmd) == cfg.Cmd {
		if lp, err := exec.LookPath(cfg.Cmd); err == nil {
			cmd.Path = lp
			cmd.Err = nil
		}
	}
	if cmd.Err != nil {
		return nil, nil, errs.Wrap(errs.InvalidArgument, cmd.Err, "command %q not found", cfg.Cmd)
	}
	cmd.Env = s.buildEnv(u, cfg.Envs)
	cmd.Dir = dir
	attr := &syscall.SysProcAttr{Credential: u.Credential(), Pdeathsig: 0}

	p := &proc{cfg: cfg, tag: req.Tag, cmd: cmd, subs: map[*subscriber]struct{}{}, done: make(chan struct{})}
	var readers []*os.File
	var childEnds []*os.File
	closeAll := func() {
		for _, f := range append(readers, childEnds...) {
			f.Close()
		}
	}

	if ptyReq := req.GetPty(); ptyReq != nil {
		sz := &pty.Winsize{Cols: 80, Rows: 24}
		if ps := ptyReq.GetSize(); ps != nil && ps.Cols > 0 && ps.Rows > 0 {
			sz = &pty.Winsize{Cols: uint16(min(ps.Cols, 65535)), Rows: uint16(min(ps.Rows, 65535))}
		}
		var f *os.File
		err := reaper.Start(cmd, func() (err error) { f, err = pty.StartWithAttrs(cmd, sz, attr); return err })
		if err != nil {
			return nil, nil, errs.Wrap(errs.InvalidArgument, err, "start %s", cfg.Cmd)
		}
		p.ptyf = f
		readers = append(readers, f)
	} else {
		attr.Setpgid = true
		cmd.SysProcAttr = attr
		outR, outW, err := os.Pipe()
		if err != nil {
			return nil, nil, errs.Wrap(errs.Internal, err, "pipe")
		}
		errR, errW, err := os.Pipe()
		if err != nil {
			outR.Close()
			outW.Close()
			return nil, nil, errs.Wrap(errs.Internal, err, "pipe")
		}
		readers = append(readers, outR, errR)
		childEnds = append(childEnds, outW, errW)
		cmd.Stdout, cmd.Stderr = outW, errW
		if req.Stdin == nil || *req.Stdin {
			inR, inW, err := os.Pipe()
			if err != nil {
				closeAll()
				return nil, nil, errs.Wrap(errs.Internal, err, "pipe")
			}
			childEnds = append(childEnds, inR)
			cmd.Stdin = inR
			p.stdin = inW
		}
		if err := reaper.Start(cmd, cmd.Start); err != nil {
			closeAll()
			if p.stdin != nil {
				p.stdin.Close()
			}
			return nil, nil, errs.Wrap(errs.InvalidArgument, err, "start %s", cfg.Cmd)
		}
		for _, f := range childEnds {
			f.Close()
		}
	}
	p.pid = uint32(cmd.Process.Pid)
	sub, _ := p.subscribe()
	s.procs.add(p)

	var wg sync.WaitGroup
	for i, r := range readers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.pump(r, i, p.ptyf != nil)
		}()
	}
	var timer *time.Timer
	if lifetime > 0 {
		timer = time.AfterFunc(lifetime, func() { _ = p.signal(syscall.SIGKILL) })
	}
	go func() {
		werr := cmd.Wait()
		reaper.Done(cmd.Process.Pid)
		if timer != nil {
			timer.Stop()
		}
		// Output still buffered in the pipes is read; a grandchild that
		// keeps the pipe open does not hold the end event back.
		grace := time.Now().Add(300 * time.Millisecond)
		for _, r := range readers {
			_ = r.SetReadDeadline(grace)
		}
		wg.Wait()
		for _, r := range readers {
			r.Close()
		}
		p.inMu.Lock()
		if p.stdin != nil {
			p.stdin.Close()
			p.stdin = nil
		}
		p.inMu.Unlock()
		s.procs.remove(p)
		p.broadcast(&pb.ProcessEvent{Event: &pb.ProcessEvent_End{End: endEvent(cmd.ProcessState, werr)}})
		close(p.done)
	}()
	return p, sub, nil
}

func endEvent(st *os.ProcessState, werr error) *pb.ProcessEvent_EndEvent {
	ev := &pb.ProcessEvent_EndEvent{}
	if st == nil {
		msg := "unknown"
		if werr != nil {
			msg = werr.Error()
		}
		ev.ExitCode = -1
		ev.Status = msg
		ev.Error = &msg
		return ev
	}
	ws, _ := st.Sys().(syscall.WaitStatus)
	ev.Status = st.String()
	switch {
	case ws.Exited():
		ev.Exited = true
		ev.ExitCode = int32(ws.ExitStatus())
		if ev.ExitCode != 0 {
			ev.Error = &ev.Status
		}
	default:
		ev.ExitCode = -1
		ev.Error = &ev.Status
	}
	return ev
}

// pump reads one output stream and broadcasts data events.
func (p *proc) pump(r *os.File, idx int, isPTY bool) {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			b := make([]byte, n)
			copy(b, buf[:n])
			d := &pb.ProcessEvent_DataEvent{}
			switch {
			case isPTY:
				d.Output = &pb.ProcessEvent_DataEvent_Pty{Pty: b}
			case idx == 0:
				d.Output = &pb.ProcessEvent_DataEvent_Stdout{Stdout: b}
			default:
				d.Output = &pb.ProcessEvent_DataEvent_Stderr{Stderr: b}
			}
			p.broadcast(&pb.ProcessEvent{Event: &pb.ProcessEvent_Data{Data: d}})
		}
		if err != nil {
			return
		}
	}
}

// stream forwards a subscriber's events to a client stream until the end
// event (returned nil) or the client leaves.
func stream(ctx context.Context, sub *subscriber, keepalive time.Duration, send func(*pb.ProcessEvent) error) error {
	t := time.NewTicker(keepalive)
	defer t.Stop()
	for {
		select {
		case ev := <-sub.ch:
			if err := send(ev); err != nil {
				return err
			}
			if _, ok := ev.Event.(*pb.ProcessEvent_End); ok {
				return nil
			}
			t.Reset(keepalive)
		case <-t.C:
			if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Keepalive{Keepalive: &pb.ProcessEvent_KeepAlive{}}}); err != nil {
				return err
			}
		case <-ctx.Done():
			if errors.Is(ctx.Err(), context.DeadlineExceeded) {
				return connect.NewError(connect.CodeDeadlineExceeded, errorString("command timed out"))
			}
			return connect.NewError(connect.CodeCanceled, ctx.Err())
		}
	}
}

func (ps *processService) Start(ctx context.Context, req *connect.Request[pb.StartRequest], st *connect.ServerStream[pb.StartResponse]) error {
	u, err := ps.s.userFromHeader(req.Header())
	if err != nil {
		return connectErr(err)
	}
	p, sub, err := ps.s.start(req.Msg, u, parseTimeout(req.Header().Get("Connect-Timeout-Ms")))
	if err != nil {
		return connectErr(err)
	}
	defer p.unsubscribe(sub)
	send := func(ev *pb.ProcessEvent) error { return st.Send(&pb.StartResponse{Event: ev}) }
	if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}); err != nil {
		return err
	}
	return stream(ctx, sub, keepaliveInterval(req.Header().Get("Keepalive-Ping-Interval")), send)
}

func (ps *processService) Connect(ctx context.Context, req *connect.Request[pb.ConnectRequest], st *connect.ServerStream[pb.ConnectResponse]) error {
	p, err := ps.s.procs.get(req.Msg.GetProcess())
	if err != nil {
		return connectErr(err)
	}
	sub, end := p.subscribe()
	if end != nil {
		return connectErr(errs.E(errs.NotFound, "process with pid %d not found", p.pid))
	}
	defer p.unsubscribe(sub)
	send := func(ev *pb.ProcessEvent) error { return st.Send(&pb.ConnectResponse{Event: ev}) }
	if err := send(&pb.ProcessEvent{Event: &pb.ProcessEvent_Start{Start: &pb.ProcessEvent_StartEvent{Pid: p.pid}}}); err != nil {
		return err
	}
	return stream(ctx, sub, keepaliveInterval(req.Header().Get("Keepalive-Ping-Interval")), send)
}

func (ps *processService) List(ctx context.Context, req *connect.Request[pb.ListRequest]) (*connect.Response[pb.ListResponse], error) {
	out := &pb.ListResponse{}
	for _, p := range ps.s.procs.list() {
		out.Processes = append(out.Processes, p.info())
	}
	return connect.NewResponse(out), nil
}

func (ps *processService) Update(ctx context.Context, req *connect.Request[pb.UpdateRequest]) (*connect.Response[pb.UpdateResponse], error) {
	p, err := ps.s.procs.get(req.Msg.GetProcess())
	if err != nil {
		return nil, connectErr(err)
	}
	if sz := req.Msg.GetPty().GetSize(); sz != nil {
		if p.ptyf == nil {
			return nil, connectErr(errs.E(errs.FailedPrecondition, "process %d has no PTY", p.pid))
		}
		if sz.Cols == 0 || sz.Rows == 0 || sz.Cols > 65535 || sz.Rows > 65535 {
			return nil, connectErr(errs.E(errs.InvalidArgument, "invalid PTY size %dx%d", sz.Cols, sz.Rows))
		}
		if err := pty.Setsize(p.ptyf, &pty.Winsize{Cols: uint16(sz.Cols), Rows: uint16(sz.Rows)}); err != nil {
			return nil, connectErr(errs.Wrap(errs.Internal, err, "resize PTY"))
		}
	}
	return connect.NewResponse(&pb.UpdateResponse{}), nil
}

func (p *proc) write(in *pb.ProcessInput) error {
	switch v := in.GetInput().(type) {
	case *pb.ProcessInput_Pty:
		if p.ptyf == nil {
			return errs.E(errs.FailedPrecondition, "process %d has no PTY", p.pid)
		}
		_, err := p.ptyf.Write(v.Pty)
		return errs.Wrap(errs.FailedPrecondition, err, "write to PTY of process %d", p.pid)
	case *pb.ProcessInput_Stdin:
		if p.ptyf != nil {
			_, err := p.ptyf.Write(v.Stdin)
			return errs.Wrap(errs.FailedPrecondition, err, "write to PTY of process %d", p.pid)
		}
		p.inMu.Lock()
		defer p.inMu.Unlock()
		if p.stdin == nil {
			return errs.E(errs.FailedPrecondition, "stdin of process %d is closed or was not requested", p.pid)
		}
		_, err := p.stdin.Write(v.Stdin)
		return errs.Wrap(errs.FailedPrecondition, err, "write to stdin of process %d", p.pid)
	}
	return errs.E(errs.InvalidArgument, "input is empty")
}

func (ps *processService) SendInput(ctx context.Context, req *connect.Request[pb.SendInputRequest]) (*connect.Response[pb.SendInputResponse], error) {
	p, err := ps.s.procs.get(req.Msg.GetProcess())
	if err != nil {
		return nil, connectErr(err)
	}
	if err := p.write(req.Msg.GetInput()); err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.SendInputResponse{}), nil
}

func (ps *processService) StreamInput(ctx context.Context, st *connect.ClientStream[pb.StreamInputRequest]) (*connect.Response[pb.StreamInputResponse], error) {
	var p *proc
	for st.Receive() {
		switch ev := st.Msg().GetEvent().(type) {
		case *pb.StreamInputRequest_Start:
			got, err := ps.s.procs.get(ev.Start.GetProcess())
			if err != nil {
				return nil, connectErr(err)
			}
			p = got
		case *pb.StreamInputRequest_Data:
			if p == nil {
				return nil, connectErr(errs.E(errs.FailedPrecondition, "start event must come first"))
			}
			if err := p.write(ev.Data.GetInput()); err != nil {
				return nil, connectErr(err)
			}
		}
	}
	if err := st.Err(); err != nil {
		return nil, err
	}
	return connect.NewResponse(&pb.StreamInputResponse{}), nil
}

func (ps *processService) SendSignal(ctx context.Context, req *connect.Request[pb.SendSignalRequest]) (*connect.Response[pb.SendSignalResponse], error) {
	p, err := ps.s.procs.get(req.Msg.GetProcess())
	if err != nil {
		return nil, connectErr(err)
	}
	var sig syscall.Signal
	switch req.Msg.GetSignal() {
	case pb.Signal_SIGNAL_SIGKILL:
		sig = syscall.SIGKILL
	case pb.Signal_SIGNAL_SIGTERM:
		sig = syscall.SIGTERM
	default:
		return nil, connectErr(errs.E(errs.InvalidArgument, "unsupported signal %v", req.Msg.GetSignal()))
	}
	if err := p.signal(sig); err != nil {
		return nil, connectErr(errs.Wrap(errs.NotFound, err, "signal process %d", p.pid))
	}
	return connect.NewResponse(&pb.SendSignalResponse{}), nil
}

func (ps *processService) CloseStdin(ctx context.Context, req *connect.Request[pb.CloseStdinRequest]) (*connect.Response[pb.CloseStdinResponse], error) {
	p, err := ps.s.procs.get(req.Msg.GetProcess())
	if err != nil {
		return nil, connectErr(err)
	}
	if p.ptyf != nil {
		// EOF on a terminal is ^D.
		_, _ = p.ptyf.Write([]byte{4})
		return connect.NewResponse(&pb.CloseStdinResponse{}), nil
	}
	p.inMu.Lock()
	if p.stdin != nil {
		p.stdin.Close()
		p.stdin = nil
	}
	p.inMu.Unlock()
	return connect.NewResponse(&pb.CloseStdinResponse{}), nil
}

var _ io.Writer = (*os.File)(nil)
