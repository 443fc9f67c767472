// Package vmtest runs Cube's real-KVM tests inside an emulated machine.
//
// The host's /dev/kvm may be KVM-PVM, on which no stock Linux guest boots.
// QEMU's TCG emulates AMD SVM with nested paging well enough that Debian's
// stock kvm_amd loads inside an emulated machine ("L1"), giving a real
// /dev/kvm there. `make vmtest` builds an L1 image (Debian's generic kernel,
// an initramfs with the kvm modules, a static `cube`, the guest kernel, a
// guest root disk and this package's test binary built with the `vmtest`
// tag), boots it under `qemu-system-x86_64 -accel tcg`, and the host-side
// test (TestEmulatedMachine) reads the L1 serial console, where the L1 /init
// runs the guest-side tests and prints them between markers.
//
// This file holds the host side's pieces that do not need QEMU: the marker
// protocol and its parser (Report), and the host TSC frequency lookup.
// See docs/vmtest.md.
package vmtest

import (
	"fmt"
	"strconv"
	"strings"
)

// Marker starts every line the L1 /init prints for the host harness.
// The lines are:
//
//	@@cube-vmtest l1-up uptime=<seconds>
//	@@cube-vmtest module <name> ok|fail
//	@@cube-vmtest begin
//	... `go test -test.v` output of the guest-side tests ...
//	@@cube-vmtest exit rc=<exit status of the test binary>
const Marker = "@@cube-vmtest "

// Report accumulates what the L1 console said. Feed it every console line.
// The zero value is ready; console text is untrusted input (a guest, kernel
// noise interleaved on the line), so Feed never fails: it only records.
type Report struct {
	L1Up    bool
	Modules []string // modules loaded, in order
	Failed  []string // modules that did not load; tests that failed
	Begun   bool
	Passed  []string // passed tests (subtests as Parent/Child)
	Skipped []string
	Exit    int  // exit status of the test binary, valid when Done
	Done    bool // the exit marker was seen
}

// maxNames bounds the names a Report keeps, so a console that floods
// markers cannot grow it without bound.
const maxNames = 4096

func addName(list []string, s string) []string {
	if len(list) >= maxNames {
		return list
	}
	return append(list, s)
}

// Feed records one console line (without its newline).
func (r *Report) Feed(line string) {
	line = strings.TrimRight(line, "\r")
	if i := strings.Index(line, Marker); i >= 0 {
		r.marker(strings.Fields(line[i+len(Marker):]))
		return
	}
	if !r.Begun || r.Done {
		return
	}
	// go test -test.v result lines, indented for subtests. A result line
	// quoted inside a test's log output ("file.go:12: --- PASS: ...") is
	// not one.
	trimmed := strings.TrimLeft(line, " \t")
	for _, kind := range []string{"--- PASS: ", "--- FAIL: ", "--- SKIP: "} {
		if !strings.HasPrefix(trimmed, kind) {
			continue
		}
		f := strings.Fields(trimmed[len(kind):])
		if len(f) == 0 {
			return
		}
		switch kind {
		case "--- PASS: ":
			r.Passed = addName(r.Passed, f[0])
		case "--- FAIL: ":
			r.Failed = addName(r.Failed, f[0])
		default:
			r.Skipped = addName(r.Skipped, f[0])
		}
		return
	}
}

func (r *Report) marker(f []string) {
	if len(f) == 0 {
		return
	}
	switch f[0] {
	case "l1-up":
		r.L1Up = true
	case "module":
		if len(f) >= 3 {
			if f[2] == "ok" {
				r.Modules = addName(r.Modules, f[1])
			} else {
				r.Failed = addName(r.Failed, "module "+f[1])
			}
		}
	case "begin":
		r.Begun = true
	case "exit":
		if r.Done || len(f) < 2 || !strings.HasPrefix(f[1], "rc=") {
			return
		}
		rc, err := strconv.Atoi(strings.TrimPrefix(f[1], "rc="))
		if err != nil {
			return
		}
		r.Exit, r.Done = rc, true
	}
}

// Err says why the run failed, or nil if every step passed.
func (r *Report) Err() error {
	switch {
	case !r.L1Up:
		return fmt.Errorf("the emulated machine never reached its /init")
	case len(r.Failed) > 0:
		return fmt.Errorf("failed: %s", strings.Join(r.Failed, ", "))
	case !r.Begun:
		return fmt.Errorf("the guest-side tests never started")
	case !r.Done:
		return fmt.Errorf("the guest-side tests did not finish (no exit marker)")
	case r.Exit != 0:
		return fmt.Errorf("the guest-side test binary exited with status %d", r.Exit)
	case len(r.Passed) == 0:
		return fmt.Errorf("no guest-side test passed")
	}
	return nil
}

// Summary is a one-line account of the run.
func (r *Report) Summary() string {
	return fmt.Sprintf("modules %d loaded; tests %d passed, %d failed, %d skipped; done=%v exit=%d",
		len(r.Modules), len(r.Passed), len(r.Failed), len(r.Skipped), r.Done, r.Exit)
}
