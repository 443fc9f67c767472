package store

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"slices"
	"sync/atomic"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// ---- API keys ----

// APIKey is a stored API key. The key itself is never stored: only its
// SHA-256 hash and a short prefix for display.
type APIKey struct {
	ID         string
	Name       string
	Prefix     string // "e2b_1234…"
	CreatedAt  time.Time
	RevokedAt  time.Time
	LastUsedAt time.Time
}

// Revoked reports whether the key was revoked.
func (k APIKey) Revoked() bool { return !k.RevokedAt.IsZero() }

var keyRE = regexp.MustCompile(`^e2b_[0-9a-f]{8,128}$`)

// HashKey returns the stored form of an API key.
func HashKey(key string) string {
	h := sha256.Sum256([]byte(key))
	return hex.EncodeToString(h[:])
}

// RandomHex returns n random bytes as hex.
func RandomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return hex.EncodeToString(b)
}

// CreateAPIKey makes a new key `e2b_<40 hex>` named name and returns it
// with its record; the plain key is shown once and never stored.
func (s *Store) CreateAPIKey(ctx context.Context, name string) (string, APIKey, error) {
	key := "e2b_" + RandomHex(20)
	k := APIKey{ID: "key_" + RandomHex(6), Name: name, Prefix: key[:12] + "…", CreatedAt: time.Now().UTC()}
	_, err := s.exec(ctx, `INSERT INTO api_keys (id, name, hash, prefix, created_at) VALUES (?,?,?,?,?)`,
		k.ID, k.Name, HashKey(key), k.Prefix, ms(k.CreatedAt))
	if err != nil {
		return "", APIKey{}, dbErr(err, "create API key")
	}
	return key, k, nil
}

// Authenticate returns the live key record matching key; Unauthenticated
// if it is malformed, unknown or revoked.
func (s *Store) Authenticate(ctx context.Context, key string) (APIKey, error) {
	if !keyRE.MatchString(key) {
		return APIKey{}, errs.E(errs.Unauthenticated, "invalid API key")
	}
	want := HashKey(key)
	var (
		k            APIKey
		hash         string
		c, r, lastAt int64
	)
	err := s.queryRow(ctx, `SELECT id, name, hash, prefix, created_at, revoked_at, last_used_at FROM api_keys WHERE hash = ?`, want).
		Scan(&k.ID, &k.Name, &hash, &k.Prefix, &c, &r, &lastAt)
	if err == sql.ErrNoRows || (err == nil && subtle.ConstantTimeCompare([]byte(hash), []byte(want)) != 1) {
		return APIKey{}, errs.E(errs.Unauthenticated, "invalid API key")
	}
	if err != nil {
		return APIKey{}, dbErr(err, "authenticate")
	}
	k.CreatedAt, k.RevokedAt, k.LastUsedAt = fromMS(c), fromMS(r), fromMS(lastAt)
	if k.Revoked() {
		return APIKey{}, errs.E(errs.Unauthenticated, "API key was revoked")
	}
	// Record use at most once a minute per key to keep writes rare.
	if time.Since(k.LastUsedAt) > time.Minute {
		s.exec(ctx, `UPDATE api_keys SET last_used_at = ? WHERE id = ?`, ms(time.Now()), k.ID)
	}
	return k, nil
}

// ListAPIKeys returns every key, oldest first.
func (s *Store) ListAPIKeys(ctx context.Context) ([]APIKey, error) {
	rows, err := s.query(ctx, `SELECT id, name, prefix, created_at, revoked_at, last_used_at FROM api_keys ORDER BY created_at, id`)
	if err != nil {
		return nil, dbErr(err, "list API keys")
	}
	defer rows.Close()
	var out []APIKey
	for rows.Next() {
		var k APIKey
		var c, r, l int64
		if err := rows.Scan(&k.ID, &k.Name, &k.Prefix, &c, &r, &l); err != nil {
			return nil, dbErr(err, "list API keys")
		}
		k.CreatedAt, k.RevokedAt, k.LastUsedAt = fromMS(c), fromMS(r), fromMS(l)
		out = append(out, k)
	}
	return out, dbErr(rows.Err(), "list API keys")
}

