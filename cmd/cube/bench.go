package main

import "github.com/spf13/cobra"

// benchSubcommands are the `cube bench <x>` commands; each benchmark file
// registers its own with addBenchCommand from an init function.
var benchSubcommands []func() *cobra.Command

func addBenchCommand(f func() *cobra.Command) { benchSubcommands = append(benchSubcommands, f) }

func init() {
	addCommand(func() *cobra.Command {
		c := &cobra.Command{Use: "bench", Short: "Benchmarks, each measured against a peer in the same run"}
		for _, f := range benchSubcommands {
			c.AddCommand(f())
		}
		return c
	})
}
