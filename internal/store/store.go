// Package store is Cube's durable state: sandboxes, templates, snapshots,
// API keys (hashed), nodes and lifecycle events.
//
// One implementation runs on two databases through database/sql: SQLite
// (modernc.org/sqlite, a file in the data dir, the default) and PostgreSQL
// (github.com/jackc/pgx/v5 via its stdlib driver, for clusters). Queries are
// written once with `?` placeholders and rebound to `$n` for PostgreSQL; the
// schema uses only types both understand (TEXT, BIGINT, INTEGER) and times
// are stored as Unix milliseconds. Migrations are an ordered list applied
// once each and recorded in schema_migrations.
//
// Errors carry errs kinds: NotFound for unknown rows, AlreadyExists for
// duplicate keys, Internal for database failures.
package store

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib" // "pgx" driver
	_ "modernc.org/sqlite"             // "sqlite" driver

	"github.com/cubesandbox/cube/internal/errs"
)

// Dialect names the database behind a Store.
type Dialect string

const (
	SQLite   Dialect = "sqlite"
	Postgres Dialect = "postgres"
)

// Store is the durable state. Safe for concurrent use.
type Store struct {
	db      *sql.DB
	dialect Dialect
}

// Open opens the store: url "" = SQLite file cube.db in dataDir;
// "postgres://..." or "postgresql://..." = PostgreSQL; "sqlite:PATH" = that
// SQLite file. Migrations are applied before Open returns.
func Open(ctx context.Context, dataDir, url string) (*Store, error) {
	var (
		db      *sql.DB
		dialect Dialect
		err     error
	)
	switch {
	case strings.HasPrefix(url, "postgres://"), strings.HasPrefix(url, "postgresql://"):
		dialect = Postgres
		db, err = sql.Open("pgx", url)
		if err != nil {
			return nil, errs.Wrap(errs.InvalidArgument, err, "open PostgreSQL store")
		}
		db.SetMaxOpenConns(16)
	case url == "" || strings.HasPrefix(url, "sqlite:"):
		dialect = SQLite
		path := strings.TrimPrefix(url, "sqlite:")
		if path == "" {
			if err := os.MkdirAll(dataDir, 0o700); err != nil {
				return nil, errs.Wrap(errs.Internal, err, "create data dir %s", dataDir)
			}
			path = filepath.Join(dataDir, "cube.db")
		}
		dsn := "file:" + path + "?_pragma=busy_timeout(10000)&_pragma=journal_mode(WAL)&_pragma=foreign_keys(1)&_pragma=synchronous(NORMAL)&_txlock=immediate"
		db, err = sql.Open("sqlite", dsn)
		if err != nil {
			return nil, errs.Wrap(errs.Internal, err, "open SQLite store %s", path)
		}
		// One writer at a time is SQLite's model; a small pool of
		// connections serves concurrent readers in WAL mode.
		db.SetMaxOpenConns(4)
	default:
		return nil, errs.E(errs.InvalidArgument, "database URL %q: want empty, sqlite:PATH or postgres://...", url)
	}
	s := &Store{db: db, dialect: dialect}
	if err := db.PingContext(ctx); err != nil {
		db.Close()
		return nil, errs.Wrap(errs.Unavailable, err, "connect to the %s store", dialect)
	}
	if err := s.migrate(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// Dialect returns which database backs the store.
func (s *Store) Dialect() Dialect { return s.dialect }

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// rebind turns ? placeholders into $1, $2... for PostgreSQL.
func (s *Store) rebind(q string) string {
	if s.dialect != Postgres {
		return q
	}
	var b strings.Builder
	n := 0
	for i := 0; i < len(q); i++ {
		if q[i] == '?' {
			n++
			b.WriteByte('$')
			b.WriteString(strconv.Itoa(n))
			continue
		}
		b.WriteByte(q[i])
	}
	return b.String()
}

func (s *Store) exec(ctx context.Context, q string, args ...any) (sql.Result, error) {
	return s.db.ExecContext(ctx, s.rebind(q), args...)
}

func (s *Store) query(ctx context.Context, q string, args ...any) (*sql.Rows, error) {
	return s.db.QueryContext(ctx, s.rebind(q), args...)
}

func (s *Store) queryRow(ctx context.Context, q string, args ...any) *sql.Row {
	return s.db.QueryRowContext(ctx, s.rebind(q), args...)
}

// migrations are applied in order, each once. Never edit a released one;
// append a new one.
var migrations = []string{
	// 1: the initial schema.
	`CREATE TABLE api_keys (
		id TEXT PRIMARY KEY,
		name TEXT NOT NULL,
		hash TEXT NOT NULL UNIQUE,
		prefix TEXT NOT NULL,
		created_at BIGINT NOT NULL,
		revoked_at BIGINT NOT NULL DEFAULT 0,
		last_used_at BIGINT NOT NULL DEFAULT 0
	);
	CREATE TABLE nodes (
		id TEXT PRIMARY KEY,
		address TEXT NOT NULL,
		runtime TEXT NOT NULL,
		capacity INTEGER NOT NULL,
		state TEXT NOT NULL,
		heartbeat_at BIGINT NOT NULL
	);
	CREATE TABLE templates (
		id TEXT PRIMARY KEY,
		aliases TEXT NOT NULL DEFAULT '[]',
		envd_version TEXT NOT NULL DEFAULT '',
		cpu_count INTEGER NOT NULL,
		memory_mb INTEGER NOT NULL,
		disk_mb INTEGER NOT NULL,
		ports TEXT NOT NULL DEFAULT '[]',
		state TEXT NOT NULL,
		reason TEXT NOT NULL DEFAULT '',
		public INTEGER NOT NULL DEFAULT 1,
		spawn_count BIGINT NOT NULL DEFAULT 0,
		last_spawned_at BIGINT NOT NULL DEFAULT 0,
		created_at BIGINT NOT NULL,
		updated_at BIGINT NOT NULL
	);
	CREATE TABLE sandboxes (
		id TEXT PRIMARY KEY,
		key_id TEXT NOT NULL,
		template_id TEXT NOT NULL,
		alias TEXT NOT NULL DEFAULT '',
		node_id TEXT NOT NULL,
		state TEXT NOT NULL,
		cpu_count INTEGER NOT NULL,
		memory_mb INTEGER NOT NULL,
		disk_mb INTEGER NOT NULL,
		envd_version TEXT NOT NULL,
		envd_token TEXT NOT NULL DEFAULT '',
		traffic_token TEXT NOT NULL DEFAULT '',
		metadata TEXT NOT NULL DEFAULT '{}',
		env_vars TEXT NOT NULL DEFAULT '{}',
		network TEXT NOT NULL DEFAULT '{}',
		allow_internet INTEGER NOT NULL DEFAULT -1,
		auto_pause INTEGER NOT NULL DEFAULT 0,
		auto_pause_memory INTEGER NOT NULL DEFAULT 1,
		auto_resume INTEGER NOT NULL DEFAULT 0,
		timeout_s INTEGER NOT NULL DEFAULT 300,
		started_at BIGINT NOT NULL,
		end_at BIGINT NOT NULL,
		paused_at BIGINT NOT NULL DEFAULT 0,
		ended_at BIGINT NOT NULL DEFAULT 0,
		reason TEXT NOT NULL DEFAULT '',
		created_at BIGINT NOT NULL,
		updated_at BIGINT NOT NULL
	);
	CREATE INDEX sandboxes_key_state ON sandboxes (key_id, state, started_at);
	CREATE INDEX sandboxes_state_end ON sandboxes (state, end_at);
	CREATE TABLE snapshots (
		id TEXT PRIMARY KEY,
		key_id TEXT NOT NULL,
		sandbox_id TEXT NOT NULL,
		template_id TEXT NOT NULL,
		names TEXT NOT NULL DEFAULT '[]',
		node_id TEXT NOT NULL,
		created_at BIGINT NOT NULL
	);
	CREATE TABLE events (
		id TEXT PRIMARY KEY,
		sandbox_id TEXT NOT NULL,
		kind TEXT NOT NULL,
		from_state TEXT NOT NULL DEFAULT '',
		to_state TEXT NOT NULL DEFAULT '',
		message TEXT NOT NULL DEFAULT '',
		at BIGINT NOT NULL
	);
	CREATE INDEX events_sandbox ON events (sandbox_id, id);`,
	// 2: listing a key's snapshots newest first (GET /snapshots).
	`CREATE INDEX snapshots_key_created ON snapshots (key_id, created_at, id)`,
}

func (s *Store) migrate(ctx context.Context) error {
	if _, err := s.exec(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)`); err != nil {
		return errs.Wrap(errs.Internal, err, "create schema_migrations")
	}
	for i, m := range migrations {
		version := i + 1
		err := s.tx(ctx, func(tx *sql.Tx) error {
			if s.dialect == Postgres {
				// Serialise concurrent migrators (several cube processes
				// starting at once against one database).
				if _, err := tx.ExecContext(ctx, `SELECT pg_advisory_xact_lock(4242)`); err != nil {
					return err
				}
			}
			var n int
			if err := tx.QueryRowContext(ctx, s.rebind(`SELECT COUNT(*) FROM schema_migrations WHERE version = ?`), version).Scan(&n); err != nil {
				return err
			}
			if n > 0 {
				return nil
			}
			for _, stmt := range strings.Split(m, ";") {
				if strings.TrimSpace(stmt) == "" {
					continue
				}
				if _, err := tx.ExecContext(ctx, stmt); err != nil {
					return fmt.Errorf("%s: %w", strings.TrimSpace(stmt)[:min(40, len(strings.TrimSpace(stmt)))], err)
				}
			}
			_, err := tx.ExecContext(ctx, s.rebind(`INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)`), version, ms(time.Now()))
			return err
		})
		if err != nil {
			return errs.Wrap(errs.Internal, err, "apply store migration %d", version)
		}
	}
	return nil
}

func (s *Store) tx(ctx context.Context, f func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := f(tx); err != nil {
		tx.Rollback()
		return err
	}
	return tx.Commit()
}

// SchemaVersion returns the number of applied migrations.
func (s *Store) SchemaVersion(ctx context.Context) (int, error) {
	var n int
	err := s.queryRow(ctx, `SELECT COUNT(*) FROM schema_migrations`).Scan(&n)
	return n, dbErr(err, "read schema version")
}

func ms(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixMilli()
}

func fromMS(v int64) time.Time {
	if v == 0 {
		return time.Time{}
	}
	return time.UnixMilli(v).UTC()
}

func b2i(b bool) int {
	if b {
		return 1
	}
	return 0
}

// dbErr maps database errors to errs kinds.
func dbErr(err error, what string, args ...any) error {
	if err == nil {
		return nil
	}
	if errors.Is(err, sql.ErrNoRows) {
		return errs.Wrap(errs.NotFound, err, what, args...)
	}
	msg := err.Error()
	if strings.Contains(msg, "UNIQUE constraint") || strings.Contains(msg, "duplicate key") || strings.Contains(msg, "SQLSTATE 23505") {
		return errs.Wrap(errs.AlreadyExists, err, what, args...)
	}
	return errs.Wrap(errs.Internal, err, what, args...)
}
