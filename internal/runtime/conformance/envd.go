package conformance

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"

	"github.com/cubesandbox/cube/internal/runtime"
)

// ExecResult is the outcome of a process started through the agent.
type ExecResult struct {
	Pid      uint32
	Stdout   string
	Stderr   string
	ExitCode int
	Status   string
}

// Exec runs `/bin/sh -c script` in the sandbox through cube-agent's envd
// API: POST /process.Process/Start with the Connect protocol's streaming
// JSON envelopes (e2b-compat §4.1), reached with rt.Dial.
func Exec(ctx context.Context, rt runtime.Runtime, id, script string) (ExecResult, error) {
	client := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return rt.Dial(ctx, id, runtime.EnvdPort)
		},
		DisableKeepAlives: true,
	}}
	msg, _ := json.Marshal(map[string]any{
		"process": map[string]any{"cmd": "/bin/sh", "args": []string{"-c", script}},
		"stdin":   false,
	})
	var body bytes.Buffer
	body.WriteByte(0)
	binary.Write(&body, binary.BigEndian, uint32(len(msg)))
	body.Write(msg)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://sandbox/process.Process/Start", &body)
	if err != nil {
		return ExecResult{}, err
	}
	req.Header.Set("Content-Type", "application/connect+json")
	req.Header.Set("Connect-Protocol-Version", "1")
	req.Header.Set("Connect-Timeout-Ms", fmt.Sprint(int64(30*time.Second/time.Millisecond)))
	resp, err := client.Do(req)
	if err != nil {
		return ExecResult{}, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return ExecResult{}, fmt.Errorf("Start: HTTP %d: %s", resp.StatusCode, b)
	}
	var res ExecResult
	started, ended := false, false
	rd := bufio.NewReader(resp.Body)
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(rd, hdr[:]); err != nil {
			return res, fmt.Errorf("stream ended without end-stream frame: %w", err)
		}
		n := binary.BigEndian.Uint32(hdr[1:])
		if n > 16<<20 {
			return res, fmt.Errorf("frame too large: %d", n)
		}
		b := make([]byte, n)
		if _, err := io.ReadFull(rd, b); err != nil {
			return res, err
		}
		if hdr[0]&2 != 0 { // end-stream
			var end struct {
				Error *struct{ Code, Message string } `json:"error"`
			}
			json.Unmarshal(b, &end)
			if end.Error != nil {
				return res, fmt.Errorf("Start: %s: %s", end.Error.Code, end.Error.Message)
			}
			if !ended {
				return res, fmt.Errorf("process exited without a result")
			}
			return res, nil
		}
		var ev struct {
			Event struct {
				Start *struct {
					Pid uint32 `json:"pid"`
				} `json:"start"`
				Data *struct {
					Stdout []byte `json:"stdout"`
					Stderr []byte `json:"stderr"`
				} `json:"data"`
				End *struct {
					ExitCode int    `json:"exitCode"`
					Status   string `json:"status"`
				} `json:"end"`
			} `json:"event"`
		}
		if err := json.Unmarshal(b, &ev); err != nil {
			return res, fmt.Errorf("bad event %q: %w", b, err)
		}
		switch {
		case ev.Event.Start != nil:
			started, res.Pid = true, ev.Event.Start.Pid
		case !started:
			return res, fmt.Errorf("expected start event, got %s", b)
		case ev.Event.Data != nil:
			res.Stdout += string(ev.Event.Data.Stdout)
			res.Stderr += string(ev.Event.Data.Stderr)
		case ev.Event.End != nil:
			ended, res.ExitCode, res.Status = true, ev.Event.End.ExitCode, ev.Event.End.Status
		}
	}
}
