package node_test

import (
	"context"
	"fmt"
	"testing"

	"github.com/cubesandbox/cube/internal/store"
)

// TestSweepSnapshots: the sweep removes runtime snapshots without a record
// (fork temporaries) and records without a snapshot, and keeps the rest.
func TestSweepSnapshots(t *testing.T) {
	ctx := context.Background()
	n, rt, st := setup(t, 4)
	create(t, n, "p1")
	for _, id := range []string{"kept", "forktmp"} {
		if _, err := n.Snapshot(ctx, "p1", id); err != nil {
			t.Fatal(err)
		}
	}
	for _, sn := range []*store.Snapshot{
		{ID: "kept", KeyID: "k", SandboxID: "p1", TemplateID: "base", Names: []string{"mine"}, NodeID: n.ID()},
		{ID: "gone", KeyID: "k", SandboxID: "p1", TemplateID: "base", NodeID: n.ID()},
		{ID: "elsewhere", KeyID: "k", SandboxID: "x", TemplateID: "base", NodeID: "other-node"},
	} {
		if err := st.CreateSnapshot(ctx, sn); err != nil {
			t.Fatal(err)
		}
	}
	rep, err := n.SweepSnapshots(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(rep.Snapshots) != "[forktmp]" || fmt.Sprint(rep.Records) != "[gone]" {
		t.Fatalf("swept %+v", rep)
	}
	if got := rt.Snapshots(); fmt.Sprint(got) != "[kept]" {
		t.Fatalf("runtime keeps %v", got)
	}
	if _, err := st.GetSnapshot(ctx, "k", "mine"); err != nil {
		t.Fatalf("kept record: %v", err)
	}
	if _, err := st.GetSnapshot(ctx, "k", "gone"); err == nil {
		t.Fatal("record without a snapshot survived")
	}
	if _, err := st.GetSnapshot(ctx, "k", "elsewhere"); err != nil {
		t.Fatalf("another node's record was touched: %v", err)
	}
	// Nothing left: a second sweep removes nothing.
	if rep, err := n.SweepSnapshots(ctx); err != nil || len(rep.Snapshots)+len(rep.Records) != 0 {
		t.Fatalf("second sweep %+v %v", rep, err)
	}
}
