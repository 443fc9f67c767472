// Package api serves Cube's E2B-compatible control plane: the REST API of
// /work/shared/spec/e2b-compat.md §3 (both the v1 and v2 generations),
// authenticated with X-API-KEY keys (stored hashed; a key sees only its own
// sandboxes), answering errors as {"code","message"} with the status from
// the errs kind, a request id on every response, and Prometheus metrics.
//
// It talks to the nodes through internal/master and to the store for
// templates, keys and history. The sandbox proxy (internal/proxy) shares
// the listener; internal/server puts the two together.
package api

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// DefaultEnvdVersion is reported when a template does not record the
// version of its agent.
const DefaultEnvdVersion = "0.6.13"

// ClientID is the constant the SDKs require in Sandbox answers.
const ClientID = "cube"

// Config configures the API.
type Config struct {
	Domain         string        // sandbox domain returned to clients ("" = null)
	DefaultTimeout time.Duration // v2 default sandbox timeout (300 s)
	// UI is served at /ui/ (the web UI mount point; nil = none).
	UI http.Handler
}

// API is the REST handler.
type API struct {
	cfg     Config
	m       *master.Master
	st      *store.Store
	log     *slog.Logger
	metrics *Metrics
	mux     *http.ServeMux
}

// New returns the API handler.
func New(cfg Config, m *master.Master, st *store.Store, metrics *Metrics, log *slog.Logger) *API {
	if cfg.DefaultTimeout <= 0 {
		cfg.DefaultTimeout = 300 * time.Second
	}
	a := &API{cfg: cfg, m: m, st: st, log: log.With("component", "api"), metrics: metrics, mux: http.NewServeMux()}
	h := a.mux.HandleFunc
	h("GET /health", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, map[string]string{"status": "ok"})
	})
	if cfg.UI != nil {
		a.mux.Handle("GET /ui/", cfg.UI)
		h("GET /ui", func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "/ui/", http.StatusMovedPermanently)
		})
	}
	h("GET /metrics", promhttp.HandlerFor(metrics.Registry, promhttp.HandlerOpts{}).ServeHTTP)
	h("POST /sandboxes", a.auth(a.createV1))
	h("POST /v2/sandboxes", a.auth(a.createV2))
	h("GET /sandboxes", a.auth(a.listV1))
	h("GET /v2/sandboxes", a.auth(a.listV2))
	h("GET /sandboxes/metrics", a.auth(a.metricsMany))
	h("GET /sandboxes/{id}", a.auth(a.get))
	h("DELETE /sandboxes/{id}", a.auth(a.kill))
	h("POST /sandboxes/{id}/connect", a.auth(a.connect))
	h("POST /v2/sandboxes/{id}/connect", a.auth(a.connect))
	h("POST /sandboxes/{id}/pause", a.auth(a.pause))
	h("POST /sandboxes/{id}/resume", a.auth(a.resume))
	h("POST /sandboxes/{id}/timeout", a.auth(a.setTimeout))
	h("POST /sandboxes/{id}/refreshes", a.auth(a.refresh))
	h("GET /sandboxes/{id}/logs", a.auth(a.logsV1))
	h("GET /v2/sandboxes/{id}/logs", a.auth(a.logsV2))
	h("GET /sandboxes/{id}/metrics", a.auth(a.metricsOne))
	h("PUT /sandboxes/{id}/network", a.auth(a.network))
	h("GET /templates", a.auth(a.templates))
	h("POST /sandboxes/{id}/snapshots", a.auth(a.createSnapshot))
	h("GET /snapshots", a.auth(a.listSnapshots))
	h("DELETE /templates/{templateID}", a.auth(a.deleteTemplate))
	h("POST /sandboxes/{id}/fork", a.auth(a.fork))
	h("/", func(w http.ResponseWriter, r *http.Request) {
		writeErr(w, r, errs.E(errs.NotFound, "no route %s %s", r.Method, r.URL.Path))
	})
	return a
}

func (a *API) ServeHTTP(w http.ResponseWriter, r *http.Request) { a.mux.ServeHTTP(w, r) }

// ---- plumbing ----

type keyCtx struct{}

// auth requires a live X-API-KEY and puts its record in the context.
func (a *API) auth(next func(http.ResponseWriter, *http.Request, store.APIKey)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		key := r.Header.Get("X-API-Key")
		if key == "" {
			writeErr(w, r, errs.E(errs.Unauthenticated, "missing X-API-KEY header"))
			return
		}
		k, err := a.st.Authenticate(r.Context(), key)
		if err != nil {
			writeErr(w, r, err)
			return
		}
		next(w, r, k)
	}
}

