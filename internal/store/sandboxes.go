package store

import (
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// SandboxState is a sandbox's lifecycle state (see internal/node).
type SandboxState string

const (
	StateCreating SandboxState = "creating"
	StateRunning  SandboxState = "running"
	StatePausing  SandboxState = "pausing"
	StatePaused   SandboxState = "paused"
	StateResuming SandboxState = "resuming"
	StateKilled   SandboxState = "killed"
	StateFailed   SandboxState = "failed"
)

// Live reports whether the state is one a user still sees (not killed or
// failed).
func (s SandboxState) Live() bool { return s != StateKilled && s != StateFailed }

// Network is a sandbox's network configuration (E2B's `network` object).
type Network struct {
	AllowOut           []string `json:"allowOut,omitempty"`
	DenyOut            []string `json:"denyOut,omitempty"`
	AllowPublicTraffic *bool    `json:"allowPublicTraffic,omitempty"`
	MaskRequestHost    string   `json:"maskRequestHost,omitempty"`
}

// Sandbox is the durable record of one sandbox.
type Sandbox struct {
	ID              string
	KeyID           string // owner API key
	TemplateID      string
	Alias           string // the name the template was asked for by
	NodeID          string
	State           SandboxState
	CPUCount        int
	MemoryMB        int
	DiskMB          int
	EnvdVersion     string
	EnvdToken       string // envd access token ("" = not secure)
	TrafficToken    string // required on non-envd ports ("" = public)
	Metadata        map[string]string
	EnvVars         map[string]string
	Network         Network
	AllowInternet   *bool
	AutoPause       bool
	AutoPauseMemory bool
	AutoResume      bool
	TimeoutS        int // the timeout asked for at create (auto-resume reuses it)
	StartedAt       time.Time
	EndAt           time.Time
	PausedAt        time.Time
	EndedAt         time.Time
	Reason          string // why it failed
	CreatedAt       time.Time
	UpdatedAt       time.Time

	// Gen is not stored: the node bumps it each time the sandbox starts
	// running (create, resume) so that connections made to an earlier
	// incarnation are never reused.
	Gen int
}

const sandboxCols = `id, key_id, template_id, alias, node_id, state, cpu_count, memory_mb, disk_mb, envd_version,
	envd_token, traffic_token, metadata, env_vars, network, allow_internet, auto_pause, auto_pause_memory,
	auto_resume, timeout_s, started_at, end_at, paused_at, ended_at, reason, created_at, updated_at`

func sandboxArgs(sb *Sandbox) []any {
	md, _ := json.Marshal(nonNil(sb.Metadata))
	ev, _ := json.Marshal(nonNil(sb.EnvVars))
	nw, _ := json.Marshal(sb.Network)
	ai := -1
	if sb.AllowInternet != nil {
		ai = b2i(*sb.AllowInternet)
	}
	return []any{sb.ID, sb.KeyID, sb.TemplateID, sb.Alias, sb.NodeID, string(sb.State), sb.CPUCount, sb.MemoryMB,
		sb.DiskMB, sb.EnvdVersion, sb.EnvdToken, sb.TrafficToken, string(md), string(ev), string(nw), ai,
		b2i(sb.AutoPause), b2i(sb.AutoPauseMemory), b2i(sb.AutoResume), sb.TimeoutS, ms(sb.StartedAt), ms(sb.EndAt),
		ms(sb.PausedAt), ms(sb.EndedAt), sb.Reason, ms(sb.CreatedAt), ms(sb.UpdatedAt)}
}

func nonNil(m map[string]string) map[string]string {
	if m == nil {
		return map[string]string{}
	}
	return m
}

type scanner interface{ Scan(...any) error }

func scanSandbox(r scanner) (*Sandbox, error) {
	var (
		sb                                              Sandbox
		state, md, ev, nw                               string
		ai, ap, apm, ar                                 int
		startedAt, endAt, pausedAt, endedAt, cAt, updAt int64
	)
	err := r.Scan(&sb.ID, &sb.KeyID, &sb.TemplateID, &sb.Alias, &sb.NodeID, &state, &sb.CPUCount, &sb.MemoryMB,
		&sb.DiskMB, &sb.EnvdVersion, &sb.EnvdToken, &sb.TrafficToken, &md, &ev, &nw, &ai, &ap, &apm, &ar,
		&sb.TimeoutS, &startedAt, &endAt, &pausedAt, &endedAt, &sb.Reason, &cAt, &updAt)
	if err != nil {
		return nil, err
	}
	sb.State = SandboxState(state)
	_ = json.Unmarshal([]byte(md), &sb.Metadata)
	_ = json.Unmarshal([]byte(ev), &sb.EnvVars)
	_ = json.Unmarshal([]byte(nw), &sb.Network)
	if ai >= 0 {
		v := ai == 1
		sb.AllowInternet = &v
	}
	sb.AutoPause, sb.AutoPauseMemory, sb.AutoResume = ap == 1, apm == 1, ar == 1
	sb.StartedAt, sb.EndAt, sb.PausedAt, sb.EndedAt = fromMS(startedAt), fromMS(endAt), fromMS(pausedAt), fromMS(endedAt)
	sb.CreatedAt, sb.UpdatedAt = fromMS(cAt), fromMS(updAt)
	return &sb, nil
}

// CreateSandbox inserts a new sandbox record.
func (s *Store) CreateSandbox(ctx context.Context, sb *Sandbox) error {
	now := time.Now()
	if sb.CreatedAt.IsZero() {
		sb.CreatedAt = now
	}
	sb.UpdatedAt = now
	_, err := s.exec(ctx, `INSERT INTO sandboxes (`+sandboxCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)`, sandboxArgs(sb)...)
	return dbErr(err, "create sandbox %s", sb.ID)
}

// UpdateSandbox writes every field of sb.
func (s *Store) UpdateSandbox(ctx context.Context, sb *Sandbox) error {
	sb.UpdatedAt = time.Now()
	args := sandboxArgs(sb)
	args = append(args[1:], sb.ID)
	res, err := s.exec(ctx, `UPDATE sandboxes SET key_id=?, template_id=?, alias=?, node_id=?, state=?, cpu_count=?,
		memory_mb=?, disk_mb=?, envd_version=?, envd_token=?, traffic_token=?, metadata=?, env_vars=?, network=?,
		allow_internet=?, auto_pause=?, auto_pause_memory=?, auto_resume=?, timeout_s=?, started_at=?, end_at=?, paused_at=?,
		ended_at=?, reason=?, created_at=?, updated_at=? WHERE id=?`, args...)
	if err != nil {
		return dbErr(err, "update sandbox %s", sb.ID)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errs.E(errs.NotFound, "sandbox %q not found", sb.ID)
	}
	return nil
}

// GetSandbox returns the sandbox with id (any state).
func (s *Store) GetSandbox(ctx context.Context, id string) (*Sandbox, error) {
	sb, err := scanSandbox(s.queryRow(ctx, `SELECT `+sandboxCols+` FROM sandboxes WHERE id = ?`, id))
	if err != nil {
		if err == sql.ErrNoRows {
			return nil, errs.E(errs.NotFound, "sandbox %q not found", id)
		}
		return nil, dbErr(err, "get sandbox %s", id)
	}
	return sb, nil
}

// SandboxFilter selects sandboxes for ListSandboxes.
type SandboxFilter struct {
	KeyID        string            // "" = every key
	NodeID       string            // "" = every node
	States       []SandboxState    // empty = every live state
	Metadata     map[string]string // all pairs must match
	Template     string            // template id or alias
	StartedAfter time.Time
	Ascending    bool   // order by start time; default newest first
	Limit        int    // 0 = no limit
	Cursor       string // from a previous page's NextCursor
}

// ListSandboxes returns one page of sandboxes matching f and the cursor of
// the next page ("" when this is the last).
func (s *Store) ListSandboxes(ctx context.Context, f SandboxFilter) ([]*Sandbox, string, error) {
	var (
		where []string
		args  []any
	)
	if f.KeyID != "" {
		where = append(where, "key_id = ?")
		args = append(args, f.KeyID)
	}
	if f.NodeID != "" {
		where = append(where, "node_id = ?")
		args = append(args, f.NodeID)
	}
	states := f.States
	if len(states) == 0 {
		states = []SandboxState{StateCreating, StateRunning, StatePausing, StatePaused, StateResuming}
	}
	ph := make([]string, len(states))
	for i, st := range states {
		ph[i] = "?"
		args = append(args, string(st))
	}
	where = append(where, "state IN ("+strings.Join(ph, ",")+")")
	if f.Template != "" {
		where = append(where, "(template_id = ? OR alias = ?)")
		args = append(args, f.Template, f.Template)
	}
	if !f.StartedAfter.IsZero() {
		where = append(where, "started_at > ?")
		args = append(args, ms(f.StartedAfter))
	}
	if f.Cursor != "" {
		at, id, err := decodeCursor(f.Cursor)
		if err != nil {
			return nil, "", err
		}
		if f.Ascending {
			where = append(where, "(started_at > ? OR (started_at = ? AND id > ?))")
		} else {
			where = append(where, "(started_at < ? OR (started_at = ? AND id < ?))")
		}
		args = append(args, at, at, id)
	}
	order := "started_at DESC, id DESC"
	if f.Ascending {
		order = "started_at ASC, id ASC"
	}
	rows, err := s.query(ctx, `SELECT `+sandboxCols+` FROM sandboxes WHERE `+strings.Join(where, " AND ")+` ORDER BY `+order, args...)
	if err != nil {
		return nil, "", dbErr(err, "list sandboxes")
	}
	defer rows.Close()
	var out []*Sandbox
	next := ""
	for rows.Next() {
		sb, err := scanSandbox(rows)
		if err != nil {
			return nil, "", dbErr(err, "list sandboxes")
		}
		if !matchMetadata(sb.Metadata, f.Metadata) {
			continue
		}
		if f.Limit > 0 && len(out) == f.Limit {
			last := out[len(out)-1]
			next = encodeCursor(ms(last.StartedAt), last.ID)
			break
		}
		out = append(out, sb)
	}
	if err := rows.Err(); err != nil {
		return nil, "", dbErr(err, "list sandboxes")
	}
	return out, next, nil
}

func matchMetadata(have, want map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}

func encodeCursor(at int64, id string) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(at, 10) + "|" + id))
}

func decodeCursor(c string) (int64, string, error) {
	b, err := base64.RawURLEncoding.DecodeString(c)
	if err == nil {
		at, id, ok := strings.Cut(string(b), "|")
		if ok {
			if n, err := strconv.ParseInt(at, 10, 64); err == nil {
				return n, id, nil
			}
		}
	}
	return 0, "", errs.E(errs.InvalidArgument, "invalid nextToken")
}

// CountSandboxes returns the number of sandboxes per state (live and not)
// on node ("" = all nodes).
func (s *Store) CountSandboxes(ctx context.Context, nodeID string) (map[SandboxState]int, error) {
	q := `SELECT state, COUNT(*) FROM sandboxes`
	var args []any
	if nodeID != "" {
		q += ` WHERE node_id = ?`
		args = append(args, nodeID)
	}
	rows, err := s.query(ctx, q+` GROUP BY state`, args...)
	if err != nil {
		return nil, dbErr(err, "count sandboxes")
	}
	defer rows.Close()
	out := map[SandboxState]int{}
	for rows.Next() {
		var st string
		var n int
		if err := rows.Scan(&st, &n); err != nil {
			return nil, dbErr(err, "count sandboxes")
		}
		out[SandboxState(st)] = n
	}
	return out, dbErr(rows.Err(), "count sandboxes")
}

// ExpiredSandboxes returns running sandboxes on node whose end time has
// passed at now, oldest first.
func (s *Store) ExpiredSandboxes(ctx context.Context, nodeID string, now time.Time) ([]*Sandbox, error) {
	rows, err := s.query(ctx, `SELECT `+sandboxCols+` FROM sandboxes WHERE node_id = ? AND state = ? AND end_at <= ? ORDER BY end_at`,
		nodeID, string(StateRunning), ms(now))
	if err != nil {
		return nil, dbErr(err, "list expired sandboxes")
	}
	defer rows.Close()
	var out []*Sandbox
	for rows.Next() {
		sb, err := scanSandbox(rows)
		if err != nil {
			return nil, dbErr(err, "list expired sandboxes")
		}
		out = append(out, sb)
	}
	return out, dbErr(rows.Err(), "list expired sandboxes")
}

// SortedKeys returns m's keys in order (stable output).
func SortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// PutSandbox writes every field of sb, inserting the record if it is new
// (a control plane mirroring a remote node's records). UpdatedAt is set
// to now, as in UpdateSandbox.
func (s *Store) PutSandbox(ctx context.Context, sb *Sandbox) error {
	err := s.UpdateSandbox(ctx, sb)
	if errs.Is(err, errs.NotFound) {
		err = s.CreateSandbox(ctx, sb)
		if errs.Is(err, errs.AlreadyExists) {
			// Raced with another writer: the record exists now.
			err = s.UpdateSandbox(ctx, sb)
		}
	}
	return err
}
