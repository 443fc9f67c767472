package api

import (
	"context"
	"net/http"
	"regexp"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/master"
	"github.com/cubesandbox/cube/internal/node"
	"github.com/cubesandbox/cube/internal/store"
)

// Snapshots and forks (spec §3.1, e2b 2.51 createSnapshot, listSnapshots,
// deleteSnapshot, fork):
//
//   - A snapshot is taken of a running sandbox, which keeps running, or of
//     a paused one, which stays paused (node.Snapshot). It is
//     kept by the runtime of the sandbox's node and recorded in the store
//     (owner key, source sandbox, template, names, node), so it outlives
//     the sandbox and a restart of cube.
//   - Its id looks like a sandbox id; an optional name is unique per key
//     (a name given again moves to the new snapshot). Either can be passed
//     as the templateID of a create, which restores the snapshot on its
//     node; templates win over snapshot names.
//   - A fork snapshots the parent once, creates count sandboxes from it on
//     the parent's node and deletes that snapshot again.

// SnapshotRequest is the body of POST /sandboxes/{id}/snapshots.
type SnapshotRequest struct {
	Name *string `json:"name,omitempty"`
}

// SnapshotInfo is a snapshot as the SDK sees it.
type SnapshotInfo struct {
	SnapshotID string   `json:"snapshotID"`
	Names      []string `json:"names"`
}

// ForkRequest is the body of POST /sandboxes/{id}/fork.
type ForkRequest struct {
	Timeout *int64 `json:"timeout,omitempty"`
	Count   *int64 `json:"count,omitempty"`
}

// ForkResult is one entry of the fork answer: exactly one of Sandbox and
// Error is set.
type ForkResult struct {
	Sandbox *Sandbox   `json:"sandbox,omitempty"`
	Error   *ErrorBody `json:"error,omitempty"`
}

// Fork limits and defaults.
const (
	MaxForkCount       = 10
	DefaultForkTimeout = 15 * time.Second // the SDK's documented default
)

var snapshotNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// ValidateSnapshotName checks an optional snapshot name ("" = none).
func ValidateSnapshotName(name string) error {
	if name == "" || snapshotNameRE.MatchString(name) {
		return nil
	}
	return errs.E(errs.InvalidArgument, "snapshot name %q must be 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit", truncate(name, 64))
}

// ParseForkRequest checks a fork body and returns the number of forks and
// their timeout.
func ParseForkRequest(req ForkRequest) (int, time.Duration, error) {
	count := int64(1)
	if req.Count != nil {
		count = *req.Count
	}
	if count < 1 || count > MaxForkCount {
		return 0, 0, errs.E(errs.InvalidArgument, "count must be an integer from 1 to %d", MaxForkCount)
	}
	timeout, err := timeoutOr(req.Timeout, DefaultForkTimeout)
	if err != nil {
		return 0, 0, err
	}
	return int(count), timeout, nil
}

func snapshotInfo(sn *store.Snapshot) SnapshotInfo {
	return SnapshotInfo{SnapshotID: sn.ID, Names: append([]string{}, sn.Names...)}
}

// templateOf describes the sandbox sb as the template of a sandbox restored
// from its snapshot: the same template id and resources.
func templateOf(sb *store.Sandbox) *store.Template {
	return &store.Template{ID: sb.TemplateID, EnvdVersion: sb.EnvdVersion, CPUCount: sb.CPUCount,
		MemoryMB: sb.MemoryMB, DiskMB: sb.DiskMB, State: "ready"}
}

func (a *API) createSnapshot(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body SnapshotRequest
	if err := decode(r, &body, true); err != nil {
		writeErr(w, r, err)
		return
	}
	var names []string
	if body.Name != nil && *body.Name != "" {
		if err := ValidateSnapshotName(*body.Name); err != nil {
			writeErr(w, r, err)
			return
		}
		if _, err := a.st.ResolveTemplate(r.Context(), *body.Name); err == nil {
			writeErr(w, r, errs.E(errs.InvalidArgument, "snapshot name %q is already a template's name", *body.Name))
			return
		}
		names = []string{*body.Name}
	}
	sb, n, err := a.own(r.Context(), key, r.PathValue("id"))
	if err != nil {
		writeErr(w, r, err)
		return
	}
	snapID := NewSandboxID()
	if _, err := n.Snapshot(r.Context(), sb.ID, snapID); err != nil {
		writeErr(w, r, err)
		return
	}
	sn := &store.Snapshot{ID: snapID, KeyID: key.ID, SandboxID: sb.ID, TemplateID: sb.TemplateID, Names: names, NodeID: n.ID()}
	if err := a.st.CreateSnapshot(context.WithoutCancel(r.Context()), sn); err != nil {
		n.DeleteSnapshot(context.WithoutCancel(r.Context()), snapID)
		writeErr(w, r, err)
		return
	}
	writeJSON(w, http.StatusCreated, snapshotInfo(sn))
}

func (a *API) listSnapshots(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	q := r.URL.Query()
	limit, err := queryInt(q, "limit", 100, 1, 100, "limit must be an integer from 1 to 100")
	if err != nil {
		writeErr(w, r, err)
		return
	}
	sns, next, err := a.st.ListSnapshots(r.Context(), store.SnapshotFilter{KeyID: key.ID, SandboxID: q.Get("sandboxID"),
		Name: q.Get("name"), Limit: int(limit), Cursor: q.Get("nextToken")})
	if err != nil {
		writeErr(w, r, err)
		return
	}
	out := make([]SnapshotInfo, 0, len(sns))
	for _, sn := range sns {
		out = append(out, snapshotInfo(sn))
	}
	if next != "" {
		w.Header().Set("X-Next-Token", next)
	}
	writeJSON(w, http.StatusOK, out)
}

