package store_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/store"
	"github.com/cubesandbox/cube/internal/store/storetest"
)

func TestSQLite(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s, err := store.Open(ctx, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	suite(t, s)
	s.Close()
	// Reopening applies no migration twice and keeps the data.
	s2, err := store.Open(ctx, dir, "")
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if v, _ := s2.SchemaVersion(ctx); v != 2 {
		t.Fatalf("schema version %d", v)
	}
	if ks, _ := s2.ListAPIKeys(ctx); len(ks) != 2 {
		t.Fatalf("keys after reopen: %d", len(ks))
	}
}

func TestPostgres(t *testing.T) {
	url := storetest.Postgres(t)
	ctx := context.Background()
	s, err := store.Open(ctx, "", url)
	if err != nil {
		t.Fatal(err)
	}
	if s.Dialect() != store.Postgres {
		t.Fatal(s.Dialect())
	}
	suite(t, s)
	s.Close()
	s2, err := store.Open(ctx, "", url)
	if err != nil {
		t.Fatal(err)
	}
	defer s2.Close()
	if v, _ := s2.SchemaVersion(ctx); v != 2 {
		t.Fatalf("schema version %d", v)
	}
}

func TestOpenBadURL(t *testing.T) {
	if _, err := store.Open(context.Background(), t.TempDir(), "mysql://x"); !errs.Is(err, errs.InvalidArgument) {
		t.Fatalf("err %v", err)
	}
}

func suite(t *testing.T, s *store.Store) {
	ctx := context.Background()
	t.Run("keys", func(t *testing.T) {
		key, rec, err := s.CreateAPIKey(ctx, "alice")
		if err != nil {
			t.Fatal(err)
		}
		if len(key) != 44 || key[:4] != "e2b_" {
			t.Fatalf("key %q", key)
		}
		got, err := s.Authenticate(ctx, key)
		if err != nil || got.ID != rec.ID || got.Name != "alice" {
			t.Fatalf("auth %v %v", got, err)
		}
		for _, bad := range []string{"", "e2b_", "e2b_zz", key + "0", "E2B_" + key[4:], "e2b_" + key[5:]} {
			if _, err := s.Authenticate(ctx, bad); !errs.Is(err, errs.Unauthenticated) {
				t.Errorf("auth %q: %v", bad, err)
			}
		}
		key2, rec2, _ := s.CreateAPIKey(ctx, "bob")
		if err := s.RevokeAPIKey(ctx, rec2.ID); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Authenticate(ctx, key2); !errs.Is(err, errs.Unauthenticated) {
			t.Fatalf("revoked key: %v", err)
		}
		if err := s.RevokeAPIKey(ctx, rec2.ID); !errs.Is(err, errs.NotFound) {
			t.Fatalf("revoke twice: %v", err)
		}
		ks, _ := s.ListAPIKeys(ctx)
		if len(ks) != 2 {
			t.Fatalf("keys %+v", ks)
		}
		// Both keys can share a created_at millisecond: find them by name,
		// not by position.
		for _, k := range ks {
			if (k.Name == "bob") != k.Revoked() {
				t.Fatalf("keys %+v: only bob is revoked", ks)
			}
		}
	})
	t.Run("templates", func(t *testing.T) {
		tp := &store.Template{ID: "tpl1", Aliases: []string{"base"}, EnvdVersion: "0.6.13", CPUCount: 2, MemoryMB: 512, DiskMB: 1024, State: "ready", Public: true}
		if err := s.PutTemplate(ctx, tp); err != nil {
			t.Fatal(err)
		}
		tp.MemoryMB = 1024
		if err := s.PutTemplate(ctx, tp); err != nil {
			t.Fatal(err)
		}
		got, err := s.ResolveTemplate(ctx, "base")
		if err != nil || got.ID != "tpl1" || got.MemoryMB != 1024 {
			t.Fatalf("%+v %v", got, err)
		}
		if _, err := s.ResolveTemplate(ctx, "nope"); !errs.Is(err, errs.NotFound) {
			t.Fatal(err)
		}
		s.TemplateSpawned(ctx, "tpl1")
		got, _ = s.ResolveTemplate(ctx, "tpl1")
		if got.SpawnCount != 1 {
			t.Fatal(got.SpawnCount)
		}
	})
	t.Run("sandboxes", func(t *testing.T) {
		base := time.Now().Truncate(time.Millisecond).UTC()
		yes := true
		for i := 0; i < 25; i++ {
			sb := &store.Sandbox{
				ID: fmt.Sprintf("sb%02d", i), KeyID: []string{"k1", "k2"}[i%2], TemplateID: "tpl1", Alias: "base",
				NodeID: "local", State: store.StateRunning, CPUCount: 1, MemoryMB: 256, DiskMB: 512, EnvdVersion: "0.6.13",
				Metadata:  map[string]string{"n": fmt.Sprint(i % 3), "user": "x y&z=1"},
				StartedAt: base.Add(time.Duration(i/2) * time.Second), EndAt: base.Add(time.Hour), AllowInternet: &yes,
			}
			if i == 3 {
				sb.State = store.StatePaused
			}
			if err := s.CreateSandbox(ctx, sb); err != nil {
				t.Fatal(err)
			}
		}
		if err := s.CreateSandbox(ctx, &store.Sandbox{ID: "sb00", StartedAt: base}); !errs.Is(err, errs.AlreadyExists) {
			t.Fatalf("duplicate: %v", err)
		}
		got, err := s.GetSandbox(ctx, "sb04")
		if err != nil || got.Metadata["user"] != "x y&z=1" || got.AllowInternet == nil || !*got.AllowInternet || !got.StartedAt.Equal(base.Add(2*time.Second)) {
			t.Fatalf("%+v %v", got, err)
		}
		got.State = store.StateKilled
		got.EndedAt = time.Now()
		if err := s.UpdateSandbox(ctx, got); err != nil {
			t.Fatal(err)
		}
		if _, err := s.GetSandbox(ctx, "zzz"); !errs.Is(err, errs.NotFound) {
			t.Fatal(err)
		}
		// Paginate k1's live sandboxes (12 of 13, sb04 killed) 5 at a time.
		var all []string
		cursor := ""
		for pages := 0; ; pages++ {
			page, next, err := s.ListSandboxes(ctx, store.SandboxFilter{KeyID: "k1", Limit: 5, Cursor: cursor})
			if err != nil {
				t.Fatal(err)
			}
			for _, sb := range page {
				all = append(all, sb.ID)
			}
			if next == "" {
				break
			}
			cursor = next
			if pages > 10 {
				t.Fatal("pagination does not end")
			}
		}
		if len(all) != 12 || all[0] != "sb24" || all[11] != "sb00" {
			t.Fatalf("pages: %v", all)
		}
		seen := map[string]bool{}
		for _, id := range all {
			if seen[id] {
				t.Fatalf("duplicate %s in %v", id, all)
			}
			seen[id] = true
		}
		page, _, _ := s.ListSandboxes(ctx, store.SandboxFilter{KeyID: "k2", States: []store.SandboxState{store.StatePaused}})
		if len(page) != 1 || page[0].ID != "sb03" {
			t.Fatalf("paused: %v", page)
		}
		page, _, _ = s.ListSandboxes(ctx, store.SandboxFilter{KeyID: "k2", Metadata: map[string]string{"n": "0"}, Ascending: true})
		if len(page) != 4 || page[0].ID != "sb03" { // 3, 9, 15, 21
			t.Fatalf("metadata: %v", ids(page))
		}
		if _, _, err := s.ListSandboxes(ctx, store.SandboxFilter{Cursor: "!!"}); !errs.Is(err, errs.InvalidArgument) {
			t.Fatal(err)
		}
		exp, err := s.ExpiredSandboxes(ctx, "local", base.Add(2*time.Hour))
		if err != nil || len(exp) != 23 {
			t.Fatalf("expired %d %v", len(exp), err)
		}
		counts, _ := s.CountSandboxes(ctx, "local")
		if counts[store.StateRunning] != 23 || counts[store.StatePaused] != 1 || counts[store.StateKilled] != 1 {
			t.Fatalf("counts %v", counts)
		}
	})
	t.Run("concurrent updates", func(t *testing.T) {
		var wg sync.WaitGroup
		errc := make(chan error, 20)
		for i := 0; i < 20; i++ {
			wg.Add(1)
			go func(i int) {
				defer wg.Done()
				sb := &store.Sandbox{ID: fmt.Sprintf("c%02d", i), KeyID: "k3", NodeID: "n", State: store.StateRunning, StartedAt: time.Now()}
				if err := s.CreateSandbox(ctx, sb); err != nil {
					errc <- err
					return
				}
				sb.State = store.StatePaused
				if err := s.UpdateSandbox(ctx, sb); err != nil {
					errc <- err
				}
				errc <- s.AddEvent(ctx, &store.Event{SandboxID: sb.ID, Kind: "transition", From: store.StateRunning, To: store.StatePaused})
			}(i)
		}
		wg.Wait()
		close(errc)
		for err := range errc {
			if err != nil {
				t.Fatal(err)
			}
		}
	})
	t.Run("events", func(t *testing.T) {
		for i := 0; i < 5; i++ {
			if err := s.AddEvent(ctx, &store.Event{SandboxID: "ev", Kind: "transition", Message: fmt.Sprint(i)}); err != nil {
				t.Fatal(err)
			}
		}
		evs, _ := s.ListEvents(ctx, "ev", "", false, 3)
		if len(evs) != 3 || evs[0].Message != "0" {
			t.Fatalf("%v", evs)
		}
		more, _ := s.ListEvents(ctx, "ev", evs[2].ID, false, 0)
		if len(more) != 2 || more[0].Message != "3" {
			t.Fatalf("%v", more)
		}
		desc, _ := s.ListEvents(ctx, "ev", "", true, 1)
		if len(desc) != 1 || desc[0].Message != "4" {
			t.Fatalf("%v", desc)
		}
	})
	t.Run("snapshots and nodes", func(t *testing.T) {
		if err := s.CreateSnapshot(ctx, &store.Snapshot{ID: "snap1", KeyID: "k1", SandboxID: "sb00", TemplateID: "tpl1", Names: []string{"a"}}); err != nil {
			t.Fatal(err)
		}
		sn, next, err := s.ListSnapshots(ctx, store.SnapshotFilter{KeyID: "k1"})
		if err != nil || len(sn) != 1 || sn[0].Names[0] != "a" || next != "" {
			t.Fatal(sn, next, err)
		}
		if err := s.DeleteSnapshot(ctx, "k2", "snap1"); !errs.Is(err, errs.NotFound) {
			t.Fatal("another key deleted a snapshot")
		}
		if _, err := s.GetSnapshot(ctx, "k2", "snap1"); !errs.Is(err, errs.NotFound) {
			t.Fatal("another key sees a snapshot:", err)
		}
		if err := s.CreateSnapshot(ctx, &store.Snapshot{ID: "snap1", KeyID: "k1", SandboxID: "x"}); !errs.Is(err, errs.AlreadyExists) {
			t.Fatal("duplicate id:", err)
		}
		// A name moves to the newest snapshot given it; ids and names both resolve.
		base := time.Now().Truncate(time.Millisecond).UTC()
		for i, id := range []string{"snap2", "snap3", "snap4"} {
			names := []string{"a"}
			if id == "snap3" {
				names = []string{"b"}
			}
			if err := s.CreateSnapshot(ctx, &store.Snapshot{ID: id, KeyID: "k1", SandboxID: "sb01", TemplateID: "tpl1", Names: names, NodeID: "local", CreatedAt: base.Add(time.Duration(i+1) * time.Second)}); err != nil {
				t.Fatal(err)
			}
		}
		s.CreateSnapshot(ctx, &store.Snapshot{ID: "other", KeyID: "k2", SandboxID: "sb01", Names: []string{"a"}})
		got, err := s.GetSnapshot(ctx, "k1", "a")
		if err != nil || got.ID != "snap4" || got.NodeID != "local" || got.TemplateID != "tpl1" || !got.CreatedAt.Equal(base.Add(3*time.Second)) {
			t.Fatalf("name a: %+v %v", got, err)
		}
		if got, err := s.GetSnapshot(ctx, "k1", "snap2"); err != nil || got.ID != "snap2" || len(got.Names) != 0 {
			t.Fatalf("snap2 (its name moved on): %+v %v", got, err)
		}
		if got, err := s.GetSnapshot(ctx, "k1", "b"); err != nil || got.ID != "snap3" {
			t.Fatalf("name b: %+v %v", got, err)
		}
		if _, err := s.GetSnapshot(ctx, "k1", "zzz"); !errs.Is(err, errs.NotFound) {
			t.Fatal(err)
		}
		// Paging: newest first, two at a time, with a sandbox filter.
		var seen []string
		cur := ""
		for pages := 0; ; pages++ {
			page, next, err := s.ListSnapshots(ctx, store.SnapshotFilter{KeyID: "k1", SandboxID: "sb01", Limit: 2, Cursor: cur})
			if err != nil || pages > 3 {
				t.Fatal(err, pages)
			}
			for _, p := range page {
				seen = append(seen, p.ID)
			}
			if next == "" {
				break
			}
			cur = next
		}
		if fmt.Sprint(seen) != "[snap4 snap3 snap2]" {
			t.Fatalf("pages %v", seen)
		}
		if page, _, _ := s.ListSnapshots(ctx, store.SnapshotFilter{KeyID: "k1", Name: "b"}); len(page) != 1 || page[0].ID != "snap3" {
			t.Fatalf("name filter %v", page)
		}
		if _, _, err := s.ListSnapshots(ctx, store.SnapshotFilter{KeyID: "k1", Cursor: "!!"}); !errs.Is(err, errs.InvalidArgument) {
			t.Fatal("bad cursor:", err)
		}
		// Racing snapshots with one name: the name ends on exactly one.
		var wg sync.WaitGroup
		for i := 0; i < 8; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := s.CreateSnapshot(ctx, &store.Snapshot{ID: fmt.Sprintf("race%d", i), KeyID: "k3", SandboxID: "sb", Names: []string{"r"}}); err != nil {
					t.Error(err)
				}
			}()
		}
		wg.Wait()
		if all, _, _ := s.ListSnapshots(ctx, store.SnapshotFilter{KeyID: "k3", Name: "r"}); len(all) != 1 {
			t.Fatalf("name r on %d snapshots", len(all))
		}
		if err := s.DeleteSnapshot(ctx, "k1", "snap3"); err != nil {
			t.Fatal(err)
		}
		// Every key's records on one node, for the start-up sweep.
		onLocal, err := s.NodeSnapshots(ctx, "local")
		if err != nil {
			t.Fatal(err)
		}
		var localIDs []string
		for _, sn := range onLocal {
			if sn.NodeID != "local" {
				t.Fatalf("NodeSnapshots(local) gave %+v", sn)
			}
			localIDs = append(localIDs, sn.ID)
		}
		if fmt.Sprint(localIDs) != "[snap2 snap4]" { // snap1 and race* have no node, snap3 was just deleted
			t.Fatalf("NodeSnapshots(local) = %v", localIDs)
		}
		if none, err := s.NodeSnapshots(ctx, "nowhere"); err != nil || len(none) != 0 {
			t.Fatalf("NodeSnapshots(nowhere) = %v %v", none, err)
		}
		if _, err := s.GetSnapshot(ctx, "k1", "b"); !errs.Is(err, errs.NotFound) {
			t.Fatal("deleted snapshot's name still resolves:", err)
		}
		if err := s.PutNode(ctx, &store.Node{ID: "local", Runtime: "gvisor", Capacity: 8, State: "ready", HeartbeatAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
		if err := s.PutNode(ctx, &store.Node{ID: "local", Runtime: "gvisor", Capacity: 9, State: "ready", HeartbeatAt: time.Now()}); err != nil {
			t.Fatal(err)
		}
		ns, _ := s.ListNodes(ctx)
		if len(ns) != 1 || ns[0].Capacity != 9 {
			t.Fatal(ns)
		}
		// PutSandbox: insert a record made elsewhere (a cluster node's),
		// then overwrite it.
		remote := &store.Sandbox{ID: "remote1", KeyID: "k9", TemplateID: "base", NodeID: "n2", State: store.StateRunning,
			CPUCount: 1, MemoryMB: 256, DiskMB: 512, EnvdVersion: "0.6.13", StartedAt: time.Now(), EndAt: time.Now().Add(time.Minute)}
		if err := s.PutSandbox(ctx, remote); err != nil {
			t.Fatal(err)
		}
		remote.State, remote.Reason = store.StateFailed, "node n2 is down"
		if err := s.PutSandbox(ctx, remote); err != nil {
			t.Fatal(err)
		}
		if got, err := s.GetSandbox(ctx, "remote1"); err != nil || got.State != store.StateFailed || got.NodeID != "n2" || got.Reason != "node n2 is down" {
			t.Fatalf("put sandbox: %+v %v", got, err)
		}
		// EventsAfter: every sandbox's events in id order, from a cursor;
		// an event added again under its id is AlreadyExists.
		all, err := s.EventsAfter(ctx, "", 0)
		if err != nil || len(all) == 0 {
			t.Fatalf("events after: %d %v", len(all), err)
		}
		for i := 1; i < len(all); i++ {
			if all[i-1].ID >= all[i].ID {
				t.Fatalf("events out of order: %s %s", all[i-1].ID, all[i].ID)
			}
		}
		if rest, _ := s.EventsAfter(ctx, all[0].ID, 0); len(rest) != len(all)-1 {
			t.Fatalf("events after the first: %d of %d", len(rest), len(all))
		}
		if one, _ := s.EventsAfter(ctx, "", 1); len(one) != 1 || one[0].ID != all[0].ID {
			t.Fatalf("limit 1: %v", one)
		}
		dup := *all[0]
		if err := s.AddEvent(ctx, &dup); !errs.Is(err, errs.AlreadyExists) {
			t.Fatalf("event added twice: %v", err)
		}
	})
}

func ids(sbs []*store.Sandbox) []string {
	var out []string
	for _, sb := range sbs {
		out = append(out, sb.ID)
	}
	return out
}
