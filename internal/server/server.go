// Package server assembles the all-in-one `cube server`: store, node (the
// local one), master, REST API and sandbox proxy on one listener; or,
// with NewControl, the cluster control plane: the same without a local
// node, plus the nodes' heartbeat route /cluster/v1/ (internal/cluster).
//
// A request carrying E2b-Sandbox-Id, or whose Host is
// `<port>-<id>.<domain>`, is data plane and goes to the proxy; everything
// else is the control plane API. Every response carries X-Request-Id.
package server

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/api"
	"github.com/cubesandbox/cube/internal/cluster"
	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/proxy"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
	"github.com/cubesandbox/cube/internal/ui"
)

// Server is an assembled cube server.
type Server struct {
	cfg     config.Config
	log     *slog.Logger
	Store   *store.Store
	Node    *node.Node       // nil in a control
	Cluster *cluster.Control // nil in the all-in-one server
	Master  *master.Master
	API     *api.API
	Proxy   *proxy.Proxy
	Metrics *api.Metrics
	handler http.Handler
}

// New opens the store, reconciles the local node with rt and builds the
// handlers. Close releases them (sandboxes keep running).
func New(ctx context.Context, cfg config.Config, rt runtime.Runtime, log *slog.Logger) (*Server, error) {
	uiH, err := ui.Handler(cfg.UIDir)
	if err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "uiDir %q", cfg.UIDir)
	}
	st, err := store.Open(ctx, cfg.DataDir, cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	n := node.New(node.Config{ID: "local", Capacity: cfg.MaxSandboxes,
		MetricsInterval: cfg.MetricsInterval, MetricsRetention: cfg.MetricsRetention}, rt, st, log)
	if err := n.Start(ctx); err != nil {
		st.Close()
		return nil, err
	}
	m := master.New(st, n)
	metrics := api.NewMetrics(m.Counts)
	s := &Server{cfg: cfg, log: log, Store: st, Node: n, Master: m, Metrics: metrics}
	s.API = api.New(api.Config{Domain: cfg.Domain, DefaultTimeout: cfg.DefaultTimeout, UI: uiH}, m, st, metrics, log)
	s.Proxy = proxy.New(m, cfg.Domain, metrics.ProxyBytes, metrics.ProxyRequests, log)
	s.handler = api.WithRequestID(log, metrics, http.HandlerFunc(s.route))
	return s, nil
}

// NewControl opens the store and builds the control plane of a cluster:
// API, proxy and scheduler over the nodes that join (cfg.ClusterToken
// required). Close releases it.
func NewControl(ctx context.Context, cfg config.Config, log *slog.Logger) (*Server, error) {
	uiH, err := ui.Handler(cfg.UIDir)
	if err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "uiDir %q", cfg.UIDir)
	}
	if cfg.ClusterToken == "" {
		return nil, errs.E(errs.InvalidArgument, "--role=control needs a cluster token (config clusterToken, CUBE_CLUSTER_TOKEN or --cluster-token)")
	}
	st, err := store.Open(ctx, cfg.DataDir, cfg.DatabaseURL)
	if err != nil {
		return nil, err
	}
	m := master.New(st)
	cc, err := cluster.NewControl(ctx, cluster.ControlConfig{Token: cfg.ClusterToken, Heartbeat: cfg.HeartbeatInterval,
		DownAfter: cfg.NodeDownAfter}, st, m, log)
	if err != nil {
		st.Close()
		return nil, err
	}
	cc.Start()
	metrics := api.NewMetrics(m.Counts)
	s := &Server{cfg: cfg, log: log, Store: st, Master: m, Cluster: cc, Metrics: metrics}
	s.API = api.New(api.Config{Domain: cfg.Domain, DefaultTimeout: cfg.DefaultTimeout, UI: uiH}, m, st, metrics, log)
	s.Proxy = proxy.New(m, cfg.Domain, metrics.ProxyBytes, metrics.ProxyRequests, log)
	clusterH := cc.Handler()
	s.handler = api.WithRequestID(log, metrics, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, _, ok, _ := s.Proxy.Match(r); !ok && strings.HasPrefix(r.URL.Path, "/cluster/") {
			clusterH.ServeHTTP(w, r)
			return
		}
		s.route(w, r)
	}))
	return s, nil
}

func (s *Server) route(w http.ResponseWriter, r *http.Request) {
	if _, _, ok, _ := s.Proxy.Match(r); ok {
		s.Proxy.ServeHTTP(w, r)
		return
	}
	s.API.ServeHTTP(w, r)
}

// Handler is the one handler of the listener.
func (s *Server) Handler() http.Handler { return s.handler }

// Close stops the node's loops and closes the store. Sandboxes keep
// running for the next start to re-adopt.
func (s *Server) Close() error {
	if s.Node != nil {
		s.Node.Stop()
	}
	if s.Cluster != nil {
		s.Cluster.Stop()
	}
	s.Proxy.Close()
	return s.Store.Close()
}

// EnsureAPIKey creates a key named "default" if the store has no live key
// and returns it ("" if a key already exists: stored keys are hashed).
func (s *Server) EnsureAPIKey(ctx context.Context) (string, error) {
	keys, err := s.Store.ListAPIKeys(ctx)
	if err != nil {
		return "", err
	}
	for _, k := range keys {
		if !k.Revoked() {
			return "", nil
		}
	}
	key, _, err := s.Store.CreateAPIKey(ctx, "default")
	return key, err
}

// Serve serves on ln until ctx ends, then shuts down gracefully (streams
// get a few seconds to finish). With cfg.TLSCert/TLSKey it serves TLS with
// h2 and HTTP/1.1.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	hs := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       10 * time.Minute, // above every SDK keepalive
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
	}
	if s.cfg.TLSCert != "" || s.cfg.TLSKey != "" {
		cert, err := tls.LoadX509KeyPair(s.cfg.TLSCert, s.cfg.TLSKey)
		if err != nil {
			return errs.Wrap(errs.InvalidArgument, err, "load TLS certificate %s", s.cfg.TLSCert)
		}
		hs.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	}
	errc := make(chan error, 1)
	go func() {
		if hs.TLSConfig != nil {
			errc <- hs.ServeTLS(ln, "", "") // adds h2 to ALPN
			return
		}
		errc <- hs.Serve(ln)
	}()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hs.Shutdown(sctx)
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// PrintExports writes the environment for the stock SDK.
func PrintExports(w io.Writer, apiURL, key string) {
	fmt.Fprintf(w, "export E2B_API_URL=%s\n", apiURL)
	fmt.Fprintf(w, "export E2B_SANDBOX_URL=%s\n", apiURL)
	fmt.Fprintf(w, "export E2B_API_KEY=%s\n", key)
}
