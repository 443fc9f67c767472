//go:build !vmtest

package vmtest

import (
	"strings"
	"testing"
)

const goodConsole = `Probing EDD (edd=off to disable)... ok
@@cube-vmtest l1-up uptime=3.26
@@cube-vmtest module irqbypass ok
@@cube-vmtest module kvm ok
@@cube-vmtest module kvm-amd ok
@@cube-vmtest begin
=== RUN   TestKVMSmoke
--- PASS: TestKVMSmoke (0.38s)
=== RUN   TestLinuxBoot
[    9.1] kvm: vcpu0 Unhandled WRMSR(0xc0010007) = 0xffff
--- SKIP: TestLinuxBoot (0.00s)
=== RUN   TestPackagesOnRealKVM
    pkgs_guest_test.go:40:   | --- FAIL: TestInner (0.00s)
--- PASS: TestPackagesOnRealKVM (1.00s)
=== RUN   TestAgent
    --- PASS: TestAgent/exec (1.00s)
--- PASS: TestAgent (2.00s)
PASS
@@cube-vmtest exit rc=0
[    4.358939] reboot: Restarting system
`

func feed(s string) *Report {
	var r Report
	for _, l := range strings.Split(s, "\n") {
		r.Feed(l)
	}
	return &r
}

func TestReportPass(t *testing.T) {
	r := feed(goodConsole)
	if err := r.Err(); err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(r.Modules, ","); got != "irqbypass,kvm,kvm-amd" {
		t.Errorf("modules %s", got)
	}
	if got := strings.Join(r.Passed, ","); got != "TestKVMSmoke,TestPackagesOnRealKVM,TestAgent/exec,TestAgent" {
		t.Errorf("passed %s", got)
	}
	if got := strings.Join(r.Skipped, ","); got != "TestLinuxBoot" {
		t.Errorf("skipped %s", got)
	}
	if !r.Done || r.Exit != 0 {
		t.Errorf("done=%v exit=%d", r.Done, r.Exit)
	}
}

func TestReportFailures(t *testing.T) {
	cases := map[string]struct{ console, want string }{
		"no init":      {"Probing EDD\nKernel panic", "never reached"},
		"module":       {"@@cube-vmtest l1-up\n@@cube-vmtest module kvm-amd fail\n@@cube-vmtest exit rc=98", "module kvm-amd"},
		"not started":  {"@@cube-vmtest l1-up\n@@cube-vmtest module kvm ok", "never started"},
		"hung":         {"@@cube-vmtest l1-up\n@@cube-vmtest begin\n=== RUN   TestKVMSmoke", "did not finish"},
		"test failed":  {"@@cube-vmtest l1-up\n@@cube-vmtest begin\n--- FAIL: TestKVMSmoke (1s)\nFAIL\n@@cube-vmtest exit rc=1", "TestKVMSmoke"},
		"exit status":  {"@@cube-vmtest l1-up\n@@cube-vmtest begin\npanic: boom\n@@cube-vmtest exit rc=2", "status 2"},
		"none passed":  {"@@cube-vmtest l1-up\n@@cube-vmtest begin\n--- SKIP: TestX (0s)\n@@cube-vmtest exit rc=0", "no guest-side test passed"},
		"bad exit":     {"@@cube-vmtest l1-up\n@@cube-vmtest begin\n--- PASS: TestX (0s)\n@@cube-vmtest exit rc=x", "did not finish"},
		"before begin": {"@@cube-vmtest l1-up\n--- PASS: TestX (0s)\n@@cube-vmtest begin\n@@cube-vmtest exit rc=0", "no guest-side test passed"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			err := feed(c.console).Err()
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Err() = %v, want it to mention %q", err, c.want)
			}
		})
	}
}

// Lines after the exit marker (a second exit, late results) change nothing.
func TestReportAfterExit(t *testing.T) {
	r := feed(goodConsole + "@@cube-vmtest exit rc=3\n--- FAIL: TestLate (0s)\n")
	if err := r.Err(); err != nil || r.Exit != 0 {
		t.Fatalf("err %v exit %d", err, r.Exit)
	}
}

func TestReportBounded(t *testing.T) {
	var r Report
	r.Feed("@@cube-vmtest begin")
	for i := 0; i < 3*maxNames; i++ {
		r.Feed("--- PASS: TestX (0s)")
	}
	if len(r.Passed) != maxNames {
		t.Fatalf("kept %d names, want %d", len(r.Passed), maxNames)
	}
}

// FuzzReport: console text is untrusted; Feed must never panic and a run
// without the markers must never count as a pass.
func FuzzReport(f *testing.F) {
	f.Add(goodConsole)
	f.Add("@@cube-vmtest exit rc=-1\n@@cube-vmtest module\n--- PASS: \n")
	f.Add("@@cube-vmtest l1-up\r\n@@cube-vmtest begin\r\n--- PASS: T (0s)\r\n@@cube-vmtest exit rc=0\r\n")
	f.Fuzz(func(t *testing.T, s string) {
		r := feed(s)
		if r.Err() == nil && (!r.L1Up || !r.Done || r.Exit != 0 || len(r.Passed) == 0) {
			t.Fatalf("passed without the markers: %+v", r)
		}
		_ = r.Summary()
	})
}

