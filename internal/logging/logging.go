// Package logging builds Cube's one log/slog logger. Every component takes
// a *slog.Logger from its caller (never a global), derived from New with
// .With("component", ...).
//
// Levels: Debug = per-request detail; Info = lifecycle events (sandbox
// created, template ready); Warn = degraded but working (fallback runtime,
// retry); Error = an operation failed and a user will see it.
package logging

import (
	"io"
	"log/slog"
	"os"
	"strings"
)

// New returns a logger writing to w (stderr if nil) at the given level
// ("debug", "info", "warn", "error") in "text" or "json" format.
func New(w io.Writer, level, format string) *slog.Logger {
	if w == nil {
		w = os.Stderr
	}
	opts := &slog.HandlerOptions{Level: ParseLevel(level)}
	var h slog.Handler
	if strings.EqualFold(format, "json") {
		h = slog.NewJSONHandler(w, opts)
	} else {
		h = slog.NewTextHandler(w, opts)
	}
	return slog.New(h)
}

// ParseLevel maps a level name to a slog.Level; unknown names are Info.
func ParseLevel(s string) slog.Level {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "debug":
		return slog.LevelDebug
	case "warn", "warning":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	}
	return slog.LevelInfo
}

// Discard is a logger that drops everything (tests).
func Discard() *slog.Logger { return slog.New(slog.DiscardHandler) }