// RevokeAPIKey revokes the key with this id (or whose plain value this is).
func (s *Store) RevokeAPIKey(ctx context.Context, idOrKey string) error {
	res, err := s.exec(ctx, `UPDATE api_keys SET revoked_at = ? WHERE (id = ? OR hash = ?) AND revoked_at = 0`,
		ms(time.Now()), idOrKey, HashKey(idOrKey))
	if err != nil {
		return dbErr(err, "revoke API key")
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errs.E(errs.NotFound, "no live API key %q", idOrKey)
	}
	return nil
}

// ---- templates ----

// Template is a template as the control plane sees it.
type Template struct {
	ID            string
	Aliases       []string
	EnvdVersion   string
	CPUCount      int
	MemoryMB      int
	DiskMB        int
	Ports         []int // exposed ports (besides the agent's)
	State         string
	Reason        string
	Public        bool
	SpawnCount    int64
	LastSpawnedAt time.Time
	CreatedAt     time.Time
	UpdatedAt     time.Time
}

const templateCols = `id, aliases, envd_version, cpu_count, memory_mb, disk_mb, ports, state, reason, public, spawn_count, last_spawned_at, created_at, updated_at`

func scanTemplate(r scanner) (*Template, error) {
	var (
		t              Template
		aliases, ports string
		pub            int
		l, c, u        int64
	)
	if err := r.Scan(&t.ID, &aliases, &t.EnvdVersion, &t.CPUCount, &t.MemoryMB, &t.DiskMB, &ports, &t.State, &t.Reason, &pub, &t.SpawnCount, &l, &c, &u); err != nil {
		return nil, err
	}
	_ = json.Unmarshal([]byte(aliases), &t.Aliases)
	_ = json.Unmarshal([]byte(ports), &t.Ports)
	t.Public = pub == 1
	t.LastSpawnedAt, t.CreatedAt, t.UpdatedAt = fromMS(l), fromMS(c), fromMS(u)
	return &t, nil
}

