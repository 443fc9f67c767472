//go:build linux

package interp

import (
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-zeromq/zmq4"

	"github.com/cubesandbox/cube/internal/agent/reaper"
	"github.com/cubesandbox/cube/internal/errs"
)

// Event is one NDJSON line of an /execute response.
type Event map[string]any

// Kernel runs code for one context.
type Kernel interface {
	// Execute runs code, calling emit for every output event, until the
	// execution finishes or ctx ends (then it interrupts the kernel).
	Execute(ctx context.Context, code string, env map[string]string, emit func(Event)) error
	Close()
}

// RunAs describes the account and environment kernels run with.
type RunAs struct {
	Cred *syscall.Credential // nil = the agent's own
	UID  int
	GID  int
	Env  []string
}

// pyKernel is an ipykernel process spoken to over ZeroMQ.
type pyKernel struct {
	cmd   *exec.Cmd
	dir   string
	sig   *signer
	shell zmq4.Socket
	ctrl  zmq4.Socket
	iopub zmq4.Socket
	stop  context.CancelFunc
	dead  chan struct{}

	mu      sync.Mutex
	waiters map[string]chan *Message // parent msg_id -> messages
	execMu  sync.Mutex
}

type connInfo struct {
	ShellPort   int    `json:"shell_port"`
	IOPubPort   int    `json:"iopub_port"`
	StdinPort   int    `json:"stdin_port"`
	ControlPort int    `json:"control_port"`
	HBPort      int    `json:"hb_port"`
	IP          string `json:"ip"`
	Key         string `json:"key"`
	Transport   string `json:"transport"`
	Scheme      string `json:"signature_scheme"`
}

// Python returns the interpreter with ipykernel: $CUBE_PYTHON, else the
// system python3 (Debian's python3-ipykernel), else python3 in PATH.
func Python() string {
	if p := os.Getenv("CUBE_PYTHON"); p != "" {
		return p
	}
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3"
	}
	return "python3"
}

// startPython launches an ipykernel in cwd and connects to it. The
// kernel picks its own ports and HMAC key and writes them to its
// connection file, which only its owner can read.
func startPython(cwd string, as RunAs) (*pyKernel, error) {
	dir, err := os.MkdirTemp("", "cube-kernel-")
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "kernel dir")
	}
	if as.Cred != nil {
		_ = os.Chown(dir, as.UID, as.GID)
	}
	connFile := filepath.Join(dir, "kernel.json")
	cmd := exec.Command(Python(), "-m", "ipykernel_launcher", "-f", connFile, "--ip=127.0.0.1",
		"--IPKernelApp.parent_handle=0", "--HistoryManager.enabled=False")
	cmd.Dir = cwd
	cmd.Env = append(as.Env, "MPLBACKEND=module://matplotlib_inline.backend_inline", "PYTHONUNBUFFERED=1", "JPY_PARENT_PID=")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: as.Cred, Pdeathsig: syscall.SIGKILL}
	devnull, _ := os.OpenFile(os.DevNull, os.O_RDWR, 0)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = devnull, devnull, devnull
	if err := reaper.Start(cmd, cmd.Start); err != nil {
		os.RemoveAll(dir)
		return nil, errs.Wrap(errs.Unavailable, err, "start ipykernel")
	}
	if devnull != nil {
		devnull.Close()
	}
	k := &pyKernel{cmd: cmd, dir: dir, dead: make(chan struct{}), waiters: map[string]chan *Message{}}
	go func() {
		_ = cmd.Wait()
		reaper.Done(cmd.Process.Pid)
		close(k.dead)
	}()
	fail := func(err error) (*pyKernel, error) {
		k.Close()
		return nil, err
	}
	var ci connInfo
	deadline := time.Now().Add(60 * time.Second)
	for {
		b, err := os.ReadFile(connFile)
		if err == nil && json.Unmarshal(b, &ci) == nil && ci.ShellPort != 0 && ci.IOPubPort != 0 {
			break
		}
		select {
		case <-k.dead:
			return fail(errs.E(errs.Unavailable, "ipykernel exited during start-up (is python3-ipykernel installed?)"))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fail(errs.E(errs.Unavailable, "ipykernel did not start in time"))
		}
	}
	k.sig = &signer{key: []byte(ci.Key), session: newID()}
	ctx, cancel := context.WithCancel(context.Background())
	k.stop = cancel
	addr := func(port int) string { return "tcp://" + ci.IP + ":" + strconv.Itoa(port) }
	k.shell = zmq4.NewDealer(ctx, zmq4.WithID(zmq4.SocketIdentity(newID())))
	k.ctrl = zmq4.NewDealer(ctx, zmq4.WithID(zmq4.SocketIdentity(newID())))
	k.iopub = zmq4.NewSub(ctx)
	for _, d := range []struct {
		s    zmq4.Socket
		port int
	}{{k.shell, ci.ShellPort}, {k.ctrl, ci.ControlPort}, {k.iopub, ci.IOPubPort}} {
		if err := d.s.Dial(addr(d.port)); err != nil {
			return fail(errs.Wrap(errs.Unavailable, err, "connect to ipykernel"))
		}
	}
	if err := k.iopub.SetOption(zmq4.OptionSubscribe, ""); err != nil {
		return fail(errs.Wrap(errs.Unavailable, err, "subscribe to iopub"))
	}
	go k.recvLoop(k.shell)
	go k.recvLoop(k.iopub)
	go k.recvLoop(k.ctrl)
	// kernel_info until both the shell reply and an iopub status arrive:
	// then the SUB socket is connected and no output can be missed.
	for try := 0; ; try++ {
		if k.handshake(2 * time.Second) {
			break
		}
		if try > 30 {
			return fail(errs.E(errs.Unavailable, "ipykernel did not answer kernel_info"))
		}
		select {
		case <-k.dead:
			return fail(errs.E(errs.Unavailable, "ipykernel exited during start-up"))
		default:
		}
	}
	return k, nil
}

