//go:build linux

package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	st "github.com/cubesandbox/cube/internal/vmm/snapshot/snaptest"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmspec"
)

func init() {
	addCommand(func() *cobra.Command {
		var sock, prepare, guest, optsFile, tapNetns string
		var bootNow bool
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
				case "linux":
					var o vmmapi.Options
					if optsFile != "" {
						b, err := os.ReadFile(optsFile)
						if err != nil {
							return err
						}
						if err := json.Unmarshal(b, &o); err != nil {
							return fmt.Errorf("--options %s: %w", optsFile, err)
						}
					}
					return vmmspec.Serve(vmmspec.ServeConfig{Socket: sock, Options: o, Boot: bootNow, TapNetns: tapNetns})
				default:
					return fmt.Errorf("--guest %q: synth or linux", guest)
				}
			},
		}
		cmd.Flags().StringVar(&sock, "api-socket", "", "control socket to listen on")
		cmd.Flags().StringVar(&prepare, "prepare", "", "snapshot dir to prepare the restore of ahead of the request")
		cmd.Flags().StringVar(&guest, "guest", "synth", "synth (the synthetic test guest) or linux (devices from --options)")
		cmd.Flags().StringVar(&optsFile, "options", "", "linux: vmmapi.Options JSON file (kernel, disks, tap, vsock, rng)")
		cmd.Flags().BoolVar(&bootNow, "boot", false, "linux: boot the kernel now instead of waiting for a restore")
		cmd.Flags().StringVar(&tapNetns, "tap-netns", "", "linux: network namespace holding the tap named in the options")
		return cmd
	})
}
