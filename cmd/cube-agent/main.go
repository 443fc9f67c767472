//go:build linux

// Command cube-agent is the in-sandbox agent: the E2B envd API on :49983
// and the code interpreter on :49999. See internal/agent and docs/agent.md.
//
// Started as an ordinary process it serves both ports on all addresses of
// its network namespace (and on vsock when /dev/vsock exists). As PID 1 (a
// microVM) it first sets up the machine: mounts, loopback, hostname,
// eth0 from the kernel command line, zombie reaping, clean SIGTERM.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/cubesandbox/cube/internal/agent/envd"
	"github.com/cubesandbox/cube/internal/agent/listen"
	"github.com/cubesandbox/cube/internal/agent/pid1"
	"github.com/cubesandbox/cube/internal/logging"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "cube-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	envdAddr := flag.String("envd-addr", ":49983", "TCP address of the envd API (unix:/path for a Unix socket; empty = none)")
	interpAddr := flag.String("interp-addr", ":49999", "TCP address of the code interpreter (empty = none)")
	defaultUser := flag.String("default-user", "", "user for requests that name none (default: user if it exists, else root)")
	ensureUser := flag.Bool("ensure-user", true, "create the account `user` (home /home/user) if absent")
	vsockOn := flag.Bool("vsock", true, "also listen on vsock ports 49983/49999 when /dev/vsock exists")
	logLevel := flag.String("log-level", "info", "debug|info|warn|error")
	version := flag.Bool("version", false, "print the envd API version and exit")
	flag.Parse()
	if *version {
		fmt.Println(envd.Version)
		return nil
	}
	log := logging.New(os.Stderr, *logLevel, "text").With("component", "cube-agent")

	isInit := os.Getpid() == 1
	if isInit {
		pid1.Setup(log)
	}
	if *ensureUser && os.Geteuid() == 0 {
		if err := envd.EnsureUser("user"); err != nil {
			log.Warn("cannot create user", "err", err)
		}
	}
	du := *defaultUser
	if du == "" {
		du = "root"
		if _, err := envd.LookupUser("user"); err == nil && *ensureUser {
			du = "user"
		}
	}
	srv := envd.New(envd.Options{Logger: log.With("component", "envd"), DefaultUser: du, ManageClock: isInit})
	defer srv.Close()
	startFromEnv(log, srv)

	sigs := []os.Signal{syscall.SIGTERM, syscall.SIGINT}
	if isInit {
		// As PID 1, busybox `halt` and `poweroff` signal us with SIGUSR1
		// and SIGUSR2 (`reboot` with SIGTERM): all end the machine.
		sigs = append(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), sigs...)
	defer stop()

	var servers []*http.Server
	serve := func(name string, h http.Handler, tcp string, vport uint32) error {
		ls, err := listen.All(tcp, vport, *vsockOn)
		if err != nil {
			return err
		}
		hs := listen.NewHTTPServer(h)
		servers = append(servers, hs)
		for _, l := range ls {
			log.Info("listening", "service", name, "addr", l.Addr().String())
			go func(l net.Listener) {
				if err := hs.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
					log.Error("serve", "service", name, "err", err)
				}
			}(l)
		}
		return nil
	}
	if *envdAddr != "" {
		if err := serve("envd", srv.Handler(), *envdAddr, 49983); err != nil {
			return err
		}
	}
	if *interpAddr != "" {
		h, closeFn, err := newInterp(ctx, log, srv)
		if err != nil {
			log.Warn("code interpreter unavailable", "err", err)
		} else {
			defer closeFn()
			if err := serve("interp", h, *interpAddr, 49999); err != nil {
				return err
			}
		}
	}
	if isInit {
		go pid1.Reap(ctx, log)
	}
	<-ctx.Done()
	log.Info("shutting down")
	sctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for _, hs := range servers {
		_ = hs.Shutdown(sctx)
	}
	srv.Close()
	if isInit {
		pid1.Shutdown(log)
	}
	return nil
}

// startFromEnv starts the template's start command when the agent's own
// environment names it (the gVisor runtime puts the template's env, with
// envd.StartCmdEnv, in the container's): with that environment and the
// agent's cwd (the template's workdir), as the default user. The microVM
// runtime hands it over in POST /init instead (envd.Server.Init).
func startFromEnv(log *slog.Logger, srv *envd.Server) {
	v, ok := os.LookupEnv(envd.StartCmdEnv)
	if !ok {
		return
	}
	os.Unsetenv(envd.StartCmdEnv)
	argv, err := envd.ParseStartCmd(v)
	if err != nil {
		// Recorded for GET /start, so that the bake reports it.
		srv.StartCommandFailed(err)
		return
	}
	env := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "HOME", "USER", "LOGNAME", "PWD", "SHLVL", "_":
			continue
		}
		env[k] = v
	}
	dir, _ := os.Getwd()
	if dir == "/" {
		dir = ""
	}
	_ = srv.StartCommand(argv, env, dir)
}
