// Package readycheck is the template bake's wait for the template's start
// command (runtime.Template.StartCmd, E2B's startCmd): after the agent
// answers, and before the snapshot, Wait checks through the agent's envd
// API that the start command runs (GET /start), then runs the ready
// command (E2B's readyCmd, /bin/sh -c through process.Process/Start) until
// it exits 0, or, without one, lets the start command settle. Every
// runtime's BakeTemplate calls it with a dialer to the agent's envd port.
//
// E2B's ready helpers are ready commands here:
//
//	waitForPort(8080)        -> ss -ltn | grep -q ':8080 '   (or, with netcat-openbsd: nc -z 127.0.0.1 8080)
//	waitForURL(url, 200)     -> curl -sf -o /dev/null URL    (or: wget -q -O /dev/null URL)
//	waitForProcess("nginx")  -> pgrep nginx
//	waitForFile("/tmp/ok")   -> test -e /tmp/ok
//	waitForTimeout(5000)     -> sleep 5
package readycheck

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"connectrpc.com/connect"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	pb "github.com/cubesandbox/cube/proto/process"
	"github.com/cubesandbox/cube/proto/process/processconnect"
)

// Dial connects to the agent's envd port in the sandbox being baked.
type Dial func(ctx context.Context) (net.Conn, error)

// Status is the agent's GET /start (internal/agent/envd.StartStatus).
type Status struct {
	Cmd      []string `json:"cmd"`
	State    string   `json:"state"` // "", running, exited, failed
	Pid      uint32   `json:"pid"`
	ExitCode int32    `json:"exitCode"`
	Error    string   `json:"error"`
	Log      string   `json:"log"`
}

// pollEvery is how often the start command's state and the ready command
// are tried again.
const pollEvery = 200 * time.Millisecond

// shell runs ready commands.
var shell = "/bin/sh"

// maxOutput bounds the ready command's output kept for an error.
const maxOutput = 4 << 10

func client(dial Dial) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		DisableKeepAlives: true,
	}}
}

// GetStatus reads the start command's state from the agent.
func GetStatus(ctx context.Context, dial Dial) (Status, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://sandbox/start", nil)
	resp, err := client(dial).Do(req)
	if err != nil {
		return Status{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode == http.StatusNotFound {
		return Status{}, errs.E(errs.FailedPrecondition, "the sandbox's agent has no start command support (GET /start: 404)")
	}
	if resp.StatusCode != http.StatusOK {
		return Status{}, fmt.Errorf("GET /start: HTTP %d", resp.StatusCode)
	}
	var st Status
	if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&st); err != nil {
		return Status{}, fmt.Errorf("GET /start: %w", err)
	}
	return st, nil
}

// ExecResult is a command run through the agent.
type ExecResult struct {
	ExitCode int
	Status   string
	Output   string // stdout and stderr, interleaved, the last maxOutput bytes
}

// Exec runs argv through the agent (process.Process/Start, the default
// user, no stdin) until it ends or ctx does (the agent kills it then).
func Exec(ctx context.Context, dial Dial, argv []string) (ExecResult, error) {
	pc := processconnect.NewProcessClient(client(dial), "http://sandbox", connect.WithReadMaxBytes(1<<20))
	no := false
	st, err := pc.Start(ctx, connect.NewRequest(&pb.StartRequest{
		Process: &pb.ProcessConfig{Cmd: argv[0], Args: argv[1:]}, Stdin: &no,
	}))
	if err != nil {
		return ExecResult{}, err
	}
	defer st.Close()
	var out []byte
	keep := func(b []byte) {
		out = append(out, b...)
		if len(out) > 2*maxOutput {
			out = append([]byte(nil), out[len(out)-maxOutput:]...)
		}
	}
	for st.Receive() {
		switch e := st.Msg().GetEvent().GetEvent().(type) {
		case *pb.ProcessEvent_Data:
			keep(e.Data.GetStdout())
			keep(e.Data.GetStderr())
		case *pb.ProcessEvent_End:
			if len(out) > maxOutput {
				out = out[len(out)-maxOutput:]
			}
			return ExecResult{ExitCode: int(e.End.GetExitCode()), Status: e.End.GetStatus(), Output: string(out)}, nil
		}
	}
	if err := st.Err(); err != nil {
		return ExecResult{Output: string(out)}, err
	}
	return ExecResult{Output: string(out)}, fmt.Errorf("process stream ended without an end event")
}

// WhileRunning returns a context that ends with ctx, or as soon as the
// start command is known to have ended: then its context.Cause is an
// error describing the end (with the command's output). A bake probes the
// port the start command should serve under it, so that a command that
// died fails the probe at once and says why.
func WhileRunning(ctx context.Context, dial Dial) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(ctx)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(pollEvery):
			}
			st, err := GetStatus(ctx, dial)
			if err == nil && (st.State == "failed" || st.State == "exited") {
				cancel(errs.E(errs.FailedPrecondition, "%s", describe(st)))
				return
			}
		}
	}()
	return ctx, func() { cancel(context.Canceled) }
}