func TestParseMHz(t *testing.T) {
	for in, want := range map[string]int{
		"2596.136 MHz processor": 2596136,
		"2300 MHz":               2300000,
		"2300.5 MHz":             2300500,
		"2300.12345 MHz":         2300123,
		"2300.000":               0,
		"abc MHz":                0,
		"-5 MHz":                 0,
		"2300.-5 MHz":            0,
		"":                       0,
		"999999999 MHz":          0,
	} {
		if got := parseMHz(in); got != want {
			t.Errorf("parseMHz(%q) = %d, want %d", in, got, want)
		}
	}
}

func TestTSCSources(t *testing.T) {
	kmsg := "6,1,0,-;tsc: Detected 2596.136 MHz processor\n6,2,0,-;foo\n6,3,0,-;tsc: Refined TSC clocksource calibration: 2596.101 MHz\n"
	if got := tscFromKmsg(strings.NewReader(kmsg)); got != 2596101 {
		t.Errorf("kmsg refined: %d", got)
	}
	if got := tscFromKmsg(strings.NewReader(kmsg[:60])); got != 2596136 {
		t.Errorf("kmsg detected: %d", got)
	}
	if got := tscFromKmsg(eofReader{}); got != 0 {
		t.Errorf("empty kmsg: %d", got)
	}
	if got := tscFromCpuinfo("processor\t: 0\nmodel name\t: AMD EPYC\ncpu MHz\t\t: 2596.136\n"); got != 2596136 {
		t.Errorf("cpuinfo: %d", got)
	}
	if khz, err := HostTSCkHz(); err != nil || khz <= 0 {
		t.Errorf("HostTSCkHz on this host: %d, %v", khz, err)
	}
}

func TestMachineArgs(t *testing.T) {
	a := strings.Join(Machine{QEMU: "q", Kernel: "k", Initrd: "i", TSCkHz: 2300000, Run: "TestKVMSmoke"}.Args(), " ")
	for _, want := range []string{"-accel tcg", "-M microvm", "-cpu max", "-smp 1", "-no-reboot", "-kernel k", "-initrd i",
		"tsc_early_khz=2300000 tsc=reliable", "reboot=t", "cube.run=TestKVMSmoke"} {
		if !strings.Contains(a, want) {
			t.Errorf("args %q lack %q", a, want)
		}
	}
	for s, ok := range map[string]bool{"": true, "TestKVMSmoke": true, "^TestLinux(Boot|Agent)$/exec": true,
		"a b": false, "$(reboot)": true, "a\tb": false, "x\"y": false, "x'y": false, strings.Repeat("a", 201): false, "é": false} {
		if ValidRun(s) != ok {
			t.Errorf("ValidRun(%q) = %v", s, !ok)
		}
	}
}

func TestWedgeSignature(t *testing.T) {
	// Trimmed from a real stalled run (QEMU 7.2 monitor).
	wedge := "RIP=ffffffffb86592eb RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n" +
		"(qemu) info lapic\ndumping local APIC state for CPU 0 \n\n" +
		"LVTT\t 0x000000ec active-hi edge                 one-shot     Fixed  (vec 236)\n" +
		"ISR\t (none)\nIRR\t 236 \n\nAPR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x10\n" +
		"ioapic0: ver=0x20\n  IRR      (none)\n"
	if !wedgeSignature(wedge) {
		t.Error("the wedge dump is not recognised")
	}
	// The same wedge while the vCPU runs an L2 guest's loop at CPL 3.
	if !wedgeSignature(strings.Replace(strings.Replace(wedge, "HLT=1", "HLT=0", 1), "CPL=0", "CPL=3", 1)) {
		t.Error("the wedge in guest mode is not recognised")
	}
	for name, dump := range map[string]string{
		"idle":        strings.Replace(wedge, "IRR\t 236 ", "IRR\t (none)", 1),
		"no lapic":    "RIP=0 HLT=1\n",
		"empty":       "",
		"garbage irr": "HLT=1 dumping local APIC state\nIRR",
		"ioapic irr":  "HLT=1\nioapic0: ver=0x20\n  IRR      17\n",
	} {
		if wedgeSignature(dump) {
			t.Errorf("%s: recognised as the wedge", name)
		}
	}
	if p := skipPattern([]string{"TestA", "TestB"}); p != "^(TestA|TestB)$" || !ValidRun(p) {
		t.Errorf("skipPattern = %q", p)
	}
	if skipPattern(nil) != "" {
		t.Error("skipPattern(nil) not empty")
	}
	a := strings.Join(Machine{QEMU: "q", Skip: "^(TestA)$"}.Args(), " ")
	if !strings.Contains(a, "cube.skip=^(TestA)$") {
		t.Errorf("args %q lack the skip pattern", a)
	}
}
