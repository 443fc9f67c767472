package template

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/cubesandbox/cube/internal/errs"
)

// Recipe is a built-in template made from Debian packages.
type Recipe struct {
	Name     string
	Aliases  []string
	Suite    string
	Packages []string // --include for debootstrap --variant=minbase
	// From, if set, names the recipe whose root filesystem this one starts
	// from; AptPackages are then installed with apt-get in a chroot (apt
	// resolves dependencies that debootstrap's --include does not).
	From        string
	AptPackages []string
	// ExtraProbes are ports besides envd's that must answer /health.
	ExtraProbes []int
	MemoryMB    int
	DiskMB      int
}

// Built-in recipes.
var builtins = map[string]Recipe{
	"base": {
		Name: "base", Suite: "bookworm",
		Packages: []string{"bash", "ca-certificates", "procps", "python3", "sudo"},
		MemoryMB: 512, DiskMB: 1024,
	},
	"code-interpreter": {
		Name: "code-interpreter", Aliases: []string{"code-interpreter-v1"}, Suite: "bookworm", From: "base",
		AptPackages: []string{"python3-ipykernel", "python3-jupyter-client", "python3-numpy", "python3-pandas", "python3-matplotlib"},
		ExtraProbes: []int{49999},
		MemoryMB:    1024, DiskMB: 2048,
	},
}

// Builtin returns the recipe called name (or one of its aliases).
func Builtin(name string) (Recipe, bool) {
	for _, r := range builtins {
		if r.Name == name {
			return r, true
		}
		for _, a := range r.Aliases {
			if a == name {
				return r, true
			}
		}
	}
	return Recipe{}, false
}

// BuiltinNames lists the built-in recipes.
func BuiltinNames() []string { return []string{"base", "code-interpreter"} }

// Hash is the recipe's cache key: everything that changes its output.
func (r Recipe) Hash(mirror string) string {
	h := sha256.New()
	fmt.Fprintf(h, "cube-recipe-v1\n%s\n%s\n%s\n%s\n", r.Name, r.Suite, mirror, strings.Join(r.Packages, ","))
	if p, ok := builtins[r.From]; ok {
		fmt.Fprintf(h, "from %s\napt %s\n", p.Hash(mirror), strings.Join(r.AptPackages, ","))
	}
	return hex.EncodeToString(h.Sum(nil))[:16]
}

// DebianMirror returns the machine's configured Debian mirror for suite:
// the first URI of /etc/apt/sources.list(.d) that serves it.
func DebianMirror(suite string) (string, error) {
	files := []string{"/etc/apt/sources.list"}
	more, _ := filepath.Glob("/etc/apt/sources.list.d/*")
	files = append(files, more...)
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		if m := mirrorIn(string(b), suite, strings.HasSuffix(f, ".sources")); m != "" {
			return m, nil
		}
	}
	return "", errs.E(errs.FailedPrecondition, "no Debian mirror for %s in /etc/apt/sources.list*; set debianMirror in the config", suite)
}

// mirrorIn parses one-line (.list) or deb822 (.sources) apt sources.
func mirrorIn(text, suite string, deb822 bool) string {
	if !deb822 {
		for _, l := range strings.Split(text, "\n") {
			f := strings.Fields(l)
			if len(f) >= 3 && f[0] == "deb" {
				i := 1
				for i < len(f) && strings.HasPrefix(f[i], "[") { // options
					for i < len(f) && !strings.HasSuffix(f[i], "]") {
						i++
					}
					i++
				}
				if i+1 < len(f) && f[i+1] == suite {
					return f[i]
				}
			}
		}
		return ""
	}
	for _, stanza := range strings.Split(text, "\n\n") {
		var uris, suites []string
		isDeb := false
		for _, l := range strings.Split(stanza, "\n") {
			k, v, ok := strings.Cut(l, ":")
			if !ok || strings.HasPrefix(l, "#") {
				continue
			}
			switch strings.ToLower(strings.TrimSpace(k)) {
			case "types":
				isDeb = strings.Contains(" "+v+" ", " deb ")
			case "uris":
				uris = strings.Fields(v)
			case "suites":
				suites = strings.Fields(v)
			}
		}
		for _, s := range suites {
			if isDeb && s == suite && len(uris) > 0 {
				return uris[0]
			}
		}
	}
	return ""
}

