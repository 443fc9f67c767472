// Package client is a small Go client of Cube's E2B-compatible API and of
// envd's process service through the sandbox proxy, for the `cube sandbox`
// CLI and `cube bench api`. It speaks exactly what the stock SDK speaks:
// REST with X-API-KEY, and Connect server-streaming JSON
// (application/connect+json envelopes) to /process.Process/Start with the
// E2b-Sandbox-Id / E2b-Sandbox-Port routing headers.
package client

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// Client talks to one cube server.
type Client struct {
	APIURL     string // http://host:3000
	SandboxURL string // data plane base URL ("" = APIURL)
	APIKey     string
	HTTP       *http.Client
}

// New returns a client with a pooled HTTP client.
func New(apiURL, sandboxURL, key string) *Client {
	tr := &http.Transport{MaxIdleConnsPerHost: 256, MaxConnsPerHost: 0, IdleConnTimeout: 90 * time.Second, DisableCompression: true}
	return &Client{APIURL: strings.TrimRight(apiURL, "/"), SandboxURL: strings.TrimRight(sandboxURL, "/"), APIKey: key, HTTP: &http.Client{Transport: tr}}
}

// APIError is an error answer of the API.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("%d: %s", e.Status, e.Message) }

func (c *Client) do(ctx context.Context, method, path string, in, out any) (int, http.Header, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return 0, nil, err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.APIURL+path, body)
	if err != nil {
		return 0, nil, err
	}
	req.Header.Set("X-API-KEY", c.APIKey)
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	res, err := c.HTTP.Do(req)
	if err != nil {
		return 0, nil, errs.Wrap(errs.Unavailable, err, "cannot reach %s", c.APIURL)
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(res.Body, 16<<20))
	if res.StatusCode >= 300 {
		var e struct {
			Message string `json:"message"`
		}
		json.Unmarshal(b, &e)
		if e.Message == "" {
			e.Message = strings.TrimSpace(string(b))
		}
		return res.StatusCode, res.Header, &APIError{Status: res.StatusCode, Message: e.Message}
	}
	if out != nil && len(b) > 0 {
		if err := json.Unmarshal(b, out); err != nil {
			return res.StatusCode, res.Header, fmt.Errorf("decode answer: %w", err)
		}
	}
	return res.StatusCode, res.Header, nil
}

// Sandbox is the create/connect answer.
type Sandbox struct {
	SandboxID       string `json:"sandboxID"`
	TemplateID      string `json:"templateID"`
	EnvdVersion     string `json:"envdVersion"`
	EnvdAccessToken string `json:"envdAccessToken"`
}

// Listed is a list entry / getInfo answer.
type Listed struct {
	SandboxID       string            `json:"sandboxID"`
	TemplateID      string            `json:"templateID"`
	Alias           string            `json:"alias"`
	State           string            `json:"state"`
	StartedAt       time.Time         `json:"startedAt"`
	EndAt           time.Time         `json:"endAt"`
	CPUCount        int               `json:"cpuCount"`
	MemoryMB        int               `json:"memoryMB"`
	Metadata        map[string]string `json:"metadata"`
	EnvdAccessToken string            `json:"envdAccessToken"`
}

// CreateOptions are the optional create fields.
type CreateOptions struct {
	Timeout  int               `json:"timeout,omitempty"`
	Metadata map[string]string `json:"metadata,omitempty"`
	EnvVars  map[string]string `json:"envVars,omitempty"`
}

// Create makes a sandbox (POST /v2/sandboxes).
func (c *Client) Create(ctx context.Context, template string, o CreateOptions) (*Sandbox, error) {
	body := map[string]any{"templateID": template}
	if o.Timeout > 0 {
		body["timeout"] = o.Timeout
	}
	if len(o.Metadata) > 0 {
		body["metadata"] = o.Metadata
	}
	if len(o.EnvVars) > 0 {
		body["envVars"] = o.EnvVars
	}
	var sb Sandbox
	_, _, err := c.do(ctx, "POST", "/v2/sandboxes", body, &sb)
	return &sb, err
}

// List returns every sandbox of the key (following nextToken).
func (c *Client) List(ctx context.Context) ([]Listed, error) {
	var all []Listed
	next := ""
	for {
		q := "/v2/sandboxes?limit=100"
		if next != "" {
			q += "&nextToken=" + url.QueryEscape(next)
		}
		var page []Listed
		_, h, err := c.do(ctx, "GET", q, nil, &page)
		if err != nil {
			return nil, err
		}
		all = append(all, page...)
		if next = h.Get("X-Next-Token"); next == "" {
			return all, nil
		}
	}
}

