package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/cluster"
	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/store"
)

// clusterFlags applies `cube server`'s --role and --cluster-token.
func clusterFlags(cmd *cobra.Command, cfg *config.Config) error {
	if cmd.Flags().Changed("role") {
		cfg.Role, _ = cmd.Flags().GetString("role")
	}
	if cmd.Flags().Changed("cluster-token") {
		cfg.ClusterToken, _ = cmd.Flags().GetString("cluster-token")
	}
	switch cfg.Role {
	case "", "all":
		cfg.Role = "all"
	case "control":
	default:
		return errs.E(errs.InvalidArgument, "--role must be all or control, not %q", cfg.Role)
	}
	return nil
}

// builtinWanted reports whether the built-in template name is among
// config builtinTemplates (empty = all).
func builtinWanted(c config.Config, name string) bool {
	if strings.TrimSpace(c.BuiltinTemplates) == "" {
		return true
	}
	for _, n := range strings.Split(c.BuiltinTemplates, ",") {
		if strings.TrimSpace(n) == name {
			return true
		}
	}
	return false
}

// nodeID returns the node's id: the flag, else the one kept in the data
// dir, else a new one (hostname plus a random suffix) kept there.
func nodeID(flag, dataDir string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	p := filepath.Join(dataDir, "node-id")
	if b, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(b)) != "" {
		return strings.TrimSpace(string(b)), nil
	}
	host, _ := os.Hostname()
	host = strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return -1
	}, host)
	if host == "" {
		host = "node"
	}
	b := make([]byte, 3)
	rand.Read(b)
	id := fmt.Sprintf("%.40s-%s", host, hex.EncodeToString(b))
	if err := os.WriteFile(p, []byte(id+"\n"), 0o600); err != nil {
		return "", errs.Wrap(errs.Internal, err, "keep the node id in %s", p)
	}
	return id, nil
}

// advertiseAddr is the address the control reaches the node API at: the
// flag, else the listen address with a wildcard host replaced by the
// hostname.
func advertiseAddr(flag, listen string) (string, error) {
	if flag != "" {
		return flag, nil
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return "", errs.E(errs.InvalidArgument, "bad --listen %q", listen)
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		h, err := os.Hostname()
		if err != nil {
			return "", errs.E(errs.InvalidArgument, "set --advertise (no hostname: %v)", err)
		}
		host = h
	}
	return net.JoinHostPort(host, port), nil
}

func init() {
	addCommand(func() *cobra.Command {
		var join, advertise, id, listen, token, rtName string
		var maxSandboxes int
		c := &cobra.Command{
			Use:   "node",
			Short: "Run a cluster node: runtime, pools and networking, joined to a control (cube server --role=control)",
			Long: `Runs the sandboxes of one machine for a cluster control plane. The node serves
the node API on --listen (:3001), registers with the control at --join and
heartbeats; the control schedules sandboxes onto it and forwards lifecycle
calls and sandbox traffic to it. Both sides need the same cluster token.
See docs/cluster.md.`,
			RunE: func(cmd *cobra.Command, args []string) error {
				cfg, err := loadConfig()
				if err != nil {
					return err
				}
				if cmd.Flags().Changed("listen") {
					cfg.ClusterListen = listen
				}
				if cmd.Flags().Changed("cluster-token") {
					cfg.ClusterToken = token
				}
				if cmd.Flags().Changed("runtime") {
					cfg.Runtime = rtName
				}
				if cmd.Flags().Changed("max-sandboxes") {
					cfg.MaxSandboxes = maxSandboxes
				}
				if join == "" {
					return errs.E(errs.InvalidArgument, "--join <control URL> is required")
				}
				return runNode(cmd, cfg, join, advertise, id)
			},
		}
		c.AddCommand(nodesListCmd())
		f := c.Flags()
		f.StringVar(&join, "join", "", "URL of the control (cube server --role=control), e.g. http://control:3000")
		f.StringVar(&advertise, "advertise", "", "host:port the control reaches this node's API at (default: hostname and the --listen port)")
		f.StringVar(&id, "id", "", "node id (default: kept in <data dir>/node-id, made from the hostname)")
		f.StringVar(&listen, "listen", ":3001", "address of the node API")
		f.StringVar(&token, "cluster-token", "", "shared secret of the control and its nodes (default: config clusterToken / CUBE_CLUSTER_TOKEN)")
		f.StringVar(&rtName, "runtime", "auto", "sandbox runtime: auto, gvisor or microvm")
		f.IntVar(&maxSandboxes, "max-sandboxes", 64, "sandboxes this node runs at once (paused ones excluded)")
		f.BoolVar(&useNetSlots, "network-slots", true, "give each sandbox a network slot (see cube server --help)")
		return c
	})
}

