package cluster

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/node"
)

// AgentConfig configures a node's Agent.
type AgentConfig struct {
	ControlURL string // e.g. http://control:3000
	Token      string
	Advertise  string // host:port the control reaches the node API at
	Interval   time.Duration
}

// Agent registers a node with the control and heartbeats.
type Agent struct {
	cfg  AgentConfig
	n    *node.Node
	log  *slog.Logger
	http *http.Client

	mu     sync.Mutex
	cursor string // newest event id the control acknowledged (guarded by mu)
}

// NewAgent returns an Agent for n.
func NewAgent(cfg AgentConfig, n *node.Node, log *slog.Logger) (*Agent, error) {
	if cfg.Token == "" {
		return nil, errs.E(errs.InvalidArgument, "a node needs the cluster token (config clusterToken, CUBE_CLUSTER_TOKEN or --cluster-token)")
	}
	if !strings.HasPrefix(cfg.ControlURL, "http://") && !strings.HasPrefix(cfg.ControlURL, "https://") {
		return nil, errs.E(errs.InvalidArgument, "--join wants the control's URL (http://HOST:PORT), got %q", cfg.ControlURL)
	}
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultHeartbeat
	}
	cfg.ControlURL = strings.TrimRight(cfg.ControlURL, "/")
	return &Agent{cfg: cfg, n: n, log: log.With("component", "cluster-agent"), http: &http.Client{Timeout: 10 * time.Second}}, nil
}

// Report builds the node's current report.
func (a *Agent) Report(ctx context.Context) (*Report, error) {
	ts, err := a.n.Store().ListTemplates(ctx)
	if err != nil {
		return nil, err
	}
	a.mu.Lock()
	cursor := a.cursor
	a.mu.Unlock()
	evs, err := a.n.Store().EventsAfter(ctx, cursor, maxEvents)
	if err != nil {
		return nil, err
	}
	return &Report{ID: a.n.ID(), Address: a.cfg.Advertise, Runtime: a.n.Runtime().Name(), Capacity: a.n.Capacity(),
		Free: max(a.n.Free(), 0), Sandboxes: a.n.List(), Templates: ts, Events: evs}, nil
}

// Beat sends one report.
func (a *Agent) Beat(ctx context.Context) error {
	rep, err := a.Report(ctx)
	if err != nil {
		return err
	}
	b, _ := json.Marshal(rep)
	req, err := http.NewRequestWithContext(ctx, "POST", a.cfg.ControlURL+"/cluster/v1/heartbeat", bytes.NewReader(b))
	if err != nil {
		return errs.Wrap(errs.InvalidArgument, err, "control URL %q", a.cfg.ControlURL)
	}
	req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
	req.Header.Set("Content-Type", "application/json")
	res, err := a.http.Do(req)
	if err != nil {
		return &errs.Error{Kind: errs.Unavailable, Err: err, Msg: "the control at " + a.cfg.ControlURL + " is unreachable"}
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if res.StatusCode != http.StatusOK {
		return decodeErr(res.StatusCode, body)
	}
	var reply ReportReply
	json.Unmarshal(body, &reply)
	a.mu.Lock()
	if n := len(rep.Events); n > 0 && rep.Events[n-1].ID > a.cursor {
		a.cursor = rep.Events[n-1].ID
	}
	if reply.EventCursor > a.cursor {
		a.cursor = reply.EventCursor
	}
	a.mu.Unlock()
	return nil
}

// Check asks the control whether it takes this node's token (GET
// /cluster/v1/ping), retrying while it is unreachable, until ctx ends: a
// node with a wrong token fails before it starts its runtime.
func (a *Agent) Check(ctx context.Context) error {
	for {
		err := a.ping(ctx)
		if err == nil || !errs.Is(err, errs.Unavailable) {
			return err
		}
		a.log.Warn("control unreachable; retrying", "control", a.cfg.ControlURL, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(a.cfg.Interval):
		}
	}
}

func (a *Agent) ping(ctx context.Context) error {
	req, err := http.NewRequestWithContext(ctx, "GET", a.cfg.ControlURL+"/cluster/v1/ping", nil)
	if err != nil {
		return errs.Wrap(errs.InvalidArgument, err, "control URL %q", a.cfg.ControlURL)
	}
	req.Header.Set("Authorization", "Bearer "+a.cfg.Token)
	res, err := a.http.Do(req)
	if err != nil {
		return &errs.Error{Kind: errs.Unavailable, Err: err, Msg: "the control at " + a.cfg.ControlURL + " is unreachable"}
	}
	defer res.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(res.Body, 64<<10))
	if res.StatusCode != http.StatusNoContent {
		return decodeErr(res.StatusCode, body)
	}
	return nil
}

// Register sends the first report, retrying while the control is
// unreachable, until ctx ends. A refusal (bad token, bad report) is
// returned at once.
func (a *Agent) Register(ctx context.Context) error {
	for {
		err := a.Beat(ctx)
		if err == nil {
			a.log.Info("registered with the control", "control", a.cfg.ControlURL, "node", a.n.ID(), "advertise", a.cfg.Advertise)
			return nil
		}
		if !errs.Is(err, errs.Unavailable) {
			return err
		}
		a.log.Warn("control unreachable; retrying", "control", a.cfg.ControlURL, "err", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(a.cfg.Interval):
		}
	}
}

// Run heartbeats until ctx ends. Failures are logged once per outage.
func (a *Agent) Run(ctx context.Context) {
	t := time.NewTicker(a.cfg.Interval)
	defer t.Stop()
	failing := false
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		err := a.Beat(ctx)
		switch {
		case err != nil && !failing && ctx.Err() == nil:
			failing = true
			a.log.Warn("heartbeat failed", "control", a.cfg.ControlURL, "err", err)
		case err == nil && failing:
			failing = false
			a.log.Info("heartbeat back", "control", a.cfg.ControlURL)
		}
	}
}