func (k *pyKernel) handshake(wait time.Duration) bool {
	id, ch, err := k.send(k.shell, "kernel_info_request", map[string]any{})
	if err != nil {
		return false
	}
	defer k.unregister(id)
	gotReply, gotIOPub := false, false
	t := time.After(wait)
	for !(gotReply && gotIOPub) {
		select {
		case m := <-ch:
			if m.Header.MsgType == "kernel_info_reply" {
				gotReply = true
			} else if m.Header.MsgType == "status" {
				gotIOPub = true
			}
		case <-t:
			return false
		}
	}
	return true
}

func (k *pyKernel) recvLoop(s zmq4.Socket) {
	for {
		msg, err := s.Recv()
		if err != nil {
			return
		}
		m, err := k.sig.decode(msg.Frames)
		if err != nil {
			continue
		}
		k.mu.Lock()
		ch := k.waiters[m.Parent.MsgID]
		k.mu.Unlock()
		if ch != nil {
			select {
			case ch <- m:
			case <-time.After(30 * time.Second):
				// A waiter that stopped reading: drop rather than wedge.
			}
		}
	}
}

func (k *pyKernel) send(s zmq4.Socket, t string, content any) (string, chan *Message, error) {
	id, frames, err := k.sig.encode(t, content)
	if err != nil {
		return "", nil, err
	}
	ch := make(chan *Message, 1024)
	k.mu.Lock()
	k.waiters[id] = ch
	k.mu.Unlock()
	if err := s.SendMulti(zmq4.NewMsgFrom(frames...)); err != nil {
		k.unregister(id)
		return "", nil, errs.Wrap(errs.Unavailable, err, "send to kernel")
	}
	return id, ch, nil
}

func (k *pyKernel) unregister(id string) {
	k.mu.Lock()
	delete(k.waiters, id)
	k.mu.Unlock()
}

// interrupt sends SIGINT to the kernel (ipykernel's default interrupt
// mode): the running cell raises KeyboardInterrupt.
func (k *pyKernel) interrupt() {
	if k.cmd.Process != nil {
		_ = k.cmd.Process.Signal(syscall.SIGINT)
	}
}

// mimeKeys maps Jupyter MIME types to /execute result fields.
var mimeKeys = map[string]string{
	"text/plain": "text", "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg",
	"image/png": "png", "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex",
	"application/json": "json", "application/javascript": "javascript", "e2b/data": "data", "e2b/chart": "chart",
}

// resultEvent converts a display_data / execute_result bundle.
func resultEvent(data map[string]any, main bool) Event {
	ev := Event{"type": "result", "is_main_result": main}
	extra := map[string]any{}
	for mt, v := range data {
		if k, ok := mimeKeys[mt]; ok {
			if s, ok := v.(string); ok && (k == "png" || k == "jpeg") {
				v = strings.ReplaceAll(s, "\n", "")
			}
			ev[k] = v
		} else {
			extra[mt] = v
		}
	}
	if t, ok := ev["text"].(string); ok {
		ev["text"] = stripQuotes(t)
	}
	ev["extra"] = extra
	return ev
}