// PutTemplate inserts or replaces a template record.
func (s *Store) PutTemplate(ctx context.Context, t *Template) error {
	now := time.Now()
	if t.CreatedAt.IsZero() {
		t.CreatedAt = now
	}
	t.UpdatedAt = now
	al, _ := json.Marshal(append([]string{}, t.Aliases...))
	po, _ := json.Marshal(append([]int{}, t.Ports...))
	return s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, s.rebind(`DELETE FROM templates WHERE id = ?`), t.ID); err != nil {
			return dbErr(err, "put template %s", t.ID)
		}
		_, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO templates (`+templateCols+`) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)`),
			t.ID, string(al), t.EnvdVersion, t.CPUCount, t.MemoryMB, t.DiskMB, string(po), t.State, t.Reason, b2i(t.Public),
			t.SpawnCount, ms(t.LastSpawnedAt), ms(t.CreatedAt), ms(t.UpdatedAt))
		return dbErr(err, "put template %s", t.ID)
	})
}

// ListTemplates returns every template.
func (s *Store) ListTemplates(ctx context.Context) ([]*Template, error) {
	rows, err := s.query(ctx, `SELECT `+templateCols+` FROM templates ORDER BY created_at, id`)
	if err != nil {
		return nil, dbErr(err, "list templates")
	}
	defer rows.Close()
	var out []*Template
	for rows.Next() {
		t, err := scanTemplate(rows)
		if err != nil {
			return nil, dbErr(err, "list templates")
		}
		out = append(out, t)
	}
	return out, dbErr(rows.Err(), "list templates")
}

// ResolveTemplate finds a template by id or alias.
func (s *Store) ResolveTemplate(ctx context.Context, idOrAlias string) (*Template, error) {
	ts, err := s.ListTemplates(ctx)
	if err != nil {
		return nil, err
	}
	for _, t := range ts {
		if t.ID == idOrAlias {
			return t, nil
		}
	}
	for _, t := range ts {
		for _, a := range t.Aliases {
			if a == idOrAlias {
				return t, nil
			}
		}
	}
	return nil, errs.E(errs.NotFound, "template %q not found", idOrAlias)
}

// DeleteTemplate removes a template record.
func (s *Store) DeleteTemplate(ctx context.Context, id string) error {
	res, err := s.exec(ctx, `DELETE FROM templates WHERE id = ?`, id)
	if err != nil {
		return dbErr(err, "delete template %s", id)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errs.E(errs.NotFound, "template %q not found", id)
	}
	return nil
}

// TemplateSpawned counts one sandbox started from template id.
func (s *Store) TemplateSpawned(ctx context.Context, id string) error {
	_, err := s.exec(ctx, `UPDATE templates SET spawn_count = spawn_count + 1, last_spawned_at = ? WHERE id = ?`, ms(time.Now()), id)
	return dbErr(err, "count template spawn")
}

// ---- snapshots ----

// Snapshot is a snapshot taken of a sandbox (fork / createSnapshot).
type Snapshot struct {
	ID         string
	KeyID      string
	SandboxID  string
	TemplateID string
	Names      []string
	NodeID     string
	CreatedAt  time.Time
}

// CreateSnapshot records a snapshot. Names are unique per key: a name the
// key already gave to another snapshot moves to this one (the newest
// snapshot of a name is the one the name resolves to, as E2B assigns a new
// build to an existing snapshot template).
func (s *Store) CreateSnapshot(ctx context.Context, sn *Snapshot) error {
	if sn.CreatedAt.IsZero() {
		sn.CreatedAt = time.Now().UTC()
	}
	names, _ := json.Marshal(append([]string{}, sn.Names...))
	return s.tx(ctx, func(tx *sql.Tx) error {
		if len(sn.Names) > 0 && s.dialect == Postgres {
			// Serialise the key's named snapshots (SQLite transactions are
			// already exclusive): a name must end on one snapshot only.
			if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(4243, hashtext($1))`, sn.KeyID); err != nil {
				return dbErr(err, "create snapshot %s", sn.ID)
			}
		}
		if len(sn.Names) > 0 {
			rows, err := tx.QueryContext(ctx, s.rebind(`SELECT id, names FROM snapshots WHERE key_id = ?`), sn.KeyID)
			if err != nil {
				return dbErr(err, "create snapshot %s", sn.ID)
			}
			moved := map[string][]string{}
			for rows.Next() {
				var id, raw string
				if err := rows.Scan(&id, &raw); err != nil {
					rows.Close()
					return dbErr(err, "create snapshot %s", sn.ID)
				}
				var have []string
				_ = json.Unmarshal([]byte(raw), &have)
				keep := make([]string, 0, len(have))
				for _, n := range have {
					if !slices.Contains(sn.Names, n) {
						keep = append(keep, n)
					}
				}
				if len(keep) != len(have) {
					moved[id] = keep
				}
			}
			rows.Close()
			if err := rows.Err(); err != nil {
				return dbErr(err, "create snapshot %s", sn.ID)
			}
			for id, keep := range moved {
				b, _ := json.Marshal(keep)
				if _, err := tx.ExecContext(ctx, s.rebind(`UPDATE snapshots SET names = ? WHERE id = ?`), string(b), id); err != nil {
					return dbErr(err, "create snapshot %s", sn.ID)
				}
			}
		}
		_, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO snapshots (id, key_id, sandbox_id, template_id, names, node_id, created_at) VALUES (?,?,?,?,?,?,?)`),
			sn.ID, sn.KeyID, sn.SandboxID, sn.TemplateID, string(names), sn.NodeID, ms(sn.CreatedAt))
		return dbErr(err, "create snapshot %s", sn.ID)
	})
}

const snapshotCols = `id, key_id, sandbox_id, template_id, names, node_id, created_at`

func scanSnapshot(r scanner) (*Snapshot, error) {
	var sn Snapshot
	var names string
	var c int64
	if err := r.Scan(&sn.ID, &sn.KeyID, &sn.SandboxID, &sn.TemplateID, &names, &sn.NodeID, &c); err != nil {
		return nil, err
	}
	_ = json.Unmarshal([]byte(names), &sn.Names)
	sn.CreatedAt = fromMS(c)
	return &sn, nil
}

// SnapshotFilter selects snapshots for ListSnapshots.
type SnapshotFilter struct {
	KeyID     string // required: a key sees only its own snapshots
	SandboxID string // "" = any source sandbox
	Name      string // "" = any; else the snapshot's id or one of its names
	Limit     int    // 0 = no limit
	Cursor    string // from a previous page
}

// ListSnapshots returns one page of the snapshots of f.KeyID, newest
// first, and the cursor of the next page ("" when this is the last).
func (s *Store) ListSnapshots(ctx context.Context, f SnapshotFilter) ([]*Snapshot, string, error) {
	q := `SELECT ` + snapshotCols + ` FROM snapshots WHERE key_id = ?`
	args := []any{f.KeyID}
	if f.SandboxID != "" {
		q += ` AND sandbox_id = ?`
		args = append(args, f.SandboxID)
	}
	if f.Cursor != "" {
		at, id, err := decodeCursor(f.Cursor)
		if err != nil {
			return nil, "", err
		}
		q += ` AND (created_at < ? OR (created_at = ? AND id < ?))`
		args = append(args, at, at, id)
	}
	rows, err := s.query(ctx, q+` ORDER BY created_at DESC, id DESC`, args...)
	if err != nil {
		return nil, "", dbErr(err, "list snapshots")
	}
	defer rows.Close()
	var out []*Snapshot
	next := ""
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, "", dbErr(err, "list snapshots")
		}
		if f.Name != "" && sn.ID != f.Name && !slices.Contains(sn.Names, f.Name) {
			continue
		}
		if f.Limit > 0 && len(out) == f.Limit {
			last := out[len(out)-1]
			next = encodeCursor(ms(last.CreatedAt), last.ID)
			break
		}
		out = append(out, sn)
	}
	if err := rows.Err(); err != nil {
		return nil, "", dbErr(err, "list snapshots")
	}
	return out, next, nil
}

// GetSnapshot returns the snapshot of key whose id is idOrName, or else
// the newest one carrying the name idOrName. NotFound otherwise (another
// key's snapshot does not exist for this key).
func (s *Store) GetSnapshot(ctx context.Context, keyID, idOrName string) (*Snapshot, error) {
	sn, err := scanSnapshot(s.queryRow(ctx, `SELECT `+snapshotCols+` FROM snapshots WHERE id = ? AND key_id = ?`, idOrName, keyID))
	if err == nil {
		return sn, nil
	}
	if !errors.Is(err, sql.ErrNoRows) {
		return nil, dbErr(err, "get snapshot")
	}
	all, _, err := s.ListSnapshots(ctx, SnapshotFilter{KeyID: keyID, Name: idOrName, Limit: 1})
	if err != nil {
		return nil, err
	}
	if len(all) == 0 {
		return nil, errs.E(errs.NotFound, "snapshot %q not found", idOrName)
	}
	return all[0], nil
}

// NodeSnapshots returns the snapshot records of every key kept on node
// nodeID (the start-up sweep compares them with the runtime's).
func (s *Store) NodeSnapshots(ctx context.Context, nodeID string) ([]*Snapshot, error) {
	rows, err := s.query(ctx, `SELECT `+snapshotCols+` FROM snapshots WHERE node_id = ? ORDER BY id`, nodeID)
	if err != nil {
		return nil, dbErr(err, "list node snapshots")
	}
	defer rows.Close()
	var out []*Snapshot
	for rows.Next() {
		sn, err := scanSnapshot(rows)
		if err != nil {
			return nil, dbErr(err, "list node snapshots")
		}
		out = append(out, sn)
	}
	return out, dbErr(rows.Err(), "list node snapshots")
}

// DeleteSnapshot removes a snapshot record of key.
func (s *Store) DeleteSnapshot(ctx context.Context, keyID, id string) error {
	res, err := s.exec(ctx, `DELETE FROM snapshots WHERE id = ? AND key_id = ?`, id, keyID)
	if err != nil {
		return dbErr(err, "delete snapshot %s", id)
	}
	if n, _ := res.RowsAffected(); n == 0 {
		return errs.E(errs.NotFound, "snapshot %q not found", id)
	}
	return nil
}

// ---- nodes ----

// Node is a machine that runs sandboxes.
type Node struct {
	ID          string
	Address     string
	Runtime     string
	Capacity    int
	State       string // ready | draining | down
	HeartbeatAt time.Time
}

// PutNode inserts or updates a node record.
func (s *Store) PutNode(ctx context.Context, n *Node) error {
	return s.tx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, s.rebind(`DELETE FROM nodes WHERE id = ?`), n.ID); err != nil {
			return dbErr(err, "put node %s", n.ID)
		}
		_, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO nodes (id, address, runtime, capacity, state, heartbeat_at) VALUES (?,?,?,?,?,?)`),
			n.ID, n.Address, n.Runtime, n.Capacity, n.State, ms(n.HeartbeatAt))
		return dbErr(err, "put node %s", n.ID)
	})
}

