//go:build linux

package main

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/network"
)

func init() {
	addCommand(func() *cobra.Command {
		c := &cobra.Command{Use: "net", Short: "Sandbox network slots (internal/network)"}
		c.AddCommand(&cobra.Command{
			Use:   "purge",
			Short: "Remove every slot namespace, link and the host table of the configured prefix (refused while a cube process uses it)",
			RunE: func(cmd *cobra.Command, args []string) error {
				cfg, err := loadConfig()
				if err != nil {
					return err
				}
				cfg.SlotPoolSize = 0
				m, err := network.NewManager(cfg, newLogger(cfg))
				if err != nil {
					return err
				}
				n := len(m.Orphans())
				if err := m.Purge(); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "removed %d slots with prefix %q\n", n, cfg.SlotPrefix)
				return nil
			},
		})
		return c
	})
}
