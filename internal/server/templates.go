package server

import (
	"context"
	"log/slog"
	"time"

	"github.com/cubesandbox/cube/internal/api"
	"github.com/cubesandbox/cube/internal/store"
	"github.com/cubesandbox/cube/internal/template"
)

// storeTemplate maps a template catalog record to the API's view.
func storeTemplate(r template.Record) *store.Template {
	state := "building"
	switch r.Phase {
	case template.PhaseReady:
		state = "ready"
	case template.PhaseFailed:
		state = "error"
	}
	ports := append([]int{}, r.ExposePorts...)
	return &store.Template{ID: r.ID, Aliases: append([]string{}, r.Aliases...), EnvdVersion: api.DefaultEnvdVersion,
		CPUCount: r.CPUCount, MemoryMB: r.MemoryMB, DiskMB: r.DiskMB, Ports: ports, State: state, Reason: r.Reason,
		Public: true, CreatedAt: r.CreatedAt}
}

// SyncTemplates makes the store's templates mirror the catalog (the
// template builder's records): new and changed ones are written, ones no
// longer in the catalog removed. Spawn counts are kept.
func SyncTemplates(ctx context.Context, st *store.Store, cat template.Catalog) error {
	recs, err := cat.List(ctx)
	if err != nil {
		return err
	}
	have, err := st.ListTemplates(ctx)
	if err != nil {
		return err
	}
	old := map[string]*store.Template{}
	for _, t := range have {
		old[t.ID] = t
	}
	for _, r := range recs {
		t := storeTemplate(r)
		if o := old[r.ID]; o != nil {
			t.SpawnCount, t.LastSpawnedAt, t.CreatedAt = o.SpawnCount, o.LastSpawnedAt, o.CreatedAt
			if sameTemplate(o, t) {
				delete(old, r.ID)
				continue
			}
		}
		if err := st.PutTemplate(ctx, t); err != nil {
			return err
		}
		delete(old, r.ID)
	}
	for id := range old {
		st.DeleteTemplate(ctx, id)
	}
	return nil
}

func sameTemplate(a, b *store.Template) bool {
	if a.State != b.State || a.Reason != b.Reason || a.CPUCount != b.CPUCount || a.MemoryMB != b.MemoryMB ||
		a.DiskMB != b.DiskMB || a.EnvdVersion != b.EnvdVersion || len(a.Aliases) != len(b.Aliases) {
		return false
	}
	for i := range a.Aliases {
		if a.Aliases[i] != b.Aliases[i] {
			return false
		}
	}
	return true
}

// WatchTemplates re-syncs the catalog into the store every interval until
// ctx ends (templates made by `cube tpl` become usable without a restart).
func WatchTemplates(ctx context.Context, st *store.Store, cat template.Catalog, every time.Duration, log *slog.Logger) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if err := SyncTemplates(ctx, st, cat); err != nil && ctx.Err() == nil {
				log.Warn("sync templates", "err", err)
			}
		}
	}
}