// deleteTemplate serves DELETE /templates/{templateID}, which the SDK's
// deleteSnapshot calls: a snapshot of the key (by id or name) is deleted
// from its node and the store. Templates are the operator's (`cube
// template`, shared by every key) and are not deleted through the API.
func (a *API) deleteTemplate(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	id := r.PathValue("templateID")
	sn, err := a.st.GetSnapshot(r.Context(), key.ID, id)
	if err != nil {
		if !errs.Is(err, errs.NotFound) {
			writeErr(w, r, err)
			return
		}
		if _, terr := a.st.ResolveTemplate(r.Context(), id); terr == nil {
			writeErr(w, r, errs.E(errs.PermissionDenied, "template %q is managed by the operator (cube template); the API deletes only snapshots", truncate(id, 64)))
			return
		}
		writeErr(w, r, errs.E(errs.NotFound, "snapshot %q not found", truncate(id, 64)))
		return
	}
	n, err := a.m.Node(sn.NodeID)
	if err != nil {
		writeErr(w, r, &errs.Error{Kind: errs.Unavailable, Msg: "the node that keeps this snapshot is not available", RetryAfter: 10 * time.Second})
		return
	}
	ctx := context.WithoutCancel(r.Context())
	if err := n.DeleteSnapshot(ctx, sn.ID); err != nil && !errs.Is(err, errs.NotFound) {
		writeErr(w, r, err)
		return
	}
	if err := a.st.DeleteSnapshot(ctx, key.ID, sn.ID); err != nil {
		writeErr(w, r, err)
		return
	}
	w.WriteHeader(http.StatusNoContent)
}

// fromSnapshot resolves a create's templateID as a snapshot of key (id or
// name): the template to describe the new sandbox, and the snapshot.
func (a *API) fromSnapshot(ctx context.Context, key store.APIKey, idOrName string) (*store.Template, *store.Snapshot, *store.Sandbox, error) {
	sn, err := a.st.GetSnapshot(ctx, key.ID, idOrName)
	if err != nil {
		return nil, nil, nil, err
	}
	src, err := a.st.GetSandbox(ctx, sn.SandboxID)
	if err == nil {
		return templateOf(src), sn, src, nil
	}
	tpl, err := a.st.ResolveTemplate(ctx, sn.TemplateID)
	if err != nil {
		return nil, nil, nil, errs.E(errs.FailedPrecondition, "snapshot %q: its template %q is gone", truncate(idOrName, 64), sn.TemplateID)
	}
	return tpl, sn, nil, nil
}

func (a *API) fork(w http.ResponseWriter, r *http.Request, key store.APIKey) {
	var body ForkRequest
	if err := decode(r, &body, true); err != nil {
		writeErr(w, r, err)
		return
	}
	count, timeout, err := ParseForkRequest(body)
	if err != nil {
		writeErr(w, r, err)
		return
	}
	parent, n, err := a.own(r.Context(), key, r.PathValue("id"))
	if err != nil {
		writeErr(w, r, err)
		return
	}
	if parent.State != store.StateRunning {
		writeErr(w, r, errs.E(errs.Conflict, "sandbox %q is %s, not running: only a running sandbox can be forked", parent.ID, parent.State))
		return
	}
	snapID := NewSandboxID()
	if _, err := n.Snapshot(r.Context(), parent.ID, snapID); err != nil {
		writeErr(w, r, err)
		return
	}
	ctx := context.WithoutCancel(r.Context())
	defer n.DeleteSnapshot(ctx, snapID)
	out := make([]ForkResult, count)
	var wg sync.WaitGroup
	for i := range out {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb, err := a.createFork(ctx, n, key, parent, snapID, timeout)
			if err != nil {
				status := errs.HTTPStatus(errs.KindOf(err))
				out[i].Error = &ErrorBody{Code: status, Message: errs.Message(err)}
				a.metrics.CreateErrors.WithLabelValues(errs.KindOf(err).String()).Inc()
				return
			}
			body := a.sandboxBody(sb)
			out[i].Sandbox = &body
		}()
	}
	wg.Wait()
	writeJSON(w, http.StatusCreated, out)
}

// createFork creates one sandbox from the parent's snapshot snapID with
// the parent's settings and fresh access tokens.
func (a *API) createFork(ctx context.Context, n master.Node, key store.APIKey, parent *store.Sandbox, snapID string, timeout time.Duration) (*store.Sandbox, error) {
	req := node.CreateRequest{
		ID: NewSandboxID(), KeyID: key.ID, Template: templateOf(parent), Alias: parent.Alias, Timeout: timeout,
		Metadata: copyMap(parent.Metadata), EnvVars: copyMap(parent.EnvVars), AllowInternet: parent.AllowInternet,
		Network: parent.Network, AutoPause: parent.AutoPause, AutoPauseMemory: parent.AutoPauseMemory,
		AutoResume: parent.AutoResume, SnapshotID: snapID, SnapshotAccessToken: parent.EnvdToken,
	}
	if parent.EnvdToken != "" {
		req.EnvdToken = store.RandomHex(24)
	}
	if parent.TrafficToken != "" {
		req.TrafficToken = store.RandomHex(24)
	}
	return a.m.CreateOn(ctx, n.ID(), req)
}

func copyMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
