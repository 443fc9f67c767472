//go:build linux

package interp

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cubesandbox/cube/internal/agent/reaper"
	"github.com/cubesandbox/cube/internal/errs"
)

// replKernel drives a long-lived interpreter process (bash, node) whose
// state persists between executions. After each execution the driver
// prints a marker line `\x1eCUBE<nonce>:<json>\n` on stdout and
// `\x1eCUBE<nonce>:\n` on stderr; the execution ends when both arrived.
type replKernel struct {
	lang   string
	cmd    *exec.Cmd
	stdin  *os.File
	dir    string
	as     RunAs
	marker []byte
	dead   chan struct{}
	count  int

	execMu sync.Mutex
	out    chan chunk
}

type chunk struct {
	stderr bool
	data   []byte
	marker []byte // the JSON after a marker, nil for plain data
}

var identRe = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// nodeDriver evaluates requests in one persistent vm context.
const nodeDriver = `
const vm = require('vm'), util = require('util'), fs = require('fs'), readline = require('readline');
const marker = process.argv[process.argv.length - 1];
const ctx = vm.createContext(Object.assign(Object.create(globalThis), {require, console, process, module, Buffer, setTimeout, setInterval, clearTimeout, clearInterval}));
const rl = readline.createInterface({input: process.stdin});
let queue = Promise.resolve();
rl.on('line', (line) => { queue = queue.then(() => run(JSON.parse(line))); });
async function run(req) {
  const saved = {};
  for (const [k, v] of Object.entries(req.env || {})) { saved[k] = process.env[k]; process.env[k] = v; }
  const res = {};
  try {
    let v = vm.runInContext(req.code, ctx, {filename: 'cell'});
    if (v && typeof v.then === 'function') v = await v;
    if (v !== undefined) res.text = typeof v === 'string' ? v : util.inspect(v);
  } catch (e) {
    res.error = {name: (e && e.name) || 'Error', value: (e && e.message) || String(e), traceback: (e && e.stack) || String(e)};
  }
  for (const [k, v] of Object.entries(saved)) { if (v === undefined) delete process.env[k]; else process.env[k] = v; }
  await new Promise((r) => process.stdout.write('\x1e' + marker + ':' + JSON.stringify(res) + '\n', r));
  await new Promise((r) => process.stderr.write('\x1e' + marker + ':\n', r));
}
`

func startREPL(lang, cwd string, as RunAs) (*replKernel, error) {
	dir, err := os.MkdirTemp("", "cube-repl-")
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "repl dir")
	}
	if as.Cred != nil {
		_ = os.Chown(dir, as.UID, as.GID)
	}
	k := &replKernel{lang: lang, dir: dir, as: as, dead: make(chan struct{}), out: make(chan chunk, 256)}
	k.marker = []byte("\x1eCUBE" + newID())
	var cmd *exec.Cmd
	switch lang {
	case "bash":
		cmd = exec.Command("/bin/bash", "--noprofile", "--norc")
	case "javascript":
		node, err := exec.LookPath("node")
		if err != nil {
			os.RemoveAll(dir)
			return nil, errs.E(errs.InvalidArgument, "language javascript is not available (no node in the image)")
		}
		cmd = exec.Command(node, "-e", nodeDriver, string(k.marker[1:]))
	default:
		os.RemoveAll(dir)
		return nil, errs.E(errs.InvalidArgument, "unsupported language %q", lang)
	}
	cmd.Dir = cwd
	cmd.Env = as.Env
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Credential: as.Cred, Pdeathsig: syscall.SIGKILL}
	inR, inW, err := os.Pipe()
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "pipe")
	}
	outR, outW, _ := os.Pipe()
	errR, errW, _ := os.Pipe()
	cmd.Stdin, cmd.Stdout, cmd.Stderr = inR, outW, errW
	if err := reaper.Start(cmd, cmd.Start); err != nil {
		for _, f := range []*os.File{inR, inW, outR, outW, errR, errW} {
			f.Close()
		}
		os.RemoveAll(dir)
		return nil, errs.Wrap(errs.Unavailable, err, "start %s", lang)
	}
	inR.Close()
	outW.Close()
	errW.Close()
	k.cmd, k.stdin = cmd, inW
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); k.read(outR, false) }()
	go func() { defer wg.Done(); k.read(errR, true) }()
	go func() {
		_ = cmd.Wait()
		reaper.Done(cmd.Process.Pid)
		wg.Wait()
		close(k.dead)
	}()
	return k, nil
}

// read splits a stream into data chunks and marker lines.
func (k *replKernel) read(f *os.File, stderr bool) {
	defer f.Close()
	buf := make([]byte, 32<<10)
	var pending []byte
	for {
		n, err := f.Read(buf)
		pending = append(pending, buf[:n]...)
		for {
			i := bytes.Index(pending, k.marker)
			if i < 0 {
				// Keep a possible marker prefix for the next read.
				keep := 0
				for l := min(len(k.marker)-1, len(pending)); l > 0; l-- {
					if bytes.HasPrefix(k.marker, pending[len(pending)-l:]) {
						keep = l
						break
					}
				}
				if len(pending)-keep > 0 {
					k.out <- chunk{stderr: stderr, data: append([]byte(nil), pending[:len(pending)-keep]...)}
				}
				pending = append([]byte(nil), pending[len(pending)-keep:]...)
				break
			}
			nl := bytes.IndexByte(pending[i:], '\n')
			if nl < 0 {
				if i > 0 {
					k.out <- chunk{stderr: stderr, data: append([]byte(nil), pending[:i]...)}
					pending = append([]byte(nil), pending[i:]...)
				}
				break
			}
			if i > 0 {
				k.out <- chunk{stderr: stderr, data: append([]byte(nil), pending[:i]...)}
			}
			var payload []byte
			if nl > len(k.marker) {
				payload = pending[i+len(k.marker)+1 : i+nl]
			}
			k.out <- chunk{stderr: stderr, marker: append(make([]byte, 0, len(payload)), payload...)}
			pending = append([]byte(nil), pending[i+nl+1:]...)
		}
		if err != nil {
			if len(pending) > 0 {
				k.out <- chunk{stderr: stderr, data: pending}
			}
			return
		}
	}
}

