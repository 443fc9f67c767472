//go:build linux

// Command cube-vmm is the VMM-only executable: the body of
// `cube vmm-restore` (package vmmrestore) without the rest of cube. A
// jailed `cube vmm-restore --jail` launcher executes it as the VMM when
// it sits beside `cube` (make build-vmm; `make run` and `make test` build
// it): it links only the VMM packages, so each sandbox's VMM carries
// about 2 MiB less private memory than a `cube` process would (the
// server's packages allocate their init-time state in every process that
// links them). Usage: cube-vmm [vmm-restore] FLAGS (the flags of
// `cube vmm-restore` without --jail).
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/cubesandbox/cube/internal/vmm/vmmrestore"
)

func main() {
	args := os.Args[1:]
	if len(args) > 0 && args[0] == "vmm-restore" {
		args = args[1:]
	}
	fs := flag.NewFlagSet("cube-vmm", flag.ContinueOnError)
	var fl vmmrestore.Flags
	fl.Register(fs)
	if err := fs.Parse(args); err != nil {
		os.Exit(2)
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "cube-vmm: unexpected arguments %q\n", fs.Args())
		os.Exit(2)
	}
	if err := vmmrestore.Run(fl); err != nil {
		fmt.Fprintf(os.Stderr, "cube-vmm: %v\n", err)
		os.Exit(1)
	}
}