// Get returns one sandbox.
func (c *Client) Get(ctx context.Context, id string) (*Listed, error) {
	var l Listed
	_, _, err := c.do(ctx, "GET", "/sandboxes/"+url.PathEscape(id), nil, &l)
	return &l, err
}

// Kill destroys a sandbox.
func (c *Client) Kill(ctx context.Context, id string) error {
	_, _, err := c.do(ctx, "DELETE", "/sandboxes/"+url.PathEscape(id), nil, nil)
	return err
}

// Pause pauses a sandbox.
func (c *Client) Pause(ctx context.Context, id string) error {
	_, _, err := c.do(ctx, "POST", "/sandboxes/"+url.PathEscape(id)+"/pause", map[string]any{}, nil)
	return err
}

// Resume connects to (and resumes) a sandbox.
func (c *Client) Resume(ctx context.Context, id string, timeout int) (*Sandbox, error) {
	body := map[string]any{}
	if timeout > 0 {
		body["timeout"] = timeout
	}
	var sb Sandbox
	_, _, err := c.do(ctx, "POST", "/v2/sandboxes/"+url.PathEscape(id)+"/connect", body, &sb)
	return &sb, err
}

// ExecResult is the outcome of Exec.
type ExecResult struct {
	ExitCode int
	Error    string
}

// Exec runs `/bin/bash -l -c cmd` in the sandbox through the proxy (envd
// process.Process/Start), streaming stdout and stderr to the writers.
func (c *Client) Exec(ctx context.Context, id, token, cmd string, stdout, stderr io.Writer) (ExecResult, error) {
	msg, _ := json.Marshal(map[string]any{"process": map[string]any{"cmd": "/bin/bash", "args": []string{"-l", "-c", cmd}}})
	var env bytes.Buffer
	env.WriteByte(0)
	binary.Write(&env, binary.BigEndian, uint32(len(msg)))
	env.Write(msg)
	base := c.SandboxURL
	if base == "" {
		base = c.APIURL
	}
	req, err := http.NewRequestWithContext(ctx, "POST", base+"/process.Process/Start", &env)
	if err != nil {
		return ExecResult{}, err
	}
	req.Header.Set("Content-Type", "application/connect+json")
	req.Header.Set("Connect-Protocol-Version", "1")
	req.Header.Set("E2b-Sandbox-Id", id)
	req.Header.Set("E2b-Sandbox-Port", "49983")
	req.Header.Set("Keepalive-Ping-Interval", "50")
	if token != "" {
		req.Header.Set("X-Access-Token", token)
	}
	res, err := c.HTTP.Do(req)
	if err != nil {
		return ExecResult{}, errs.Wrap(errs.Unavailable, err, "cannot reach the sandbox")
	}
	defer res.Body.Close()
	if res.StatusCode != 200 {
		b, _ := io.ReadAll(io.LimitReader(res.Body, 4096))
		return ExecResult{}, &APIError{Status: res.StatusCode, Message: strings.TrimSpace(string(b))}
	}
	br := bufio.NewReader(res.Body)
	var result *ExecResult
	for {
		var hdr [5]byte
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if result != nil {
				return *result, nil
			}
			return ExecResult{}, fmt.Errorf("process stream ended without a result: %w", err)
		}
		n := binary.BigEndian.Uint32(hdr[1:])
		if n > 64<<20 {
			return ExecResult{}, fmt.Errorf("process stream frame of %d bytes", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(br, body); err != nil {
			return ExecResult{}, err
		}
		if hdr[0]&2 != 0 { // end of stream
			var end struct {
				Error *struct{ Code, Message string } `json:"error"`
			}
			json.Unmarshal(body, &end)
			if end.Error != nil {
				return ExecResult{}, fmt.Errorf("%s: %s", end.Error.Code, end.Error.Message)
			}
			if result == nil {
				return ExecResult{}, fmt.Errorf("process exited without a result")
			}
			return *result, nil
		}
		var ev struct {
			Event struct {
				Data *struct {
					Stdout string `json:"stdout"`
					Stderr string `json:"stderr"`
				} `json:"data"`
				End *struct {
					ExitCode int    `json:"exitCode"`
					Error    string `json:"error"`
				} `json:"end"`
			} `json:"event"`
		}
		if err := json.Unmarshal(body, &ev); err != nil {
			return ExecResult{}, fmt.Errorf("decode process event: %w", err)
		}
		if d := ev.Event.Data; d != nil {
			if b, err := base64.StdEncoding.DecodeString(d.Stdout); err == nil && stdout != nil {
				stdout.Write(b)
			}
			if b, err := base64.StdEncoding.DecodeString(d.Stderr); err == nil && stderr != nil {
				stderr.Write(b)
			}
		}
		if e := ev.Event.End; e != nil {
			result = &ExecResult{ExitCode: e.ExitCode, Error: e.Error}
		}
	}
}
