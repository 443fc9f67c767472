//go:build linux

package envd

import (
	"encoding/json"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	pb "github.com/cubesandbox/cube/proto/process"
)

// The template's start command (E2B's startCmd).
//
// A template may name a command the agent starts once, in the background,
// when it first learns it: from its own environment at start-up
// (StartCmdEnv, set by the gVisor runtime in the container's environment)
// or from the envVars of a POST /init (the microVM runtime's bake). The
// template bake waits until it is ready and then snapshots, so every
// sandbox restored from the template has it running already. The guard is
// the agent's own memory: it is part of the snapshot, so a restored agent
// knows the command runs and never starts it again (a later /init naming
// StartCmdEnv is ignored).
//
// The process is an ordinary envd process (own process group, default
// user, the template's env and workdir) tagged StartCmdTag: List shows
// it, Connect streams its output, SendSignal stops it. Its stdout and
// stderr are also kept in a bounded ring (StartLogBytes), served with its
// state by GET /start. It is not restarted when it exits; the exit is
// logged (with the log's tail) and reported by GET /start.

// StartCmdEnv carries the start command as a JSON array of strings (argv).
const StartCmdEnv = "CUBE_START_CMD"

// StartCmdTag is the envd process tag of the start command.
const StartCmdTag = "cube-start-cmd"

// StartLogBytes bounds the start command's kept output.
const StartLogBytes = 64 << 10

// maxStartCmdBytes bounds the JSON of a start command.
const maxStartCmdBytes = 64 << 10

// Start command states (StartStatus.State).
const (
	StartNone    = ""        // no start command
	StartRunning = "running" // started, still running
	StartExited  = "exited"  // started, then exited (ExitCode, Error)
	StartFailed  = "failed"  // could not be started (Error)
)

// StartStatus is what GET /start returns.
type StartStatus struct {
	Cmd       []string  `json:"cmd,omitempty"`
	State     string    `json:"state"`
	Pid       uint32    `json:"pid,omitempty"`
	ExitCode  int32     `json:"exitCode,omitempty"`
	Error     string    `json:"error,omitempty"`
	StartedAt time.Time `json:"startedAt,omitzero"`
	EndedAt   time.Time `json:"endedAt,omitzero"`
	// Log is the tail of the command's stdout and stderr (interleaved),
	// at most StartLogBytes.
	Log string `json:"log"`
}

// startCmd is the agent's start-command supervisor state.
type startCmd struct {
	mu     sync.Mutex
	st     StartStatus
	log    ring
	exited chan struct{} // closed when the command exited or failed
}

// ring keeps the last StartLogBytes bytes written.
type ring struct {
	buf  []byte
	full bool
	pos  int
}

func (r *ring) write(b []byte) {
	if r.buf == nil {
		r.buf = make([]byte, StartLogBytes)
	}
	if len(b) >= len(r.buf) {
		copy(r.buf, b[len(b)-len(r.buf):])
		r.pos, r.full = 0, true
		return
	}
	n := copy(r.buf[r.pos:], b)
	if n < len(b) {
		copy(r.buf, b[n:])
		r.full = true
	}
	r.pos = (r.pos + len(b)) % len(r.buf)
	if r.pos == 0 && len(b) > 0 {
		r.full = true
	}
}

func (r *ring) String() string {
	if !r.full {
		return string(r.buf[:r.pos])
	}
	return string(r.buf[r.pos:]) + string(r.buf[:r.pos])
}

// ParseStartCmd decodes a start command: a JSON array of at least one
// string, the first non-empty, none with a NUL byte.
func ParseStartCmd(s string) ([]string, error) {
	if len(s) > maxStartCmdBytes {
		return nil, errs.E(errs.InvalidArgument, "%s is longer than %d bytes", StartCmdEnv, maxStartCmdBytes)
	}
	var argv []string
	if err := json.Unmarshal([]byte(s), &argv); err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "%s must be a JSON array of strings", StartCmdEnv)
	}
	if len(argv) == 0 || argv[0] == "" {
		return nil, errs.E(errs.InvalidArgument, "%s names no command", StartCmdEnv)
	}
	for _, a := range argv {
		if strings.IndexByte(a, 0) >= 0 {
			return nil, errs.E(errs.InvalidArgument, "%s contains a NUL byte", StartCmdEnv)
		}
	}
	return argv, nil
}

