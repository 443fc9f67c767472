package node

import (
	"context"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/store"
)

// ReconcileReport says what Reconcile did.
type ReconcileReport struct {
	Adopted   []string // live in the store and in the runtime: kept
	Failed    []string // live in the store, lost by the runtime or caught mid-create
	Destroyed []string // in the runtime only (orphans): destroyed
}

// Reconcile makes the store and the runtime agree after a start or a
// crash, and rebuilds the in-memory cache and slot accounting:
//   - a sandbox the store has as running/paused (or mid pause/resume) that
//     the runtime still has is re-adopted in the runtime's state;
//   - one caught mid-create is destroyed and marked failed (its creator
//     never got an answer);
//   - one the runtime no longer has is marked failed;
//   - a runtime sandbox the store does not know as live is destroyed.
//
// Every decision is recorded as an event.
func (n *Node) Reconcile(ctx context.Context) error {
	_, err := n.ReconcileReport(ctx)
	return err
}

// ReconcileReport is Reconcile returning what it did.
func (n *Node) ReconcileReport(ctx context.Context) (ReconcileReport, error) {
	var rep ReconcileReport
	infos, err := n.rt.List(ctx)
	if err != nil {
		return rep, errs.Wrap(errs.Unavailable, err, "list runtime sandboxes")
	}
	inRT := map[string]runtime.Info{}
	for _, i := range infos {
		inRT[i.ID] = i
	}
	stored, _, err := n.st.ListSandboxes(ctx, store.SandboxFilter{NodeID: n.cfg.ID})
	if err != nil {
		return rep, err
	}
	live := map[string]bool{}
	for _, sb := range stored {
		live[sb.ID] = true
		unlock := n.lockSandbox(sb.ID)
		info, ok := inRT[sb.ID]
		switch {
		case sb.State == store.StateCreating:
			if ok {
				n.rt.Destroy(ctx, sb.ID)
			}
			n.transition(ctx, sb, store.StateFailed, "cube restarted while the sandbox was being created")
			rep.Failed = append(rep.Failed, sb.ID)
		case !ok:
			from := sb.State
			if from == store.StateRunning || from == store.StatePaused {
				// Not a legal transition in normal operation: record it
				// directly.
				sb.State = store.StateFailed
				sb.Reason = "the runtime no longer has this sandbox"
				sb.EndedAt = n.now().UTC()
				if err := n.st.UpdateSandbox(ctx, sb); err == nil {
					n.event(ctx, sb.ID, "transition", from, store.StateFailed, sb.Reason)
				}
			} else {
				n.transition(ctx, sb, store.StateFailed, "the runtime no longer has this sandbox")
			}
			rep.Failed = append(rep.Failed, sb.ID)
		default:
			from := sb.State
			want := store.StateRunning
			if info.State == runtime.StatePaused {
				want = store.StatePaused
			} else if info.State != runtime.StateRunning {
				n.rt.Destroy(ctx, sb.ID)
				sb.State = store.StateFailed
				sb.Reason = "the runtime reports it " + string(info.State)
				sb.EndedAt = n.now().UTC()
				n.st.UpdateSandbox(ctx, sb)
				n.event(ctx, sb.ID, "transition", from, store.StateFailed, sb.Reason)
				rep.Failed = append(rep.Failed, sb.ID)
				break
			}
			sb.State = want
			if from != want {
				if err := n.st.UpdateSandbox(ctx, sb); err != nil {
					unlock()
					return rep, err
				}
			}
			n.setCache(sb)
			if want == store.StateRunning {
				n.mu.Lock()
				n.active[sb.ID] = true
				n.mu.Unlock()
			}
			n.event(ctx, sb.ID, "adopted", from, want, "re-adopted after restart")
			rep.Adopted = append(rep.Adopted, sb.ID)
		}
		unlock()
	}
	for id := range inRT {
		if live[id] {
			continue
		}
		if err := n.rt.Destroy(ctx, id); err != nil {
			n.log.Warn("destroy orphan", "sandbox", id, "err", err)
			continue
		}
		n.event(ctx, id, "orphan", "", store.StateKilled, "destroyed: unknown to the store")
		rep.Destroyed = append(rep.Destroyed, id)
	}
	if len(rep.Adopted)+len(rep.Failed)+len(rep.Destroyed) > 0 {
		n.log.Info("reconciled", "adopted", len(rep.Adopted), "failed", len(rep.Failed), "destroyed", len(rep.Destroyed))
	}
	return rep, nil
}
