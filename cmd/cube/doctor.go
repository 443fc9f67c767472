package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/hostinfo"
)

func init() {
	addCommand(func() *cobra.Command {
		var strict bool
		c := &cobra.Command{
			Use:   "doctor",
			Short: "Print the host kind, the runtime Cube picks, and what is missing",
			RunE: func(cmd *cobra.Command, args []string) error {
				missing := hostinfo.Probe{}.Report(cmd.OutOrStdout())
				if strict && missing > 0 {
					os.Exit(2)
				}
				return nil
			},
		}
		c.Flags().BoolVar(&strict, "strict", false, "exit 2 if anything is missing")
		return c
	})
}
