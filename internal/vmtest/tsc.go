package vmtest

import (
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
)

// HostTSCkHz returns the host's TSC frequency in kHz. The L1 machine needs it
// (tsc_early_khz=) because under TCG on microvm, with no HPET or PM timer,
// the Debian kernel often fails to calibrate the TSC and hangs; TCG's guest
// TSC runs at the host rate. Sources, best first: the kernel log's
// calibration line (/dev/kmsg), sysfs tsc_freq_khz where a kernel has it,
// then /proc/cpuinfo's "cpu MHz".
func HostTSCkHz() (int, error) {
	if khz := tscFromKmsg(kmsgReader()); khz > 0 {
		return khz, nil
	}
	if b, err := os.ReadFile("/sys/devices/system/cpu/cpu0/tsc_freq_khz"); err == nil {
		if khz, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && khz > 0 {
			return khz, nil
		}
	}
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return 0, err
	}
	if khz := tscFromCpuinfo(string(b)); khz > 0 {
		return khz, nil
	}
	return 0, fmt.Errorf("host TSC frequency: not found in /dev/kmsg, sysfs or /proc/cpuinfo")
}

// tscFromKmsg scans kernel log records for "tsc: Refined TSC clocksource
// calibration: X MHz" (preferred) or "tsc: Detected X MHz processor".
// Reading stops at the end of the buffer (EAGAIN on a non-blocking fd).
func tscFromKmsg(r io.Reader) int {
	// /dev/kmsg returns one whole record per read, so read into a fresh
	// full-size buffer each time; keep at most 4 MiB.
	var all strings.Builder
	buf := make([]byte, 8192)
	for all.Len() < 4<<20 {
		n, err := r.Read(buf)
		all.Write(buf[:n])
		if err != nil {
			break
		}
	}
	detected, refined := 0, 0
	for _, line := range strings.Split(all.String(), "\n") {
		if i := strings.Index(line, "Refined TSC clocksource calibration: "); i >= 0 {
			refined = parseMHz(line[i+len("Refined TSC clocksource calibration: "):])
		} else if i := strings.Index(line, "tsc: Detected "); i >= 0 {
			detected = parseMHz(line[i+len("tsc: Detected "):])
		}
	}
	if refined > 0 {
		return refined
	}
	return detected
}

// tscFromCpuinfo reads the first "cpu MHz" line.
func tscFromCpuinfo(s string) int {
	for _, line := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			return parseMHz(strings.TrimSpace(v) + " MHz")
		}
	}
	return 0
}

// parseMHz turns "2596.136 MHz..." into 2596136 (kHz); 0 if malformed.
func parseMHz(s string) int {
	f := strings.Fields(s)
	if len(f) < 2 || f[1] != "MHz" {
		return 0
	}
	whole, frac, _ := strings.Cut(f[0], ".")
	w, err := strconv.Atoi(whole)
	if err != nil || w <= 0 || w > 100000 {
		return 0
	}
	frac = (frac + "000")[:3]
	fr, err := strconv.Atoi(frac)
	if err != nil || fr < 0 {
		return 0
	}
	return w*1000 + fr
}
