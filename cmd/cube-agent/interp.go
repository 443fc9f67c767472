//go:build linux

package main

import (
	"context"
	"log/slog"
	"net/http"

	"github.com/cubesandbox/cube/internal/agent/envd"
	"github.com/cubesandbox/cube/internal/agent/interp"
)

// interpEnv lets the code interpreter use envd's settings in-process
// (where the stock server calls envd's GET /envs).
type interpEnv struct{ s *envd.Server }

func (e interpEnv) EnvVars() map[string]string { return e.s.EnvVars() }
func (e interpEnv) AccessToken() string        { return e.s.AccessToken() }
func (e interpEnv) KernelUser() (interp.RunAs, string, error) {
	u, err := e.s.DefaultUser()
	if err != nil {
		return interp.RunAs{}, "", err
	}
	return interp.RunAs{Cred: u.Credential(), UID: int(u.UID), GID: int(u.GID), Env: e.s.BaseEnv(u)}, u.Home, nil
}

// newInterp builds the code interpreter served on :49999.
func newInterp(ctx context.Context, log *slog.Logger, srv *envd.Server) (http.Handler, func(), error) {
	is := interp.New(log.With("component", "interp"), interpEnv{srv})
	is.Warm()
	return is.Handler(), is.Close, nil
}
