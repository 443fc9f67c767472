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
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/gvisor"
	"github.com/cubesandbox/cube/internal/server"
	"github.com/cubesandbox/cube/internal/store"
	"github.com/cubesandbox/cube/internal/template"
)

// The gVisor runtime and the built-in templates, wired into `cube server`.
func init() {
	runtimeFactories["gvisor"] = func(ctx context.Context, c config.Config, log *slog.Logger) (runtime.Runtime, error) {
		runsc, err := serverRunsc(c)
		if err != nil {
			return nil, err
		}
		return gvisor.New(ctx, gvisor.Options{DataDir: c.DataDir, RunscPath: runsc, PoolSize: c.WarmPoolSize, Logger: log})
	}
	templateEnsurers = append(templateEnsurers, ensureBuiltinTemplates)
	slotProviders = append(slotProviders, func(ctx context.Context, c config.Config, log *slog.Logger) (node.Slots, func(), error) {
		m, err := network.NewManager(c, log.With("component", "network"))
		if err != nil {
			return nil, nil, errs.Wrap(errs.KindOf(err), err, "network slots (run without --network-slots to do without)")
		}
		return netSlots{m}, func() { m.Close() }, nil
	})
}

// netSlots adapts network.Manager to node.Slots.
type netSlots struct{ m *network.Manager }

func policy(allow *bool, nw store.Network) network.Policy {
	return network.Policy{AllowInternetAccess: allow, AllowOut: nw.AllowOut, DenyOut: nw.DenyOut}
}

func (s netSlots) Acquire(ctx context.Context) (runtime.NetSlot, error) { return s.m.Acquire(ctx) }
func (s netSlots) SetPolicy(id string, allow *bool, nw store.Network) error {
	return s.m.SetPolicy(id, policy(allow, nw))
}
func (s netSlots) Adopt(ctx context.Context, ns runtime.NetSlot, allow *bool, nw store.Network) error {
	return s.m.Adopt(ctx, ns, policy(allow, nw))
}
func (s netSlots) Release(ctx context.Context, id string) error { return s.m.Release(ctx, id) }

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
// on stderr, mirrors the template catalog into the store and keeps it
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
		start := time.Now()
		r, err := b.CreateBuiltin(ctx, name)
		if err != nil {
			return errs.Wrap(errs.KindOf(err), err, "prepare built-in template %s", name)
		}
		log.Info("template ready", "template", r.ID, "took", time.Since(start).Round(time.Millisecond))
	}
	if err := server.SyncTemplates(ctx, st, cat); err != nil {
		return err
	}
	go server.WatchTemplates(ctx, st, cat, 5*time.Second, log)
	return nil
}