// BuiltinRootfs returns the cached debootstrap output of recipe r, building
// it if needed (about a minute for base). progress gets debootstrap's
// stage ("Retrieving", "Extracting", ...) and a rough fraction.
func BuiltinRootfs(ctx context.Context, cacheDir, mirror string, r Recipe, progress func(note string, frac float64)) (string, error) {
	if mirror == "" {
		var err error
		if mirror, err = DebianMirror(r.Suite); err != nil {
			return "", err
		}
	}
	if progress == nil {
		progress = func(string, float64) {}
	}
	root := filepath.Join(cacheDir, "rootfs")
	dst := filepath.Join(root, r.Name+"-"+r.Hash(mirror))
	if _, err := os.Stat(dst + ".done"); err == nil {
		return dst, nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return "", errs.Wrap(errs.Internal, err, "cache dir")
	}
	// One builder per recipe at a time, across processes.
	lock, err := os.OpenFile(dst+".lock", os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return "", errs.Wrap(errs.Internal, err, "cache lock")
	}
	defer lock.Close()
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX); err != nil {
		return "", errs.Wrap(errs.Internal, err, "cache lock")
	}
	if _, err := os.Stat(dst + ".done"); err == nil {
		return dst, nil
	}
	if _, err := exec.LookPath("debootstrap"); err != nil {
		return "", errs.E(errs.FailedPrecondition, "debootstrap is not installed (make deps)")
	}
	tmp := dst + ".tmp"
	os.RemoveAll(tmp)
	os.RemoveAll(dst)
	if parent, ok := builtins[r.From]; ok {
		if err := buildFrom(ctx, cacheDir, mirror, parent, r, tmp, progress); err != nil {
			os.RemoveAll(tmp)
			return "", err
		}
		return finishCache(tmp, dst, mirror)
	}
	args := []string{"--variant=minbase", "--include=" + strings.Join(r.Packages, ","), r.Suite, tmp, mirror}
	cmd := exec.CommandContext(ctx, "debootstrap", args...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	var tail []string
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		stages := map[string]float64{"Retrieving": 0.1, "Validating": 0.3, "Extracting": 0.4, "Installing": 0.5, "Unpacking": 0.6, "Configuring": 0.8, "Base system installed": 1}
		for sc.Scan() {
			l := sc.Text()
			tail = append(tail, l)
			if len(tail) > 8 {
				tail = tail[1:]
			}
			if s, ok := strings.CutPrefix(l, "I: "); ok {
				for k, f := range stages {
					if strings.HasPrefix(s, k) {
						progress(s, f)
					}
				}
			}
		}
	}()
	err = cmd.Run()
	pw.Close()
	<-done
	if err != nil {
		os.RemoveAll(tmp)
		return "", errs.Wrap(errs.Unavailable, err, "debootstrap %s: %s", r.Name, strings.Join(tail, " | "))
	}
	return finishCache(tmp, dst, mirror)
}

// finishCache trims a built root filesystem and moves it into place.
func finishCache(tmp, dst, mirror string) (string, error) {
	for _, p := range []string{"var/cache/apt/archives", "var/lib/apt/lists"} {
		ents, _ := os.ReadDir(filepath.Join(tmp, p))
		for _, e := range ents {
			if e.Type().IsRegular() || e.IsDir() && e.Name() != "partial" {
				os.RemoveAll(filepath.Join(tmp, p, e.Name()))
			}
		}
	}
	if err := os.Rename(tmp, dst); err != nil {
		return "", errs.Wrap(errs.Internal, err, "cache")
	}
	if err := os.WriteFile(dst+".done", []byte(mirror+"\n"), 0o644); err != nil {
		return "", errs.Wrap(errs.Internal, err, "cache")
	}
	return dst, nil
}

// buildFrom makes r's root filesystem in tmp: a copy of parent's, plus
// r.AptPackages installed by apt-get in a chroot (the host's DNS config
// copied in for the duration; no daemons started).
func buildFrom(ctx context.Context, cacheDir, mirror string, parent, r Recipe, tmp string, progress func(string, float64)) error {
	pdir, err := BuiltinRootfs(ctx, cacheDir, mirror, parent, func(note string, f float64) { progress(parent.Name+": "+note, f*0.3) })
	if err != nil {
		return err
	}
	progress("copying "+parent.Name, 0.3)
	if out, err := exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", pdir, tmp).CombinedOutput(); err != nil {
		return errs.Wrap(errs.Internal, err, "copy %s: %s", parent.Name, strings.TrimSpace(string(out)))
	}
	resolv, _ := os.ReadFile("/etc/resolv.conf")
	os.Remove(filepath.Join(tmp, "etc/resolv.conf"))
	if err := os.WriteFile(filepath.Join(tmp, "etc/resolv.conf"), resolv, 0o644); err != nil {
		return errs.Wrap(errs.Internal, err, "resolv.conf")
	}
	defer os.Remove(filepath.Join(tmp, "etc/resolv.conf"))
	policy := filepath.Join(tmp, "usr/sbin/policy-rc.d")
	os.WriteFile(policy, []byte("#!/bin/sh\nexit 101\n"), 0o755)
	defer os.Remove(policy)
	run := func(note string, frac float64, args ...string) error {
		progress(note, frac)
		cmd := exec.CommandContext(ctx, "chroot", append([]string{tmp}, args...)...)
		cmd.Env = []string{"DEBIAN_FRONTEND=noninteractive", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL=C"}
		out, err := cmd.CombinedOutput()
		if err != nil {
			return errs.Wrap(errs.Unavailable, err, "%s: %s", strings.Join(args, " "), lastLine(string(out)))
		}
		return nil
	}
	if err := run("apt-get update", 0.4, "apt-get", "update", "-qq"); err != nil {
		return err
	}
	if err := run("apt-get install "+strings.Join(r.AptPackages, " "), 0.5,
		append([]string{"apt-get", "install", "-y", "-qq", "--no-install-recommends"}, r.AptPackages...)...); err != nil {
		return err
	}
	return run("apt-get clean", 0.95, "apt-get", "clean")
}

func lastLine(s string) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	if len(l) > 3 {
		l = l[len(l)-3:]
	}
	return strings.Join(l, " | ")
}
