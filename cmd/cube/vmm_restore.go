//go:build linux

package main

import (
	"fmt"

	"github.com/spf13/cobra"

	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
)

func init() {
	addCommand(func() *cobra.Command {
		var sock, prepare, guest string
		cmd := &cobra.Command{
			Use:    "vmm-restore",
			Short:  "A pre-started VMM that restores a snapshot when asked (POST /restore on its control socket)",
			Hidden: true,
			Args:   cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				if sock == "" {
					return fmt.Errorf("--api-socket is required")
				}
				switch guest {
				case "synth":
					return st.Serve(sock, prepare)
				default:
					return fmt.Errorf("--guest %q: only the synthetic guest (synth) is served by this command", guest)
				}
			},
		}
		cmd.Flags().StringVar(&sock, "api-socket", "", "control socket to listen on")
		cmd.Flags().StringVar(&prepare, "prepare", "", "snapshot dir to prepare the restore of ahead of the request")
		cmd.Flags().StringVar(&guest, "guest", "synth", "device set of the snapshots to restore (synth)")
		return cmd
	})
}
