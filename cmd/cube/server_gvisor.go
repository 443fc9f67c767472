//go:build linux

package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"time"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/network"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/gvisor"
	"github.com/cubesandbox/cube/internal/runtime/netslot"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
	"github.com/cubesandbox/cube/internal/template"
)

// The gVisor runtime and the built-in templates, wired into `cube server`.
// With --network-slots every sandbox runs in a network slot with its
// egress policy: gVisor's warm pool pre-restores sandboxes in slots of an
// internal/network Manager and netslot.Wrap keeps the policies.
func init() {
	runtimeFactories["gvisor"] = func(ctx context.Context, c config.Config, log *slog.Logger) (runtime.Runtime, error) {
		runsc, err := serverRunsc(c)
		if err != nil {
			return nil, err
		}
		opts := gvisor.Options{DataDir: c.DataDir, RunscPath: runsc, PoolSize: c.WarmPoolSize, Logger: log}
		if !useNetSlots {
			return gvisor.New(ctx, opts)
		}
		m, err := network.NewManager(c, log.With("component", "network"))
		if err != nil {
			return nil, errs.Wrap(errs.KindOf(err), err, "network slots (run with --network-slots=false to do without)")
		}
		opts.Slots = m
		inner, err := gvisor.New(ctx, opts)
		if err != nil {
			m.Close()
			return nil, err
		}
		rt, err := netslot.Wrap(ctx, inner, m, netslot.Options{StateDir: filepath.Join(c.DataDir, "netslot"), Logger: log, InnerSlots: true})
		if err != nil {
			inner.Close()
			m.Close()
			return nil, err
		}
		return rt, nil
	}
	templateEnsurers = append(templateEnsurers, ensureBuiltinTemplates)
}

// serverRunsc finds runsc: config, the Makefile's cache, then PATH.
func serverRunsc(c config.Config) (string, error) {
	if c.RunscPath != "" {
		return c.RunscPath, nil
	}
	if p := filepath.Join(c.CacheDir, "bin", "runsc"); isFile(p) {
		return p, nil
	}
	if p, err := exec.LookPath("runsc"); err == nil {
		return p, nil
	}
	return "", errs.E(errs.FailedPrecondition, "runsc not found: run `make runsc` or set CUBE_RUNSC")
}

// serverAgent finds the static cube-agent: config, next to this binary,
// then $CUBE_BIN.
func serverAgent(c config.Config) string {
	if c.AgentPath != "" {
		return c.AgentPath
	}
	if exe, err := os.Executable(); err == nil {
		if p := filepath.Join(filepath.Dir(exe), "cube-agent"); isFile(p) {
			return p
		}
	}
	if b := os.Getenv("CUBE_BIN"); b != "" {
		return filepath.Join(b, "cube-agent")
	}
	return "cube-agent"
}

func isFile(p string) bool {
	st, err := os.Stat(p)
	return err == nil && st.Mode().IsRegular()
}

// ensureBuiltinTemplates builds the built-in templates that are missing
// or stale (cached by recipe hash; a no-op when ready), showing progress
// on stderr (one that fails is logged, the server still starts), mirrors the template catalog into the store and keeps it
// mirrored while the server runs.
func ensureBuiltinTemplates(ctx context.Context, c config.Config, rt runtime.Runtime, st *store.Store, log *slog.Logger) error {
	cat, err := template.NewFileCatalog(filepath.Join(c.DataDir, "templates", "catalog"))
	if err != nil {
		return err
	}
	last := map[string]string{}
	b := &template.Builder{DataDir: c.DataDir, CacheDir: c.CacheDir, AgentPath: serverAgent(c), Mirror: c.DebianMirror,
		Runtime: rt, Catalog: cat, Log: log,
		OnUpdate: func(r template.Record) {
			line := fmt.Sprintf("template %-17s %-14s %3.0f%% %s", r.ID, r.Phase, r.Progress*100, r.Note)
			if last[r.ID] != line {
				last[r.ID] = line
				fmt.Fprintln(os.Stderr, line)
			}
		}}
	for _, name := range template.BuiltinNames() {
		if !builtinWanted(c, name) {
			continue
		}
		start := time.Now()
		r, err := b.CreateBuiltin(ctx, name)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			// Serve the templates that work; this one stays FAILED (with
			// its reason in GET /templates) until a later start.
			log.Error("built-in template failed; serving the others", "template", name, "err", err)
			continue
		}
		log.Info("template ready", "template", r.ID, "took", time.Since(start).Round(time.Millisecond))
	}
	if err := server.SyncTemplates(ctx, st, cat); err != nil {
		return err
	}
	go server.WatchTemplates(ctx, st, cat, 5*time.Second, log)
	return nil
}