func shellQuote(s string) string { return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'" }

// Execute implements Kernel.
func (k *replKernel) Execute(ctx context.Context, code string, env map[string]string, emit func(Event)) error {
	k.execMu.Lock()
	defer k.execMu.Unlock()
	select {
	case <-k.dead:
		return errs.E(errs.Unavailable, "kernel is not running")
	default:
	}
	for key := range env {
		if !identRe.MatchString(key) {
			return errs.E(errs.InvalidArgument, "invalid environment variable name %q", key)
		}
	}
	var req []byte
	switch k.lang {
	case "bash":
		f := filepath.Join(k.dir, "cell.sh")
		if err := os.WriteFile(f, []byte(code), 0o600); err != nil {
			return errs.Wrap(errs.Internal, err, "write cell")
		}
		if k.as.Cred != nil {
			_ = os.Chown(f, k.as.UID, k.as.GID)
		}
		var pre, post strings.Builder
		for key, v := range env {
			fmt.Fprintf(&pre, "_cube_old_%s=\"${%s-\x01}\"; export %s=%s; ", key, key, key, shellQuote(v))
			fmt.Fprintf(&post, "if [ \"$_cube_old_%s\" = $'\\001' ]; then unset %s; else export %s=\"$_cube_old_%s\"; fi; ", key, key, key, key)
		}
		m := string(k.marker[1:])
		req = []byte(fmt.Sprintf("%s source %s; _cube_rc=$?; %s printf '\\036%s:{\"rc\":%%d}\\n' \"$_cube_rc\"; printf '\\036%s:\\n' >&2\n",
			pre.String(), shellQuote(f), post.String(), m, m))
	default:
		b, _ := json.Marshal(map[string]any{"code": code, "env": env})
		req = append(b, '\n')
	}
	// Drop stale output from a previous, interrupted execution.
	for len(k.out) > 0 {
		<-k.out
	}
	if _, err := k.stdin.Write(req); err != nil {
		return errs.Wrap(errs.Unavailable, err, "write to %s", k.lang)
	}
	k.count++
	emit(Event{"type": "number_of_executions", "execution_count": k.count})
	gotOut, gotErr := false, false
	var result map[string]any
	done := ctx.Done()
	interrupted := false
	var give <-chan time.Time
	for !(gotOut && gotErr) {
		select {
		case c := <-k.out:
			switch {
			case c.marker != nil && c.stderr:
				gotErr = true
			case c.marker != nil:
				gotOut = true
				_ = json.Unmarshal(c.marker, &result)
			case c.stderr:
				emit(Event{"type": "stderr", "text": string(c.data), "timestamp": stamp()})
			default:
				emit(Event{"type": "stdout", "text": string(c.data), "timestamp": stamp()})
			}
		case <-done:
			interrupted = true
			done = nil
			_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGINT)
			give = time.After(3 * time.Second)
		case <-give:
			return errs.E(errs.Canceled, "execution interrupted")
		case <-k.dead:
			for len(k.out) > 0 {
				c := <-k.out
				if c.marker == nil {
					t := "stdout"
					if c.stderr {
						t = "stderr"
					}
					emit(Event{"type": t, "text": string(c.data), "timestamp": stamp()})
				}
			}
			emit(Event{"type": "error", "name": "UnexpectedEndOfExecution", "value": k.lang + " exited", "traceback": ""})
			return nil
		}
	}
	if interrupted {
		return errs.E(errs.Canceled, "execution interrupted")
	}
	if rc, ok := result["rc"].(float64); ok && rc != 0 {
		// As Jupyter's bash_kernel reports a failing command.
		emit(Event{"type": "error", "name": "", "value": fmt.Sprint(int(rc)), "traceback": ""})
	}
	if e, ok := result["error"].(map[string]any); ok {
		emit(Event{"type": "error", "name": e["name"], "value": e["value"], "traceback": e["traceback"]})
	}
	if t, ok := result["text"].(string); ok {
		emit(Event{"type": "result", "text": t, "is_main_result": true, "extra": map[string]any{}})
	}
	return nil
}

// Close kills the interpreter.
func (k *replKernel) Close() {
	if k.cmd.Process != nil {
		_ = syscall.Kill(-k.cmd.Process.Pid, syscall.SIGKILL)
	}
	k.stdin.Close()
	go func() {
		// Drain so the readers can finish.
		for {
			select {
			case <-k.out:
			case <-k.dead:
				return
			}
		}
	}()
	select {
	case <-k.dead:
	case <-time.After(3 * time.Second):
	}
	os.RemoveAll(k.dir)
}
