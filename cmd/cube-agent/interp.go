//go:build linux

package main

import (
	"context"
	"log/slog"
	"net/http"

	"github.com/cubesandbox/cube/internal/agent/envd"
	"github.com/cubesandbox/cube/internal/errs"
)

// newInterp builds the code interpreter served on :49999.
func newInterp(ctx context.Context, log *slog.Logger, srv *envd.Server) (http.Handler, func(), error) {
	return nil, nil, errs.E(errs.Unimplemented, "code interpreter not built yet")
}
