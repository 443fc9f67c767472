package vmtest

import (
	"fmt"
	"strings"
)

// Machine describes one run of the emulated L1 machine.
type Machine struct {
	QEMU    string // qemu-system-x86_64
	Kernel  string // L1 kernel (Debian generic vmlinuz)
	Initrd  string // L1 initramfs (uncompressed newc cpio)
	MemMiB  int    // L1 RAM; the guests and the tmpfs root live in it
	TSCkHz  int    // host TSC rate, for tsc_early_khz=
	Run     string // -test.run pattern for the guest-side tests ("" = all)
	Verbose bool   // show the L1 kernel's log on the console
	// Monitor, if set, is a unix socket path for QEMU's human monitor, so
	// a stalled machine's vCPU state can be read.
	Monitor string
	// Skip is a -test.skip pattern for the guest-side tests.
	Skip string
	// Append is extra L1 kernel command line (space-separated words).
	Append string
}

// Args returns the QEMU command line: TCG (the host /dev/kvm is not used),
// microvm, `-cpu max` (reports AuthenticAMD with SVM and NPT, which
// kvm_amd needs), one vCPU (two are slower on a 2-core host), reboot=t plus
// -no-reboot so that the L1 /init's reboot ends QEMU.
func (m Machine) Args() []string {
	mem := m.MemMiB
	if mem == 0 {
		mem = 2560
	}
	cmdline := []string{"console=ttyS0", "reboot=t", "panic=-1",
		fmt.Sprintf("tsc_early_khz=%d", m.TSCkHz), "tsc=reliable"}
	if m.Verbose {
		cmdline = append(cmdline, "loglevel=7")
	} else {
		cmdline = append(cmdline, "loglevel=3")
	}
	cmdline = append(cmdline, strings.Fields(m.Append)...)
	if m.Run != "" {
		cmdline = append(cmdline, "cube.run="+m.Run)
	}
	if m.Skip != "" {
		cmdline = append(cmdline, "cube.skip="+m.Skip)
	}
	args := []string{m.QEMU,
		"-accel", "tcg", "-M", "microvm", "-cpu", "max", "-smp", "1",
		"-m", fmt.Sprint(mem),
		"-nographic", "-no-reboot", "-nodefaults", "-serial", "stdio",
		"-kernel", m.Kernel, "-initrd", m.Initrd,
		"-append", strings.Join(cmdline, " "),
	}
	if m.Monitor != "" {
		args = append(args, "-monitor", "unix:"+m.Monitor+",server=on,wait=off")
	}
	return args
}

// ValidRun reports whether a -test.run pattern can travel on the kernel
// command line as one word: printable ASCII without spaces or quotes (the
// L1 /init takes it from /proc/cmdline without further expansion).
func ValidRun(s string) bool {
	if len(s) > 200 {
		return false
	}
	for _, c := range s {
		if c <= ' ' || c > '~' || c == '"' || c == '\'' {
			return false
		}
	}
	return true
}
