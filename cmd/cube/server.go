package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/hostinfo"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
)

// runtimeFactories are the runtimes built into this binary, by name
// ("gvisor", "microvm"); each registers itself from its own file.
var runtimeFactories = map[string]func(ctx context.Context, c config.Config, log *slog.Logger) (runtime.Runtime, error){}

// templateEnsurers prepare the built-in templates on start (registered by
// the template wiring) and record them in the store.
var templateEnsurers []func(ctx context.Context, c config.Config, rt runtime.Runtime, st *store.Store, log *slog.Logger) error

// pickRuntime returns the runtime named by c.Runtime, or for "auto" the
// one the host calls for (microvm on kvm-hardware, else gvisor).
func pickRuntime(ctx context.Context, c config.Config, log *slog.Logger) (runtime.Runtime, error) {
	name := runtimeName(c.Runtime, hostinfo.Probe{}.Kind(), log)
	f, ok := runtimeFactories[name]
	if !ok {
		var have []string
		for k := range runtimeFactories {
			have = append(have, k)
		}
		sort.Strings(have)
		return nil, errs.E(errs.FailedPrecondition, "runtime %q is not built into this cube (built in: %s)", name, strings.Join(have, ", "))
	}
	return f(ctx, c, log)
}

// runtimeName resolves a configured runtime name ("", "auto" or a name)
// on a host of kind k.
func runtimeName(name string, k hostinfo.Kind, log *slog.Logger) string {
	if name != "" && name != "auto" {
		return name
	}
	name = hostinfo.RuntimeFor(k)
	if _, ok := runtimeFactories[name]; !ok && name == "microvm" {
		if _, ok := runtimeFactories["gvisor"]; ok {
			log.Warn("the microvm runtime is not built into this cube; using gvisor")
			name = "gvisor"
		}
	}
	return name
}

// apiURL is the URL clients use for a listen address.
func apiURL(listen string, tls bool) string {
	scheme := "http"
	if tls {
		scheme = "https"
	}
	host, port, err := net.SplitHostPort(listen)
	if err != nil {
		return scheme + "://" + listen
	}
	if host == "" || host == "0.0.0.0" || host == "::" {
		host = "localhost"
	}
	return scheme + "://" + net.JoinHostPort(host, port)
}

var useNetSlots bool

// defaultKeyFile keeps the key created on first start (mode 0600) so that
// later starts can print the exports again.
func defaultKeyFile(c config.Config) string { return filepath.Join(c.DataDir, "default-api-key") }

func init() {
	addCommand(func() *cobra.Command {
		var listen, domain, tlsCert, tlsKey, dbURL, rtName string
		var maxSandboxes int
		c := &cobra.Command{
			Use:   "server",
			Short: "Run the all-in-one server: E2B-compatible API, sandbox proxy, scheduler and node (:3000)",
			RunE: func(cmd *cobra.Command, args []string) error {
				cfg, err := loadConfig()
				if err != nil {
					return err
				}
				for flag, dst := range map[string]*string{"listen": &cfg.Listen, "domain": &cfg.Domain, "tls-cert": &cfg.TLSCert,
					"tls-key": &cfg.TLSKey, "database-url": &cfg.DatabaseURL, "runtime": &cfg.Runtime, "ui-dir": &cfg.UIDir} {
					if cmd.Flags().Changed(flag) {
						v, _ := cmd.Flags().GetString(flag)
						*dst = v
					}
				}
				if cmd.Flags().Changed("max-sandboxes") {
					cfg.MaxSandboxes = maxSandboxes
				}
				if err := clusterFlags(cmd, &cfg); err != nil {
					return err
				}
				return runServer(cmd, cfg)
			},
		}
		f := c.Flags()
		f.StringVar(&listen, "listen", ":3000", "address of the API + proxy listener")
		f.StringVar(&domain, "domain", "", "sandbox domain for <port>-<id>.<domain> routing (returned to SDKs)")
		f.StringVar(&tlsCert, "tls-cert", "", "TLS certificate (a *.<domain> wildcard) to serve HTTPS with h2")
		f.StringVar(&tlsKey, "tls-key", "", "TLS private key")
		f.StringVar(&dbURL, "database-url", "", "store: empty = SQLite in the data dir, or postgres://...")
		f.StringVar(&rtName, "runtime", "auto", "sandbox runtime: auto, gvisor or microvm")
		f.String("ui-dir", "", "serve the web UI at /ui/ from this directory (default: the embedded dashboard)")
		f.IntVar(&maxSandboxes, "max-sandboxes", 64, "sandboxes this node runs at once (paused ones excluded)")
		f.String("role", "all", "all: API + proxy + scheduler + a local node; control: no local node, nodes join with `cube node --join` (docs/cluster.md)")
		f.String("cluster-token", "", "shared secret of the control and its nodes (--role=control; default: config clusterToken / CUBE_CLUSTER_TOKEN)")
		f.BoolVar(&useNetSlots, "network-slots", true, "give each sandbox a network slot (internal/network): NAT egress and its egress policy; --network-slots=false: a loopback-only namespace per sandbox and the policy is only stored")
		return c
	})
}

func runServer(cmd *cobra.Command, cfg config.Config) error {
	log := newLogger(cfg)
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return errs.Wrap(errs.Internal, err, "create data dir %s", cfg.DataDir)
	}
	var s *server.Server
	rtName := "none (control: sandboxes run on the nodes that join)"
	if cfg.Role == "control" {
		cs, err := server.NewControl(ctx, cfg, log)
		if err != nil {
			return err
		}
		s = cs
		defer s.Close()
	} else {
		rt, err := pickRuntime(ctx, cfg, log)
		if err != nil {
			return err
		}
		defer rt.Close()
		log.Info("runtime", "name", rt.Name())
		s, err = server.New(ctx, cfg, rt, log)
		if err != nil {
			return err
		}
		defer s.Close()
		for _, ensure := range templateEnsurers {
			if err := ensure(ctx, cfg, rt, s.Store, log); err != nil {
				return err
			}
		}
		if len(templateEnsurers) == 0 {
			log.Warn("no template builder in this build: only templates already in the store can be used")
		}
		rtName = rt.Name()
	}
	key, err := s.EnsureAPIKey(ctx)
	if err != nil {
		return err
	}
	if key != "" {
		if err := os.WriteFile(defaultKeyFile(cfg), []byte(key+"\n"), 0o600); err != nil {
			log.Warn("save the first API key", "err", err)
		}
	} else if b, err := os.ReadFile(defaultKeyFile(cfg)); err == nil {
		k := strings.TrimSpace(string(b))
		if _, err := s.Store.Authenticate(ctx, k); err == nil {
			key = k
		}
	}
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return errs.Wrap(errs.Unavailable, err, "listen on %s", cfg.Listen)
	}
	url := apiURL(ln.Addr().String(), cfg.TLSCert != "")
	if _, port, _ := net.SplitHostPort(cfg.Listen); port != "0" {
		url = apiURL(cfg.Listen, cfg.TLSCert != "")
	}
	out := cmd.OutOrStdout()
	if key == "" {
		key = "<an API key: cube key create>"
	}
	server.PrintExports(out, url, key)
	fmt.Fprintf(out, "# then, for example: node -e \"const {Sandbox}=require('e2b'); Sandbox.create().then(async s=>{console.log((await s.commands.run('uname -a')).stdout); await s.kill()})\"\n")
	log.Info("cube server listening", "url", url, "addr", ln.Addr().String(), "role", cfg.Role, "runtime", rtName, "store", s.Store.Dialect())
	return s.Serve(ctx, ln)
}