func runNode(cmd *cobra.Command, cfg config.Config, join, advertise, idFlag string) error {
	log := newLogger(cfg)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if cfg.ClusterToken == "" {
		return errs.E(errs.InvalidArgument, "a node needs the cluster token (--cluster-token, config clusterToken or CUBE_CLUSTER_TOKEN)")
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return errs.Wrap(errs.Internal, err, "create data dir %s", cfg.DataDir)
	}
	id, err := nodeID(idFlag, cfg.DataDir)
	if err != nil {
		return err
	}
	adv, err := advertiseAddr(advertise, cfg.ClusterListen)
	if err != nil {
		return err
	}
	log = log.With("node", id)
	// The node's own record of its sandboxes: SQLite in its data dir.
	st, err := store.Open(ctx, cfg.DataDir, "")
	if err != nil {
		return err
	}
	defer st.Close()
	// Refuse a wrong token or URL before the runtime starts.
	pre, err := cluster.NewAgent(cluster.AgentConfig{ControlURL: join, Token: cfg.ClusterToken, Advertise: adv,
		Interval: cfg.HeartbeatInterval}, nil, log)
	if err != nil {
		return err
	}
	if err := pre.Check(ctx); err != nil {
		return errs.Wrap(errs.KindOf(err), err, "join %s: %s", join, errs.Message(err))
	}
	rt, err := pickRuntime(ctx, cfg, log)
	if err != nil {
		return err
	}
	defer rt.Close()
	n := node.New(node.Config{ID: id, Capacity: cfg.MaxSandboxes,
		MetricsInterval: cfg.MetricsInterval, MetricsRetention: cfg.MetricsRetention}, rt, st, log)
	if err := n.Start(ctx); err != nil {
		return err
	}
	defer n.Stop()
	for _, ensure := range templateEnsurers {
		if err := ensure(ctx, cfg, rt, st, log); err != nil {
			return err
		}
	}
	ln, err := net.Listen("tcp", cfg.ClusterListen)
	if err != nil {
		return errs.Wrap(errs.Unavailable, err, "listen on %s", cfg.ClusterListen)
	}
	hs := &http.Server{Handler: cluster.NewNodeServer(n, cfg.ClusterToken, log).Handler(), ReadHeaderTimeout: 30 * time.Second,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	errc := make(chan error, 1)
	go func() { errc <- hs.Serve(ln) }()
	defer hs.Close()
	ag, err := cluster.NewAgent(cluster.AgentConfig{ControlURL: join, Token: cfg.ClusterToken, Advertise: adv,
		Interval: cfg.HeartbeatInterval}, n, log)
	if err != nil {
		return err
	}
	if err := ag.Register(ctx); err != nil {
		return errs.Wrap(errs.KindOf(err), err, "join %s: %s", join, errs.Message(err))
	}
	fmt.Fprintf(cmd.OutOrStdout(), "cube node %s joined %s (node API on %s, advertised as %s, runtime %s)\n", id, join, ln.Addr(), adv, rt.Name())
	go ag.Run(ctx)
	select {
	case err := <-errc:
		if !errors.Is(err, http.ErrServerClosed) {
			return err
		}
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hs.Shutdown(sctx)
	return nil
}

// nodesListCmd is `cube node list`: the control's view of its nodes.
func nodesListCmd() *cobra.Command {
	var control, token string
	var asJSON bool
	c := &cobra.Command{
		Use:   "list",
		Short: "List the nodes of a cluster as the control sees them (GET /cluster/v1/nodes)",
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := loadConfig()
			if err != nil {
				return err
			}
			if token == "" {
				token = cfg.ClusterToken
			}
			req, err := http.NewRequestWithContext(cmd.Context(), "GET", strings.TrimRight(control, "/")+"/cluster/v1/nodes", nil)
			if err != nil {
				return errs.Wrap(errs.InvalidArgument, err, "--control %q", control)
			}
			req.Header.Set("Authorization", "Bearer "+token)
			res, err := (&http.Client{Timeout: 10 * time.Second}).Do(req)
			if err != nil {
				return errs.Wrap(errs.Unavailable, err, "the control at %s is unreachable", control)
			}
			defer res.Body.Close()
			b, _ := io.ReadAll(io.LimitReader(res.Body, 8<<20))
			if res.StatusCode != http.StatusOK {
				k := errs.Unavailable
				if res.StatusCode == http.StatusUnauthorized {
					k = errs.Unauthenticated
				}
				return errs.E(k, "control answered %d: %s", res.StatusCode, strings.TrimSpace(string(b)))
			}
			if asJSON {
				cmd.OutOrStdout().Write(b)
				return nil
			}
			var ns []cluster.NodeStatus
			if err := json.Unmarshal(b, &ns); err != nil {
				return errs.Wrap(errs.Internal, err, "decode the node list")
			}
			w := cmd.OutOrStdout()
			fmt.Fprintf(w, "%-24s %-6s %-22s %-8s %9s %9s  %s\n", "ID", "STATE", "ADDRESS", "RUNTIME", "SANDBOXES", "FREE/CAP", "HEARTBEAT")
			for _, n := range ns {
				fmt.Fprintf(w, "%-24s %-6s %-22s %-8s %9d %4d/%-4d  %s ago\n", n.ID, n.State, n.Address, n.Runtime, n.Sandboxes,
					n.Free, n.Capacity, time.Since(n.HeartbeatAt).Round(time.Second))
			}
			return nil
		},
	}
	c.Flags().StringVar(&control, "control", "http://localhost:3000", "URL of the control")
	c.Flags().StringVar(&token, "cluster-token", "", "the cluster token (default: config clusterToken / CUBE_CLUSTER_TOKEN)")
	c.Flags().BoolVar(&asJSON, "json", false, "print the JSON answer")
	return c
}