// ListNodes returns every node.
func (s *Store) ListNodes(ctx context.Context) ([]*Node, error) {
	rows, err := s.query(ctx, `SELECT id, address, runtime, capacity, state, heartbeat_at FROM nodes ORDER BY id`)
	if err != nil {
		return nil, dbErr(err, "list nodes")
	}
	defer rows.Close()
	var out []*Node
	for rows.Next() {
		var n Node
		var h int64
		if err := rows.Scan(&n.ID, &n.Address, &n.Runtime, &n.Capacity, &n.State, &h); err != nil {
			return nil, dbErr(err, "list nodes")
		}
		n.HeartbeatAt = fromMS(h)
		out = append(out, &n)
	}
	return out, dbErr(rows.Err(), "list nodes")
}

// ---- events ----

// Event is one lifecycle event of a sandbox.
type Event struct {
	ID        string
	SandboxID string
	Kind      string // "transition", "error", "adopted", ...
	From, To  SandboxState
	Message   string
	At        time.Time
}

var eventSeq atomic.Uint64

// AddEvent appends an event. IDs sort by time.
func (s *Store) AddEvent(ctx context.Context, e *Event) error {
	if e.At.IsZero() {
		e.At = time.Now().UTC()
	}
	if e.ID == "" {
		e.ID = fmt.Sprintf("%016x%06x%s", e.At.UnixNano(), eventSeq.Add(1)&0xffffff, RandomHex(2))
	}
	_, err := s.exec(ctx, `INSERT INTO events (id, sandbox_id, kind, from_state, to_state, message, at) VALUES (?,?,?,?,?,?,?)`,
		e.ID, e.SandboxID, e.Kind, string(e.From), string(e.To), e.Message, ms(e.At))
	return dbErr(err, "add event")
}

