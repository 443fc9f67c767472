package vmmapi

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// Client talks to one VMM process.
type Client struct {
	socket string
	hc     *http.Client
}

// NewClient returns a client for the VMM listening on socket.
func NewClient(socket string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
		MaxIdleConns:    2,
		IdleConnTimeout: 30 * time.Second,
	}
	return &Client{socket: socket, hc: &http.Client{Transport: tr}}
}

// Socket is the control socket path.
func (c *Client) Socket() string { return c.socket }

func (c *Client) do(ctx context.Context, method, path string, out any) error {
	return c.doBody(ctx, method, path, nil, out)
}

func (c *Client) doBody(ctx context.Context, method, path string, in, out any) error {
	var reqBody io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return errs.Wrap(errs.Internal, err, "vmm request")
		}
		reqBody = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://vmm"+path, reqBody)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "vmm request")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return errs.Wrap(errs.Timeout, err, "vmm %s %s", method, path)
		}
		return errs.Wrap(errs.Unavailable, err, "vmm %s %s", method, path)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return errs.Wrap(errs.Unavailable, err, "vmm %s %s: read reply", method, path)
	}
	if resp.StatusCode/100 != 2 {
		var eb ErrorBody
		if json.Unmarshal(body, &eb) == nil && eb.Error.Message != "" {
			return errs.E(kindFromName(eb.Error.Kind), "vmm: %s", eb.Error.Message)
		}
		return errs.E(errs.Internal, "vmm %s %s: HTTP %d", method, path, resp.StatusCode)
	}
	if out != nil {
		if err := json.Unmarshal(body, out); err != nil {
			return errs.Wrap(errs.Internal, err, "vmm %s %s: decode reply", method, path)
		}
	}
	return nil
}

func kindFromName(name string) errs.Kind {
	for k := errs.Internal; k <= errs.FailedPrecondition; k++ {
		if k.String() == name {
			return k
		}
	}
	return errs.Internal
}

// Status returns the VMM's status.
func (c *Client) Status(ctx context.Context) (Status, error) {
	var s Status
	return s, c.do(ctx, "GET", "/status", &s)
}

// Metrics returns the VM's counters.
func (c *Client) Metrics(ctx context.Context) (Metrics, error) {
	var m Metrics
	return m, c.do(ctx, "GET", "/metrics", &m)
}

func (c *Client) action(ctx context.Context, name string) (Status, error) {
	var s Status
	return s, c.do(ctx, "POST", "/"+name, &s)
}

// Start starts a VMM launched with NoStart.
func (c *Client) Start(ctx context.Context) (Status, error) { return c.action(ctx, "start") }

// Pause pauses the vCPUs.
func (c *Client) Pause(ctx context.Context) (Status, error) { return c.action(ctx, "pause") }

// Resume resumes the vCPUs.
func (c *Client) Resume(ctx context.Context) (Status, error) { return c.action(ctx, "resume") }

// Stop stops the VM; the VMM process then exits.
func (c *Client) Stop(ctx context.Context) (Status, error) { return c.action(ctx, "stop") }

// Do sends an arbitrary request (the `cube vmm ctl` escape hatch) and
// returns the raw JSON reply.
func (c *Client) Do(ctx context.Context, method, path string) (json.RawMessage, error) {
	var raw json.RawMessage
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	return raw, c.do(ctx, method, path, &raw)
}

// WaitReady polls Status until the VMM answers or ctx ends.
func (c *Client) WaitReady(ctx context.Context) (Status, error) {
	for {
		s, err := c.Status(ctx)
		if err == nil {
			return s, nil
		}
		select {
		case <-ctx.Done():
			return s, fmt.Errorf("vmm at %s not ready: %w", c.socket, err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

// Snapshot takes a snapshot (see SnapshotRequest).
func (c *Client) Snapshot(ctx context.Context, r SnapshotRequest) (SnapshotReply, error) {
	var out SnapshotReply
	return out, c.doBody(ctx, "POST", "/snapshot", r, &out)
}

// Restore makes a pre-started VMM restore a snapshot.
func (c *Client) Restore(ctx context.Context, r RestoreRequest) (RestoreReply, error) {
	var out RestoreReply
	return out, c.doBody(ctx, "POST", "/restore", r, &out)
}
