// Package proxy is the sandbox proxy: it forwards data-plane traffic
// (envd on 49983, the code interpreter on 49999, any exposed port) to a
// port inside a sandbox, on the same listener as the API.
//
// Routing: the E2b-Sandbox-Id and E2b-Sandbox-Port headers when present,
// else the Host `<port>-<id>.<domain>`. Unknown, killed or paused
// sandboxes get 502 with E2B's JSON body (a paused sandbox created with
// autoResume is resumed first). Sandboxes created with
// allowPublicTraffic=false require E2B-Traffic-Access-Token on every port
// but envd's. Streams are relayed without buffering or compression
// (FlushInterval -1), WebSocket and other upgrades are passed through, and
// connections to the sandbox are made by the node's runtime
// (runtime.Runtime.Dial), so the proxy never needs a route to the sandbox
// network.
package proxy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"regexp"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// Header names used by the E2B SDKs.
const (
	HeaderSandboxID    = "E2b-Sandbox-Id"
	HeaderSandboxPort  = "E2b-Sandbox-Port"
	HeaderTrafficToken = "E2B-Traffic-Access-Token"
)

// Locator finds a live sandbox and its node (*master.Master).
type Locator interface {
	Locate(ctx context.Context, id string) (*store.Sandbox, master.Node, error)
}

// Proxy is the sandbox proxy handler.
type Proxy struct {
	loc    Locator
	domain string
	log    *slog.Logger
	bytes  *prometheus.CounterVec
	reqs   *prometheus.CounterVec
	rp     *httputil.ReverseProxy
	tr     *http.Transport
}

// New returns a Proxy. domain is the sandbox domain for Host routing (""
// accepts `<port>-<id>.<anything>`); bytes and reqs may be nil.
func New(loc Locator, domain string, bytes, reqs *prometheus.CounterVec, log *slog.Logger) *Proxy {
	p := &Proxy{loc: loc, domain: strings.ToLower(strings.TrimPrefix(domain, ".")), log: log.With("component", "proxy"), bytes: bytes, reqs: reqs}
	p.tr = &http.Transport{
		DialContext:           p.dial,
		DisableCompression:    true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		ExpectContinueTimeout: time.Second,
		ForceAttemptHTTP2:     false,
	}
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			t := pr.In.Context().Value(targetKey{}).(target)
			pr.Out.URL.Scheme = "http"
			// One connection pool per sandbox incarnation: a resumed
			// sandbox never gets a connection made before its pause.
			pr.Out.URL.Host = fmt.Sprintf("%s.%d.%d.sandbox", t.id, t.port, t.gen)
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		Transport:     p.tr,
		FlushInterval: -1,
		ErrorHandler:  p.proxyError,
		ErrorLog:      slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
	}
	return p
}

// Close drops idle connections to sandboxes.
func (p *Proxy) Close() { p.tr.CloseIdleConnections() }

type targetKey struct{}

type target struct {
	id   string
	port int
	gen  int
}

var (
	idRE        = regexp.MustCompile(`^[a-z0-9]{1,64}$`)
	hostLabelRE = regexp.MustCompile(`^([0-9]{1,5})-([a-z0-9]{1,64})$`)
)

// Match reports whether r is data-plane traffic and, if so, for which
// sandbox and port. ok is true with a non-nil err for traffic that is
// meant for the proxy but malformed.
func (p *Proxy) Match(r *http.Request) (id string, port int, ok bool, err error) {
	if id = r.Header.Get(HeaderSandboxID); id != "" {
		ps := r.Header.Get(HeaderSandboxPort)
		if ps == "" {
			ps = strconv.Itoa(runtime.EnvdPort)
		}
		port, perr := strconv.Atoi(ps)
		if perr != nil || port < 1 || port > 65535 {
			return id, 0, true, errs.E(errs.InvalidArgument, "%s %q is not a port", HeaderSandboxPort, truncate(ps))
		}
		return id, port, true, nil
	}
	host := strings.ToLower(r.Host)
	if h, _, splitErr := net.SplitHostPort(host); splitErr == nil {
		host = h
	}
	label, rest, found := strings.Cut(host, ".")
	if !found || rest == "" {
		return "", 0, false, nil
	}
	if p.domain != "" && rest != p.domain {
		return "", 0, false, nil
	}
	m := hostLabelRE.FindStringSubmatch(label)
	if m == nil {
		return "", 0, false, nil
	}
	port, _ = strconv.Atoi(m[1])
	if port < 1 || port > 65535 {
		return m[2], 0, true, errs.E(errs.InvalidArgument, "port %s out of range", m[1])
	}
	return m[2], port, true, nil
}

func truncate(s string) string {
	if len(s) > 32 {
		return s[:32] + "…"
	}
	return s
}

