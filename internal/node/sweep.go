package node

import (
	"context"
	"sort"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
)

// Crash safety of snapshots and forks. A snapshot is written by the
// runtime first and recorded in the store after; a fork's snapshot is
// never recorded (it is deleted when the forks are made); a deletion
// removes the runtime's snapshot before the record. A server killed in
// the middle of any of these leaves a snapshot without a record, an
// incomplete snapshot, or a record without a snapshot. At start, after
// the reconciler, SweepSnapshots compares the runtime's snapshots
// (runtime.SnapshotLister) with this node's records and removes:
//   - incomplete snapshots (and their record, if any),
//   - complete snapshots no record names (fork temporaries, a
//     createSnapshot interrupted before its record),
//   - records whose snapshot the runtime does not have.
// The sandboxes an interrupted fork was creating are the reconciler's
// (caught mid-create: failed). Runtimes that cannot list their snapshots
// (also behind a wrapper such as netslot, which answers Unimplemented)
// are not swept.

// SweepReport says what SweepSnapshots removed.
type SweepReport struct {
	Snapshots []string // runtime snapshots deleted
	Records   []string // store records deleted
}

// SweepSnapshots removes the leftovers of interrupted snapshots, forks and
// snapshot deletions and logs each. Run it before serving: a snapshot
// being taken at the same time would look like a leftover.
func (n *Node) SweepSnapshots(ctx context.Context) (SweepReport, error) {
	var rep SweepReport
	sl, ok := n.rt.(runtime.SnapshotLister)
	if !ok {
		return rep, nil
	}
	onDisk, err := sl.ListSnapshots(ctx)
	if errs.Is(err, errs.Unimplemented) {
		return rep, nil // a wrapper over a runtime that cannot list them
	}
	if err != nil {
		return rep, err
	}
	recs, err := n.st.NodeSnapshots(ctx, n.cfg.ID)
	if err != nil {
		return rep, err
	}
	complete := map[string]bool{}
	for _, e := range onDisk {
		complete[e.ID] = e.Complete
	}
	recorded := map[string]bool{}
	for _, r := range recs {
		recorded[r.ID] = true
	}
	sort.Slice(onDisk, func(i, j int) bool { return onDisk[i].ID < onDisk[j].ID })
	for _, e := range onDisk {
		why := ""
		switch {
		case !e.Complete:
			why = "incomplete (interrupted while written or deleted)"
		case !recorded[e.ID]:
			why = "no record (an interrupted fork's temporary, or a snapshot whose record was never written)"
		default:
			continue
		}
		if err := n.rt.DeleteSnapshot(ctx, e.ID); err != nil && !errs.Is(err, errs.NotFound) {
			n.log.Warn("sweep: could not remove leftover snapshot", "snapshot", e.ID, "err", err)
			continue
		}
		n.log.Info("sweep: removed leftover snapshot", "snapshot", e.ID, "why", why)
		rep.Snapshots = append(rep.Snapshots, e.ID)
	}
	for _, r := range recs {
		if complete[r.ID] {
			continue
		}
		if err := n.st.DeleteSnapshot(ctx, r.KeyID, r.ID); err != nil && !errs.Is(err, errs.NotFound) {
			n.log.Warn("sweep: could not remove snapshot record", "snapshot", r.ID, "err", err)
			continue
		}
		n.log.Info("sweep: removed snapshot record without a complete snapshot", "snapshot", r.ID, "sandbox", r.SandboxID, "names", r.Names)
		rep.Records = append(rep.Records, r.ID)
	}
	return rep, nil
}