// stripQuotes removes one pair of surrounding quotes from a Python repr
// of a string ('abc' -> abc), as the stock server does.
func stripQuotes(s string) string {
	if len(s) >= 2 && (s[0] == '\'' || s[0] == '"') && s[len(s)-1] == s[0] {
		return s[1 : len(s)-1]
	}
	return s
}

func stamp() string { return time.Now().UTC().Format(time.RFC3339Nano) }

// Execute implements Kernel.
func (k *pyKernel) Execute(ctx context.Context, code string, env map[string]string, emit func(Event)) error {
	k.execMu.Lock()
	defer k.execMu.Unlock()
	if len(env) > 0 {
		keys, _ := json.Marshal(env)
		lit, _ := json.Marshal(string(keys))
		if err := k.run(ctx, "import os as _cube_os, json as _cube_json\n_cube_env = _cube_json.loads("+string(lit)+")\n_cube_saved = {k: _cube_os.environ.get(k) for k in _cube_env}\n_cube_os.environ.update(_cube_env)\n", true, nil); err != nil {
			return err
		}
		defer func() {
			_ = k.run(context.Background(), "for _k, _v in _cube_saved.items():\n    if _v is None: _cube_os.environ.pop(_k, None)\n    else: _cube_os.environ[_k] = _v\n", true, nil)
		}()
	}
	return k.run(ctx, code, false, emit)
}

// run executes code; silent runs store no history and emit nothing.
func (k *pyKernel) run(ctx context.Context, code string, silent bool, emit func(Event)) error {
	select {
	case <-k.dead:
		return errs.E(errs.Unavailable, "kernel is not running")
	default:
	}
	id, ch, err := k.send(k.shell, "execute_request", map[string]any{
		"code": code, "silent": silent, "store_history": !silent, "user_expressions": map[string]any{},
		"allow_stdin": false, "stop_on_error": false, // we never queue cells; true would abort the next one
	})
	if err != nil {
		return err
	}
	defer k.unregister(id)
	if emit == nil {
		emit = func(Event) {}
	}
	replied, idle, interrupted := false, false, false
	var interruptedAt <-chan time.Time
	done := ctx.Done()
	for !(replied && idle) {
		select {
		case m := <-ch:
			var c map[string]any
			_ = json.Unmarshal(m.Content, &c)
			switch m.Header.MsgType {
			case "execute_input":
				if n, ok := c["execution_count"].(float64); ok && !silent {
					emit(Event{"type": "number_of_executions", "execution_count": int(n)})
				}
			case "stream":
				name, _ := c["name"].(string)
				text, _ := c["text"].(string)
				if name != "stderr" {
					name = "stdout"
				}
				emit(Event{"type": name, "text": text, "timestamp": stamp()})
			case "execute_result", "display_data":
				data, _ := c["data"].(map[string]any)
				emit(resultEvent(data, m.Header.MsgType == "execute_result"))
			case "error":
				tb := []string{}
				if arr, ok := c["traceback"].([]any); ok {
					for _, l := range arr {
						if s, ok := l.(string); ok {
							tb = append(tb, s)
						}
					}
				}
				emit(Event{"type": "error", "name": c["ename"], "value": c["evalue"], "traceback": strings.Join(tb, "\n")})
			case "status":
				if c["execution_state"] == "idle" {
					idle = true
				}
			case "execute_reply":
				replied = true
				if c["status"] == "aborted" {
					emit(Event{"type": "error", "name": "ExecutionAborted", "value": "Execution was aborted", "traceback": ""})
				}
			}
		case <-done:
			if !interrupted {
				interrupted = true
				k.interrupt()
				interruptedAt = time.After(5 * time.Second)
			}
			done = nil
		case <-interruptedAt:
			return errs.E(errs.Canceled, "execution interrupted")
		case <-k.dead:
			emit(Event{"type": "error", "name": "UnexpectedEndOfExecution", "value": "the kernel died", "traceback": ""})
			return nil
		}
	}
	if interrupted {
		return errs.E(errs.Canceled, "execution interrupted")
	}
	return nil
}

// Close stops the kernel and removes its files.
func (k *pyKernel) Close() {
	if k.stop != nil {
		k.stop()
	}
	for _, s := range []zmq4.Socket{k.shell, k.ctrl, k.iopub} {
		if s != nil {
			_ = s.Close()
		}
	}
	if k.cmd.Process != nil {
		_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL)
	}
	select {
	case <-k.dead:
	case <-time.After(3 * time.Second):
	}
	os.RemoveAll(k.dir)
}