// ErrorBody is the E2B error answer.
type ErrorBody struct {
	Code    int    `json:"code"`
	Message string `json:"message"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// WriteError answers err as {"code","message"} with the status of its kind
// and Retry-After when the error carries a hint.
func WriteError(w http.ResponseWriter, err error) {
	k := errs.KindOf(err)
	status := errs.HTTPStatus(k)
	if ra := errs.RetryAfterOf(err); ra > 0 || k == errs.ResourceExhausted || k == errs.Unavailable {
		if ra <= 0 {
			ra = 5 * time.Second
		}
		w.Header().Set("Retry-After", secondsFromDuration(ra))
	}
	writeJSON(w, status, ErrorBody{Code: status, Message: errs.Message(err)})
}

func writeErr(w http.ResponseWriter, r *http.Request, err error) {
	if errs.KindOf(err) == errs.Internal {
		if l, ok := r.Context().Value(logCtx{}).(*slog.Logger); ok {
			l.Error("request failed", "err", err)
		}
	}
	WriteError(w, err)
}

// decode reads a JSON body into v. An empty body is allowed when
// emptyOK (v keeps its zero value).
func decode(r *http.Request, v any, emptyOK bool) error {
	body, err := io.ReadAll(io.LimitReader(r.Body, MaxBodyBytes+1))
	if err != nil {
		return errs.Wrap(errs.InvalidArgument, err, "read request body")
	}
	if len(body) > MaxBodyBytes {
		return errs.E(errs.TooLarge, "request body is larger than %d bytes", MaxBodyBytes)
	}
	if len(strings.TrimSpace(string(body))) == 0 {
		if emptyOK {
			return nil
		}
		return errs.E(errs.InvalidArgument, "request body is empty")
	}
	dec := json.NewDecoder(strings.NewReader(string(body)))
	if err := dec.Decode(v); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return errs.E(errs.InvalidArgument, "field %q must be %s, not %s", te.Field, jsonType(te.Type.String()), te.Value)
		}
		return errs.Wrap(errs.InvalidArgument, err, "request body is not valid JSON")
	}
	if dec.More() {
		return errs.E(errs.InvalidArgument, "request body has data after the JSON value")
	}
	return nil
}

func jsonType(goType string) string {
	switch {
	case strings.Contains(goType, "int"):
		return "an integer"
	case strings.Contains(goType, "bool"):
		return "a boolean"
	case strings.Contains(goType, "string") && strings.HasPrefix(goType, "map"):
		return "an object of strings"
	case strings.Contains(goType, "string") && strings.HasPrefix(goType, "[]"):
		return "an array of strings"
	case goType == "string":
		return "a string"
	}
	return "of type " + goType
}

// own returns the live sandbox id if it belongs to key (NotFound
// otherwise: another key's sandbox does not exist for this key).
func (a *API) own(ctx context.Context, key store.APIKey, id string) (*store.Sandbox, master.Node, error) {
	sb, n, err := a.m.Locate(ctx, id)
	if err != nil || sb.KeyID != key.ID {
		return nil, nil, errs.E(errs.NotFound, "sandbox %q not found", truncate(id, 64))
	}
	return sb, n, nil
}

const idAlphabet = "abcdefghijklmnopqrstuvwxyz0123456789"

// NewSandboxID returns a random 20-character id matching ^[a-z0-9]+$.
func NewSandboxID() string {
	b := make([]byte, 20)
	rand.Read(b)
	for i := range b {
		b[i] = idAlphabet[int(b[i])%len(idAlphabet)]
	}
	// Start with a letter so that <port>-<id> host labels stay readable.
	b[0] = idAlphabet[int(b[0])%26]
	return string(b)
}

func (a *API) domain() *string {
	if a.cfg.Domain == "" {
		return nil
	}
	d := a.cfg.Domain
	return &d
}

func envdVersion(sb *store.Sandbox) string {
	if sb.EnvdVersion != "" {
		return sb.EnvdVersion
	}
	return DefaultEnvdVersion
}

func (a *API) sandboxBody(sb *store.Sandbox) Sandbox {
	out := Sandbox{SandboxID: sb.ID, TemplateID: sb.TemplateID, Alias: sb.Alias, ClientID: ClientID,
		EnvdVersion: envdVersion(sb), EnvdAccessToken: sb.EnvdToken, Domain: a.domain()}
	if sb.TrafficToken != "" {
		t := sb.TrafficToken
		out.TrafficAccessToken = &t
	}
	return out
}

func listed(sb *store.Sandbox) ListedSandbox {
	md := sb.Metadata
	if len(md) == 0 {
		md = nil
	}
	return ListedSandbox{TemplateID: sb.TemplateID, Alias: sb.Alias, SandboxID: sb.ID, ClientID: ClientID,
		StartedAt: sb.StartedAt.UTC(), EndAt: sb.EndAt.UTC(), CPUCount: sb.CPUCount, MemoryMB: sb.MemoryMB,
		DiskSizeMB: sb.DiskMB, State: publicState(sb.State), EnvdVersion: envdVersion(sb), Metadata: md,
		VolumeMounts: []any{}}
}

// ---- handlers ----

func (a *API) createV1(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	a.create(w, r, key, false)
}

func (a *API) createV2(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	a.create(w, r, key, true)
}

func (a *API) create(w http.ResponseWriter, r *http.Request, key store.APIKey, v2 bool) {
	start := time.Now()
	var req NewSandbox
	if err := decode(r, &req, false); err != nil {
		writeErr(w, r, err)
		return
	}
	if err := ValidateNewSandbox(&req); err != nil {
		writeErr(w, r, err)
		return
	}
	// The templateID is a template's id or alias, or else a snapshot of
	// the caller's (id or name).
	var (
		snap *store.Snapshot
		src  *store.Sandbox
	)
	tpl, err := a.st.ResolveTemplate(r.Context(), req.TemplateID)
	if errs.Is(err, errs.NotFound) {
		if t, sn, sb, serr := a.fromSnapshot(r.Context(), key, req.TemplateID); serr == nil || !errs.Is(serr, errs.NotFound) {
			tpl, snap, src, err = t, sn, sb, serr
		}
	}
	if err != nil {
		writeErr(w, r, err)
		return
	}
	if tpl.State != "" && tpl.State != "ready" {
		writeErr(w, r, errs.E(errs.FailedPrecondition, "template %q is not ready (%s)", req.TemplateID, tpl.State))
		return
	}
	timeout := a.cfg.DefaultTimeout
	if !v2 {
		timeout = 15 * time.Second
	}
	if req.Timeout != nil && *req.Timeout > 0 {
		timeout = time.Duration(*req.Timeout) * time.Second
	}
	nreq := node.CreateRequest{
		ID: NewSandboxID(), KeyID: key.ID, Template: tpl, Alias: req.TemplateID, Timeout: timeout,
		Metadata: req.Metadata, EnvVars: req.EnvVars, AllowInternet: req.AllowInternetAccess,
		AutoPause: req.AutoPause != nil && *req.AutoPause, AutoPauseMemory: req.AutoPauseMemory == nil || *req.AutoPauseMemory,
		AutoResume: req.AutoResume != nil && req.AutoResume.Enabled,
	}
	if v2 || (req.Secure != nil && *req.Secure) || (snap != nil && (src == nil || src.EnvdToken != "")) {
		// A restored agent keeps its source's token unless it gets a new one.
		nreq.EnvdToken = store.RandomHex(24)
	}
	if req.Network != nil {
		nreq.Network = store.Network{AllowOut: req.Network.AllowOut, DenyOut: req.Network.DenyOut,
			AllowPublicTraffic: req.Network.AllowPublicTraffic, MaskRequestHost: req.Network.MaskRequestHost}
		if req.Network.AllowPublicTraffic != nil && !*req.Network.AllowPublicTraffic {
			nreq.TrafficToken = store.RandomHex(24)
		}
	}
	var sb *store.Sandbox
	if snap != nil {
		nreq.SnapshotID = snap.ID
		if src != nil {
			nreq.SnapshotAccessToken = src.EnvdToken
		}
		sb, err = a.m.CreateOn(r.Context(), snap.NodeID, nreq)
	} else {
		sb, err = a.m.Create(r.Context(), nreq)
	}
	if err != nil {
		a.metrics.CreateErrors.WithLabelValues(errs.KindOf(err).String()).Inc()
		writeErr(w, r, err)
		return
	}
	a.metrics.CreateLatency.WithLabelValues(tpl.ID).Observe(time.Since(start).Seconds())
	if snap == nil {
		a.st.TemplateSpawned(context.WithoutCancel(r.Context()), tpl.ID)
	}
	writeJSON(w, http.StatusCreated, a.sandboxBody(sb))
}

func (a *API) get(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	sb, _, err := a.own(r.Context(), key, r.PathValue("id"))
	if err != nil {
		writeErr(w, r, err)
		return
	}
	d := SandboxDetail{ListedSandbox: listed(sb), EnvdAccessToken: sb.EnvdToken, Domain: a.domain(),
		AllowInternetAccess: sb.AllowInternet, Lifecycle: Lifecycle{OnTimeout: "kill", AutoResume: sb.AutoResume}}
	if sb.AutoPause {
		d.Lifecycle.OnTimeout = "pause"
	}
	nw := sb.Network
	d.Network = &nw
	writeJSON(w, http.StatusOK, d)
}

func (a *API) kill(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	a.onNode(w, r, key, func(n master.Node, id string) error { return n.Kill(r.Context(), id) })
}

// onNode runs op on the node holding the caller's sandbox named in the
// path and replies 204 No Content, or the error.
func (a *API) onNode(w http.ResponseWriter, r *http.Request, key store.APIKey, op func(n master.Node, id string) error) {
	id := r.PathValue("id")
	_, n, err := a.own(r.Context(), key, id)
	if err == nil {
		err = op(n, id)
	}
	if err != nil {
		writeErr(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

type timeoutBody struct {
	Timeout *int64 `json:"timeout,omitempty"`
	Memory  *bool  `json:"memory,omitempty"`
}

func (a *API) connect(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body timeoutBody
	if err := decode(r, &body, true); err != nil {
		writeErr(w, r, err)
		return
	}
	timeout, err := timeoutOr(body.Timeout, a.cfg.DefaultTimeout)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	id := r.PathValue("id")
	_, n, err := a.own(r.Context(), key, id)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	sb, resumed, err := n.Connect(r.Context(), id, timeout)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	status := http.StatusOK
	if resumed {
		status = http.StatusCreated
	}
	writeJSON(w, status, a.sandboxBody(sb))
}

// timeoutOr is the checked timeout t in seconds, def when t is absent or 0.
func timeoutOr(t *int64, def time.Duration) (time.Duration, error) {
	if t == nil {
		return def, nil
	}
	if err := checkTimeout("timeout", *t); err != nil {
		return 0, err
	}
	if *t > 0 {
		return time.Duration(*t) * time.Second, nil
	}
	return def, nil
}

func (a *API) pause(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body timeoutBody
	if err := decode(r, &body, true); err != nil {
		writeErr(w, r, err)
		return
	}
	a.onNode(w, r, key, func(n master.Node, id string) error { return n.Pause(r.Context(), id) })
}

func (a *API) resume(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body struct {
		Timeout   *int64 `json:"timeout,omitempty"`
		AutoPause *bool  `json:"autoPause,omitempty"`
		Memory    *bool  `json:"memory,omitempty"`
	}
	if err := decode(r, &body, true); err != nil {
		writeErr(w, r, err)
		return
	}
	timeout, err := timeoutOr(body.Timeout, 15*time.Second)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	id := r.PathValue("id")
	_, n, err := a.own(r.Context(), key, id)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	sb, err := n.Resume(r.Context(), id, timeout)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, a.sandboxBody(sb))
}

func (a *API) setTimeout(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body timeoutBody
	if err := decode(r, &body, false); err != nil {
		writeErr(w, r, err)
		return
	}
	if body.Timeout == nil {
		writeErr(w, r, errs.E(errs.InvalidArgument, "timeout is required"))
		return
	}
	if err := checkTimeout("timeout", *body.Timeout); err != nil {
		writeErr(w, r, err)
		return
	}
	a.onNode(w, r, key, func(n master.Node, id string) error {
		return n.SetTimeout(r.Context(), id, time.Duration(*body.Timeout)*time.Second)
	})
}

func (a *API) refresh(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body struct {
		Duration *int64 `json:"duration,omitempty"`
	}
	if err := decode(r, &body, true); err != nil {
		writeErr(w, r, err)
		return
	}
	d := a.cfg.DefaultTimeout
	if body.Duration != nil {
		if *body.Duration < 0 || *body.Duration > 3600 {
			writeErr(w, r, errs.E(errs.InvalidArgument, "duration must be 0 to 3600 seconds"))
			return
		}
		d = time.Duration(*body.Duration) * time.Second
	}
	a.onNode(w, r, key, func(n master.Node, id string) error { return n.Refresh(r.Context(), id, d) })
}

// parseMetadataQuery decodes E2B's double-encoded metadata filter
// (`metadata=user%3Dabc%26app%3Dprod`).
func parseMetadataQuery(q url.Values) (map[string]string, error) {
	out := map[string]string{}
	for _, raw := range q["metadata"] {
		vals, err := url.ParseQuery(raw)
		if err != nil {
			return nil, errs.E(errs.InvalidArgument, "metadata filter %q is not a query string", truncate(raw, 64))
		}
		for k, v := range vals {
			if k == "" || len(v) == 0 {
				continue
			}
			out[k] = v[len(v)-1]
		}
	}
	if len(out) > MaxMetadataKeys {
		return nil, errs.E(errs.InvalidArgument, "too many metadata filters")
	}
	return out, nil
}

func (a *API) listV1(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	md, err := parseMetadataQuery(r.URL.Query())
	if err != nil {
		writeErr(w, r, err)
		return
	}
	sbs, _, err := a.st.ListSandboxes(r.Context(), store.SandboxFilter{KeyID: key.ID, Metadata: md,
		States: []store.SandboxState{store.StateRunning, store.StateCreating, store.StateResuming}})
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := make([]ListedSandbox, 0, len(sbs))
	for _, sb := range sbs {
		out = append(out, listed(sb))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) listV2(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	q := r.URL.Query()
	md, err := parseMetadataQuery(q)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	states, err := parseStates(q["state"])
	if err != nil {
		writeErr(w, r, err)
		return
	}
	f := store.SandboxFilter{KeyID: key.ID, Metadata: md, States: states, Template: q.Get("template"), Limit: 100, Cursor: q.Get("nextToken")}
	limit, err := queryInt(q, "limit", int64(f.Limit), 1, 100, "limit must be an integer from 1 to 100")
	if err != nil {
		writeErr(w, r, err)
		return
	}
	f.Limit = int(limit)
	switch q.Get("order") {
	case "", "desc":
	case "asc":
		f.Ascending = true
	default:
		writeErr(w, r, errs.E(errs.InvalidArgument, "order must be asc or desc"))
		return
	}
	if v := q.Get("startedAfter"); v != "" {
		t, err := time.Parse(time.RFC3339, v)
		if err != nil {
			writeErr(w, r, errs.E(errs.InvalidArgument, "startedAfter must be an RFC 3339 time"))
			return
		}
		f.StartedAfter = t
	}
	sbs, next, err := a.st.ListSandboxes(r.Context(), f)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := make([]ListedSandbox, 0, len(sbs))
	for _, sb := range sbs {
		out = append(out, listed(sb))
	}
	if next != "" {
		w.Header().Set("X-Next-Token", next)
	}
	writeJSON(w, http.StatusOK, out)
}

// history returns a sandbox record in any state (logs of a killed sandbox
// stay readable) if it belongs to key.
func (a *API) history(ctx context.Context, key store.APIKey, id string) (*store.Sandbox, error) {
	sb, err := a.st.GetSandbox(ctx, id)
	if err != nil || sb.KeyID != key.ID {
		return nil, errs.E(errs.NotFound, "sandbox %q not found", truncate(id, 64))
	}
	return sb, nil
}

func eventText(e *store.Event) string {
	switch e.Kind {
	case "transition":
		s := "sandbox " + string(e.To)
		if e.Message != "" {
			s += ": " + e.Message
		}
		return s
	}
	return e.Kind + ": " + e.Message
}

func eventEntry(e *store.Event) SandboxLogEntry {
	level := "info"
	if e.Kind == "error" || e.To == store.StateFailed {
		level = "error"
	}
	return SandboxLogEntry{Timestamp: e.At, Level: level, Message: eventText(e),
		Fields: map[string]string{"event": e.Kind, "from": string(e.From), "to": string(e.To), "id": e.ID}}
}

// queryInt parses the query parameter name as an integer from lo to hi
// (def when it is absent); anything else is an InvalidArgument error msg.
func queryInt(q url.Values, name string, def, lo, hi int64, msg string) (int64, error) {
	v := q.Get(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n < lo || n > hi {
		return 0, errs.E(errs.InvalidArgument, "%s", msg)
	}
	return n, nil
}

func (a *API) logsV1(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	id := r.PathValue("id")
	if _, err := a.history(r.Context(), key, id); err != nil {
		writeErr(w, r, err)
		return
	}
	q := r.URL.Query()
	limit, err := queryInt(q, "limit", 1000, 0, math.MaxInt64, "limit must be a non-negative integer")
	if err != nil {
		writeErr(w, r, err)
		return
	}
	startMS, err := queryInt(q, "start", 0, 0, math.MaxInt64, "start must be a Unix time in milliseconds")
	if err != nil {
		writeErr(w, r, err)
		return
	}
	evs, err := a.st.ListEvents(r.Context(), id, "", false, 0)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := struct {
		Logs       []SandboxLog      `json:"logs"`
		LogEntries []SandboxLogEntry `json:"logEntries"`
	}{Logs: []SandboxLog{}, LogEntries: []SandboxLogEntry{}}
	for _, e := range evs {
		if e.At.UnixMilli() < startMS || int64(len(out.Logs)) >= limit {
			continue
		}
		out.Logs = append(out.Logs, SandboxLog{Timestamp: e.At, Line: eventText(e)})
		out.LogEntries = append(out.LogEntries, eventEntry(e))
	}
	writeJSON(w, http.StatusOK, out)
}

func (a *API) logsV2(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	id := r.PathValue("id")
	if _, err := a.history(r.Context(), key, id); err != nil {
		writeErr(w, r, err)
		return
	}
	q := r.URL.Query()
	limit, err := queryInt(q, "limit", 1000, 1, 1000, "limit must be an integer from 1 to 1000")
	if err != nil {
		writeErr(w, r, err)
		return
	}
	desc := false
	switch q.Get("direction") {
	case "", "forward":
	case "backward":
		desc = true
	default:
		writeErr(w, r, errs.E(errs.InvalidArgument, "direction must be forward or backward"))
		return
	}
	cursorMS, err := queryInt(q, "cursor", -1, 0, math.MaxInt64, "cursor must be a Unix time in milliseconds")
	if err != nil {
		writeErr(w, r, err)
		return
	}
	evs, err := a.st.ListEvents(r.Context(), id, "", desc, 0)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := struct {
		Logs []SandboxLogEntry `json:"logs"`
	}{Logs: []SandboxLogEntry{}}
	for _, e := range evs {
		at := e.At.UnixMilli()
		if cursorMS >= 0 && ((!desc && at < cursorMS) || (desc && at > cursorMS)) {
			continue
		}
		if int64(len(out.Logs)) >= limit {
			break
		}
		out.Logs = append(out.Logs, eventEntry(e))
	}
	writeJSON(w, http.StatusOK, out)
}

func metricOf(s runtime.Stats) SandboxMetric {
	return SandboxMetric{Timestamp: s.Timestamp.UTC(), TimestampUnix: s.Timestamp.Unix(), CPUCount: s.CPUCount,
		CPUUsedPct: math.Round(s.CPUUsedPct*100) / 100, MemUsed: int64(s.MemUsed), MemTotal: int64(s.MemTotal),
		DiskUsed: int64(s.DiskUsed), DiskTotal: int64(s.DiskTotal)}
}

// MaxMetricsTime bounds the start and end of a metrics query (the end of
// year 9999, in Unix seconds).
const MaxMetricsTime = 253402300799

// ParseMetricsRange reads the optional start and end (Unix seconds) of
// GET /sandboxes/{id}/metrics; absent they mean the beginning of the
// history and no upper bound.
func ParseMetricsRange(q url.Values) (time.Time, time.Time, error) {
	start, err := queryInt(q, "start", 0, 0, MaxMetricsTime, "start must be a Unix time in seconds (an integer from 0 to 253402300799)")
	if err != nil {
		return time.Time{}, time.Time{}, err
	}
	end, err := queryInt(q, "end", MaxMetricsTime, 0, MaxMetricsTime, "end must be a Unix time in seconds (an integer from 0 to 253402300799)")
	if err != nil {
		return time.Time{}, time.Time{}, err
	}
	if start > end {
		return time.Time{}, time.Time{}, errs.E(errs.InvalidArgument, "start (%d) must not be after end (%d)", start, end)
	}
	return time.Unix(start, 0), time.Unix(end, 0), nil
}

// metricsOne serves GET /sandboxes/{id}/metrics?start=&end=: the samples
// of the node's metrics history in the range, oldest first (running and
// paused sandboxes; a paused one gets no new samples).
func (a *API) metricsOne(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	start, end, err := ParseMetricsRange(r.URL.Query())
	if err != nil {
		writeErr(w, r, err)
		return
	}
	id := r.PathValue("id")
	_, n, err := a.own(r.Context(), key, id)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	ss, err := n.Metrics(r.Context(), id, start, end)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := make([]SandboxMetric, 0, len(ss))
	for _, s := range ss {
		out = append(out, metricOf(s))
	}
	writeJSON(w, http.StatusOK, out)
}

// MaxMetricsIDs is the most sandbox ids GET /sandboxes/metrics takes.
const MaxMetricsIDs = 100

// metricsMany serves GET /sandboxes/metrics?sandbox_ids=a,b: the newest
// sample of each of the key's live sandboxes among the ids (others, and
// sandboxes without a sample, are left out).
func (a *API) metricsMany(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var ids []string
	for _, v := range r.URL.Query()["sandbox_ids"] {
		for _, id := range strings.Split(v, ",") {
			if id = strings.TrimSpace(id); id != "" {
				ids = append(ids, id)
			}
		}
	}
	if len(ids) == 0 {
		writeErr(w, r, errs.E(errs.InvalidArgument, "sandbox_ids is required: a comma-separated list of sandbox ids"))
		return
	}
	if len(ids) > MaxMetricsIDs {
		writeErr(w, r, errs.E(errs.InvalidArgument, "at most %d sandbox_ids", MaxMetricsIDs))
		return
	}
	out := map[string]SandboxMetric{}
	for _, id := range ids {
		_, n, err := a.own(r.Context(), key, id)
		if err != nil {
			continue
		}
		if ss, err := n.Metrics(r.Context(), id, time.Unix(0, 0), time.Unix(MaxMetricsTime, 0)); err == nil && len(ss) > 0 {
			out[id] = metricOf(ss[len(ss)-1])
		}
	}
	writeJSON(w, http.StatusOK, map[string]any{"sandboxes": out})
}

// NetworkUpdate is the body of PUT /sandboxes/{id}/network.
type NetworkUpdate struct {
	AllowOut            []string `json:"allowOut"`
	DenyOut             []string `json:"denyOut"`
	AllowInternetAccess *bool    `json:"allowInternetAccess,omitempty"`
	AllowInternetSnake  *bool    `json:"allow_internet_access,omitempty"`
}

func (a *API) network(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body NetworkUpdate
	if err := decode(r, &body, false); err != nil {
		writeErr(w, r, err)
		return
	}
	if err := checkEgress(body.AllowOut, body.DenyOut); err != nil {
		writeErr(w, r, err)
		return
	}
	allow := body.AllowInternetAccess
	if allow == nil {
		allow = body.AllowInternetSnake
	}
	id := r.PathValue("id")
	sb, n, err := a.own(r.Context(), key, id)
	if err == nil {
		if allow == nil {
			allow = sb.AllowInternet
		}
		err = n.SetNetwork(r.Context(), id, allow, store.Network{AllowOut: body.AllowOut, DenyOut: body.DenyOut})
	}
	if err != nil {
		writeErr(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

func (a *API) templates(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	ts, err := a.st.ListTemplates(r.Context())
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := make([]Template, 0, len(ts))
	for _, t := range ts {
		tt := Template{TemplateID: t.ID, BuildID: t.ID, CPUCount: t.CPUCount, MemoryMB: t.MemoryMB, DiskSizeMB: t.DiskMB,
			Public: t.Public, Aliases: append([]string{}, t.Aliases...), CreatedAt: t.CreatedAt, UpdatedAt: t.UpdatedAt,
			SpawnCount: t.SpawnCount, BuildCount: 1, EnvdVersion: t.EnvdVersion, BuildStatus: t.State}
		if tt.EnvdVersion == "" {
			tt.EnvdVersion = DefaultEnvdVersion
		}
		if !t.LastSpawnedAt.IsZero() {
			l := t.LastSpawnedAt
			tt.LastSpawnedAt = &l
		}
		out = append(out, tt)
	}
	writeJSON(w, http.StatusOK, out)
}