// Ended returns the start command's end that cut ctx (a context from
// WhileRunning), or nil.
func Ended(ctx context.Context) error {
	if c := context.Cause(ctx); c != nil && errs.Is(c, errs.FailedPrecondition) {
		return c
	}
	return nil
}

// describe is a start command's end for an error message.
func describe(st Status) string {
	msg := fmt.Sprintf("the start command %q %s", tail(strings.Join(st.Cmd, " "), 1), st.State)
	if st.Error != "" {
		msg += " (" + tail(st.Error, 3) + ")"
	}
	if l := tail(st.Log, 10); l != "" {
		msg += "; its output: " + l
	} else if st.State == "exited" {
		msg += "; it wrote nothing"
	}
	return msg
}

// maxTail bounds what an error message quotes of the sandbox's output
// (which the guest controls).
const maxTail = 2 << 10

// tail is the last n lines of s, at most maxTail bytes of them.
func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	out := strings.Join(lines, "\n")
	if len(out) > maxTail {
		out = "…" + strings.ToValidUTF8(out[len(out)-maxTail:], "")
	}
	return out
}

// Wait returns once t's start command runs and is ready (its ready
// command exited 0, or it kept running for runtime.DefaultSettle), or an
// error saying why not: the start command could not be started or
// exited (with its output), or the ready command did not succeed within
// the ready timeout (with its last output). It returns at once when t has
// neither a start nor a ready command.
func Wait(ctx context.Context, dial Dial, t runtime.Template) error {
	if len(t.StartCmd) == 0 && t.ReadyCmd == "" {
		return nil
	}
	timeout := t.ReadyTimeout
	if timeout <= 0 {
		timeout = runtime.DefaultReadyTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	// check returns a final error when the start command is known not to
	// run (a failed look is not final: the next one may answer).
	check := func() error {
		if len(t.StartCmd) == 0 {
			return nil
		}
		st, err := GetStatus(ctx, dial)
		switch {
		case errs.Is(err, errs.FailedPrecondition):
			return err
		case err == nil && (st.State == "failed" || st.State == "exited"):
			return errs.E(errs.FailedPrecondition, "%s", describe(st))
		}
		return nil
	}
	// The start command runs (the agent starts it before it answers /init).
	for {
		if len(t.StartCmd) == 0 {
			break
		}
		st, err := GetStatus(ctx, dial)
		if errs.Is(err, errs.FailedPrecondition) {
			return err
		}
		if err == nil {
			if st.State == "failed" || st.State == "exited" {
				return errs.E(errs.FailedPrecondition, "%s", describe(st))
			}
			if st.State == "running" {
				break
			}
			err = fmt.Errorf("the agent has not started the start command")
		}
		last = err
		select {
		case <-ctx.Done():
			return errs.E(errs.Timeout, "the start command did not start within %s (last: %v)", timeout, last)
		case <-time.After(pollEvery):
		}
	}
	if t.ReadyCmd == "" {
		settle := time.NewTimer(runtime.DefaultSettle)
		defer settle.Stop()
		for {
			select {
			case <-ctx.Done():
				return errs.E(errs.Timeout, "the start command did not settle within %s", timeout)
			case <-settle.C:
				return check()
			case <-time.After(pollEvery):
				if err := check(); err != nil {
					return err
				}
			}
		}
	}
	argv := []string{shell, "-c", t.ReadyCmd}
	var res ExecResult
	tries := 0
	for {
		tries++
		actx, acancel := context.WithTimeout(ctx, min(timeout, 30*time.Second))
		r, err := Exec(actx, dial, argv)
		acancel()
		if err == nil {
			if r.ExitCode == 0 {
				// Ready; the start command must still run at the snapshot.
				return check()
			}
			res, last = r, fmt.Errorf("%s", r.Status)
		} else if connect.CodeOf(err) == connect.CodeInvalidArgument {
			// The agent cannot run it (no shell in the image): final.
			return errs.Wrap(errs.FailedPrecondition, err, "ready command %q cannot run", t.ReadyCmd)
		} else {
			last = err
		}
		if err := check(); err != nil {
			return errs.Wrap(errs.FailedPrecondition, err, "ready command %q (try %d, last: %v)", t.ReadyCmd, tries, last)
		}
		select {
		case <-ctx.Done():
			msg := fmt.Sprintf("ready command %q did not succeed within %s (%d tries; last: %v", t.ReadyCmd, timeout, tries, last)
			if o := tail(res.Output, 10); o != "" {
				msg += "; output: " + o
			}
			msg += ")"
			if len(t.StartCmd) > 0 {
				if st, err := GetStatus(context.WithoutCancel(ctx), dial); err == nil {
					if l := tail(st.Log, 5); l != "" {
						msg += "; start command output: " + l
					}
				}
			}
			return errs.E(errs.Timeout, "%s", msg)
		case <-time.After(pollEvery):
		}
	}
}