// StartCommand starts argv as the template's start command, once per
// agent: when a start command was already started (or failed to start),
// it does nothing and reports whether argv is the same one. env is added
// to the process's environment (after the sandbox env vars) and dir is its
// cwd ("" = the default workdir). A command that cannot be started is
// logged, recorded (GET /start) and returned.
func (s *Server) StartCommand(argv []string, env map[string]string, dir string) error {
	sc := &s.startCmd
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.st.State != StartNone {
		if strings.Join(sc.st.Cmd, "\x00") != strings.Join(argv, "\x00") {
			s.log.Warn("a start command was already started; ignoring another", "running", sc.st.Cmd, "ignored", argv)
			return errs.E(errs.FailedPrecondition, "a start command was already started")
		}
		s.log.Debug("start command already started", "cmd", argv, "pid", sc.st.Pid)
		return nil
	}
	sc.exited = make(chan struct{})
	sc.st = StartStatus{Cmd: append([]string(nil), argv...), StartedAt: time.Now().UTC()}
	fail := func(err error) error {
		sc.st.State, sc.st.Error, sc.st.EndedAt = StartFailed, err.Error(), time.Now().UTC()
		s.log.Error("start command cannot be started", "cmd", argv, "err", err)
		close(sc.exited)
		return err
	}
	if len(argv) == 0 || argv[0] == "" {
		return fail(errs.E(errs.InvalidArgument, "the start command names no command"))
	}
	u, err := s.resolveUser("")
	if err != nil {
		return fail(errs.Wrap(errs.FailedPrecondition, err, "start command user"))
	}
	no, tag := false, StartCmdTag
	var cwd *string
	if dir != "" {
		cwd = &dir
	}
	req := &pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: argv[0], Args: argv[1:], Envs: env, Cwd: cwd},
		Tag:     &tag, Stdin: &no,
	}
	p, sub, err := s.start(req, u, 0)
	if err != nil {
		return fail(err)
	}
	sc.st.State, sc.st.Pid = StartRunning, p.pid
	s.log.Info("start command started", "cmd", argv, "pid", p.pid, "user", u.Name)
	go s.superviseStart(p, sub)
	return nil
}

// StartCommandFailed records that the start command could not even be
// read (a bad StartCmdEnv), unless one was started already.
func (s *Server) StartCommandFailed(err error) {
	sc := &s.startCmd
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if sc.st.State != StartNone {
		return
	}
	sc.exited = make(chan struct{})
	close(sc.exited)
	now := time.Now().UTC()
	sc.st = StartStatus{State: StartFailed, Error: err.Error(), StartedAt: now, EndedAt: now}
	s.log.Error("start command cannot be started", "err", err)
}

// superviseStart keeps the start command's output and records its end.
func (s *Server) superviseStart(p *proc, sub *subscriber) {
	sc := &s.startCmd
	defer p.unsubscribe(sub)
	for ev := range sub.ch {
		switch e := ev.Event.(type) {
		case *pb.ProcessEvent_Data:
			sc.mu.Lock()
			sc.log.write(e.Data.GetStdout())
			sc.log.write(e.Data.GetStderr())
			sc.log.write(e.Data.GetPty())
			sc.mu.Unlock()
		case *pb.ProcessEvent_End:
			sc.mu.Lock()
			sc.st.State, sc.st.ExitCode, sc.st.EndedAt = StartExited, e.End.GetExitCode(), time.Now().UTC()
			sc.st.Error = e.End.GetStatus()
			tail, exited := lastLines(sc.log.String(), 10), sc.exited
			sc.mu.Unlock()
			s.log.Error("start command exited", "cmd", p.cfg.Cmd, "pid", p.pid, "status", e.End.GetStatus(), "exitCode", e.End.GetExitCode(), "log", tail)
			close(exited)
			return
		}
	}
}

// StartState returns the start command's status (State StartNone when the
// agent has none).
func (s *Server) StartState() StartStatus {
	sc := &s.startCmd
	sc.mu.Lock()
	defer sc.mu.Unlock()
	st := sc.st
	st.Cmd = append([]string(nil), st.Cmd...)
	st.Log = sc.log.String()
	return st
}

// startState is StartStatus.State alone.
func (s *Server) startState() string {
	s.startCmd.mu.Lock()
	defer s.startCmd.mu.Unlock()
	return s.startCmd.st.State
}

// startExited is closed when the start command ended (nil if none was
// started).
func (s *Server) startExited() <-chan struct{} {
	s.startCmd.mu.Lock()
	defer s.startCmd.mu.Unlock()
	return s.startCmd.exited
}

func (s *Server) handleStart(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, s.StartState())
}

// lastLines returns at most n final lines of s.
func lastLines(s string, n int) string {
	s = strings.TrimRight(s, "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