// EventsAfter returns the events of every sandbox with an id above after
// (exclusive), oldest first, at most limit (0 = 1000): what a cluster
// node ships to its control.
func (s *Store) EventsAfter(ctx context.Context, after string, limit int) ([]*Event, error) {
	if limit <= 0 || limit > 1000 {
		limit = 1000
	}
	rows, err := s.query(ctx, fmt.Sprintf(`SELECT id, sandbox_id, kind, from_state, to_state, message, at FROM events WHERE id > ? ORDER BY id ASC LIMIT %d`, limit), after)
	if err != nil {
		return nil, dbErr(err, "list events")
	}
	return scanEvents(rows)
}

// ListEvents returns events of sandbox after cursor id (exclusive), oldest
// first (newest first if desc), at most limit (0 = 1000).
func (s *Store) ListEvents(ctx context.Context, sandboxID, after string, desc bool, limit int) ([]*Event, error) {
	if limit <= 0 || limit > 1000 {
		limit = 1000
	}
	q := `SELECT id, sandbox_id, kind, from_state, to_state, message, at FROM events WHERE sandbox_id = ?`
	args := []any{sandboxID}
	if after != "" {
		if desc {
			q += ` AND id < ?`
		} else {
			q += ` AND id > ?`
		}
		args = append(args, after)
	}
	if desc {
		q += ` ORDER BY id DESC`
	} else {
		q += ` ORDER BY id ASC`
	}
	q += fmt.Sprintf(` LIMIT %d`, limit)
	rows, err := s.query(ctx, q, args...)
	if err != nil {
		return nil, dbErr(err, "list events")
	}
	return scanEvents(rows)
}

// scanEvents reads the rows of an events query (id, sandbox_id, kind,
// from_state, to_state, message, at) and closes them.
func scanEvents(rows *sql.Rows) ([]*Event, error) {
	defer rows.Close()
	var out []*Event
	for rows.Next() {
		var e Event
		var from, to string
		var at int64
		if err := rows.Scan(&e.ID, &e.SandboxID, &e.Kind, &from, &to, &e.Message, &at); err != nil {
			return nil, dbErr(err, "list events")
		}
		e.From, e.To, e.At = SandboxState(from), SandboxState(to), fromMS(at)
		out = append(out, &e)
	}
	return out, dbErr(rows.Err(), "list events")
}
