// Command cube is Cube's one binary: server, node, CLI, doctor, VMM.
// Each subcommand lives in its own file and registers itself with
// addCommand from an init function.
package main

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/logging"
)

var version = "dev"

// global flags shared by every subcommand.
var (
	flagConfig   string
	flagDataDir  string
	flagLogLevel string
)

var subcommands []func() *cobra.Command

// addCommand registers a subcommand constructor (called from init).
func addCommand(f func() *cobra.Command) { subcommands = append(subcommands, f) }

func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:           "cube",
		Short:         "Cube: self-hosted, E2B-compatible sandboxes on microVMs or gVisor",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version,
	}
	root.PersistentFlags().StringVar(&flagConfig, "config", "", "JSON config file (optional)")
	root.PersistentFlags().StringVar(&flagDataDir, "data-dir", "", "data directory (default /var/lib/cube, env CUBE_DATA_DIR)")
	root.PersistentFlags().StringVar(&flagLogLevel, "log-level", "", "log level: debug, info, warn, error")
	for _, f := range subcommands {
		root.AddCommand(f())
	}
	return root
}

// loadConfig returns the typed config with the global flags applied.
func loadConfig() (config.Config, error) {
	c, err := config.Load(flagConfig)
	if err != nil {
		return c, err
	}
	if flagDataDir != "" {
		c.DataDir = flagDataDir
	}
	if flagLogLevel != "" {
		c.LogLevel = flagLogLevel
	}
	return c, nil
}

// newLogger returns the process's one logger.
func newLogger(c config.Config) *slog.Logger {
	return logging.New(os.Stderr, c.LogLevel, c.LogFormat)
}

func main() {
	if err := newRoot().Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "cube: %s\n", errs.Message(err))
		if errs.KindOf(err) == errs.Internal {
			fmt.Fprintf(os.Stderr, "  cause: %v\n", err)
		}
		os.Exit(1)
	}
}