// notFoundBody is E2B's proxy answer for a sandbox that does not run.
type notFoundBody struct {
	SandboxID string `json:"sandboxId"`
	Message   string `json:"message"`
	Code      int    `json:"code"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func (p *Proxy) bad(w http.ResponseWriter, id, msg, outcome string) {
	p.count(outcome)
	writeJSON(w, http.StatusBadGateway, notFoundBody{SandboxID: id, Message: msg, Code: http.StatusBadGateway})
}

func (p *Proxy) count(outcome string) {
	if p.reqs != nil {
		p.reqs.WithLabelValues(outcome).Inc()
	}
}

// ServeHTTP proxies a data-plane request (call Match first, or let
// ServeHTTP do it).
func (p *Proxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	id, port, ok, err := p.Match(r)
	if !ok {
		p.bad(w, "", "The sandbox was not found", "not_found")
		return
	}
	if err != nil {
		p.count("bad_request")
		writeJSON(w, http.StatusBadRequest, map[string]any{"code": 400, "message": errs.Message(err)})
		return
	}
	if !idRE.MatchString(id) {
		p.bad(w, truncate(id), "The sandbox was not found", "not_found")
		return
	}
	sb, n, err := p.loc.Locate(r.Context(), id)
	if err != nil {
		p.bad(w, id, "The sandbox was not found", "not_found")
		return
	}
	if sb.TrafficToken != "" && port != runtime.EnvdPort && r.Header.Get(HeaderTrafficToken) != sb.TrafficToken {
		p.count("forbidden")
		writeJSON(w, http.StatusForbidden, map[string]any{"sandboxId": id, "code": 403,
			"message": "missing or invalid " + HeaderTrafficToken})
		return
	}
	switch sb.State {
	case store.StateRunning:
	case store.StatePaused:
		if !sb.AutoResume {
			p.bad(w, id, "The sandbox is paused", "paused")
			return
		}
		timeout := time.Duration(sb.TimeoutS) * time.Second
		if timeout <= 0 {
			timeout = 300 * time.Second
		}
		if _, _, err := n.Connect(r.Context(), id, timeout); err != nil {
			p.log.Warn("auto-resume failed", "sandbox", id, "err", err)
			p.bad(w, id, "The sandbox could not be resumed", "resume_failed")
			return
		}
		p.count("auto_resumed")
	default:
		p.bad(w, id, "The sandbox was not found", "not_found")
		return
	}
	// The header routing information is ours, not the sandbox's.
	r.Header.Del(HeaderTrafficToken)
	if cur, _, err := p.loc.Locate(r.Context(), id); err == nil {
		sb = cur // after an auto-resume
	}
	ctx := context.WithValue(r.Context(), targetKey{}, target{id, port, sb.Gen})
	ctx = context.WithValue(ctx, nodeKey{}, n)
	p.count("proxied")
	// Relay request and response bodies at the same time (HTTP/1.1
	// servers otherwise drain the request before the response starts).
	http.NewResponseController(w).EnableFullDuplex()
	p.rp.ServeHTTP(w, r.WithContext(ctx))
}

type nodeKey struct{}

// dial connects to "<id>.<port>.<gen>.sandbox:80" through the sandbox's
// node.
func (p *Proxy) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	host, _, _ := net.SplitHostPort(addr)
	parts := strings.Split(host, ".")
	if len(parts) != 4 || parts[3] != "sandbox" {
		return nil, fmt.Errorf("proxy: bad upstream %q", addr)
	}
	id := parts[0]
	port, _ := strconv.Atoi(parts[1])
	n, _ := ctx.Value(nodeKey{}).(master.Node)
	if n == nil {
		_, nn, err := p.loc.Locate(ctx, id)
		if err != nil {
			return nil, err
		}
		n = nn
	}
	c, err := n.Dial(ctx, id, port, false)
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, p: p}, nil
}

func (p *Proxy) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	t, _ := r.Context().Value(targetKey{}).(target)
	if r.Context().Err() != nil {
		// The client went away; nobody reads an answer.
		p.count("client_gone")
		return
	}
	msg := "The sandbox was not found"
	outcome := "not_found"
	if !errs.Is(err, errs.NotFound) {
		var ne *net.OpError
		switch {
		case errs.Is(err, errs.Unavailable), errors.As(err, &ne):
			msg = fmt.Sprintf("Nothing is listening on port %d in the sandbox", t.port)
			outcome = "port_closed"
		default:
			msg = "The sandbox did not answer"
			outcome = "upstream_error"
		}
	}
	p.log.Debug("proxy error", "sandbox", t.id, "port", t.port, "err", err)
	p.bad(w, t.id, msg, outcome)
}

// countingConn counts relayed bytes.
type countingConn struct {
	net.Conn
	p *Proxy
}

func (c *countingConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if n > 0 && c.p.bytes != nil {
		c.p.bytes.WithLabelValues("out").Add(float64(n))
	}
	return n, err
}

func (c *countingConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if n > 0 && c.p.bytes != nil {
		c.p.bytes.WithLabelValues("in").Add(float64(n))
	}
	return n, err
}
