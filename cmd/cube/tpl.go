//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"

	"github.com/cubesandbox/cube/internal/config"
	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/hostinfo"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/gvisor"
	"github.com/cubesandbox/cube/internal/template"
)

// tplEnv is what the tpl subcommands share: config, catalog, builder.
type tplEnv struct {
	cfg     config.Config
	catalog *template.FileCatalog
	builder *template.Builder
	rt      runtime.Runtime
}

func (e *tplEnv) close() {
	if e.rt != nil {
		e.rt.Close()
	}
}

// findRunsc: config, then the Makefile's cache, then PATH.
func findRunsc(cfg config.Config) (string, error) {
	if cfg.RunscPath != "" {
		return cfg.RunscPath, nil
	}
	if p := filepath.Join(cfg.CacheDir, "bin", "runsc"); fileExists(p) {
		return p, nil
	}
	if p, err := exec.LookPath("runsc"); err == nil {
		return p, nil
	}
	return "", errs.E(errs.FailedPrecondition, "runsc not found: run `make runsc` or set runscPath")
}

// findAgent: config, then next to this binary, then $CUBE_BIN.
func findAgent(cfg config.Config) string {
	if cfg.AgentPath != "" {
		return cfg.AgentPath
	}
	if exe, err := os.Executable(); err == nil {
		if p := filepath.Join(filepath.Dir(exe), "cube-agent"); fileExists(p) {
			return p
		}
	}
	if b := os.Getenv("CUBE_BIN"); b != "" {
		return filepath.Join(b, "cube-agent")
	}
	return "cube-agent"
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

// newTplEnv opens the catalog and, if withRuntime, the runtime that bakes
// (tplRuntime: the one the server runs).
func newTplEnv(ctx context.Context, withRuntime bool) (*tplEnv, error) {
	cfg, err := loadConfig()
	if err != nil {
		return nil, err
	}
	cat, err := template.NewFileCatalog(filepath.Join(cfg.DataDir, "templates", "catalog"))
	if err != nil {
		return nil, err
	}
	e := &tplEnv{cfg: cfg, catalog: cat}
	e.builder = &template.Builder{
		DataDir: cfg.DataDir, CacheDir: cfg.CacheDir, AgentPath: findAgent(cfg), Mirror: cfg.DebianMirror,
		Catalog: cat, Log: newLogger(cfg),
	}
	if withRuntime {
		rt, err := tplRuntime(ctx, cfg)
		if err != nil {
			return nil, err
		}
		e.rt, e.builder.Runtime = rt, rt
	}
	return e, nil
}

// tplRuntimeName is `cube tpl --runtime` ("" = config runtime).
var tplRuntimeName string

// tplRuntime opens the runtime that bakes: the one `cube server` runs
// (--runtime, else config runtime / CUBE_RUNTIME, auto = by host kind), so
// that the server finds the template baked in its own state under the
// data dir. Templates only: safe beside a running server.
func tplRuntime(ctx context.Context, cfg config.Config) (runtime.Runtime, error) {
	if tplRuntimeName != "" {
		cfg.Runtime = tplRuntimeName
	}
	log := newLogger(cfg)
	switch name := runtimeName(cfg.Runtime, hostinfo.Probe{}.Kind(), log); name {
	case "gvisor":
		runsc, err := findRunsc(cfg)
		if err != nil {
			return nil, err
		}
		return gvisor.New(ctx, gvisor.Options{DataDir: cfg.DataDir, RunscPath: runsc, Logger: log, TemplatesOnly: true})
	case "microvm":
		return newMicroVMBaker(cfg, log)
	default:
		return nil, errs.E(errs.InvalidArgument, "unknown runtime %q (auto, gvisor or microvm)", name)
	}
}

// progress draws a template build on a progress bar (one step per phase).
type progress struct {
	bar  *progressbar.ProgressBar
	last template.Phase
}

func newProgress(w io.Writer, title string) *progress {
	n := len(template.Phases) - 1
	bar := progressbar.NewOptions(n*100,
		progressbar.OptionSetWriter(w),
		progressbar.OptionSetDescription(title),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowElapsedTimeOnFinish(),
		progressbar.OptionSetRenderBlankState(true),
		progressbar.OptionClearOnFinish(),
	)
	return &progress{bar: bar}
}

func (p *progress) update(title string, r template.Record) {
	idx := 0
	for i, ph := range template.Phases {
		if ph == r.Phase {
			idx = i
		}
	}
	v := idx*100 + int(r.Progress*100)
	if r.Phase == template.PhaseReady {
		v = (len(template.Phases) - 1) * 100
	}
	note := r.Note
	if len(note) > 40 {
		note = note[:40]
	}
	p.bar.Describe(fmt.Sprintf("%-18s %-13s %s", title, r.Phase, note))
	p.bar.Set(v)
	p.last = r.Phase
}

func (p *progress) done() { p.bar.Finish() }

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

func printResult(w io.Writer, r template.Record, err error) error {
	if err != nil {
		fmt.Fprintf(w, "%s: FAILED: %s\n", r.ID, r.Reason)
		return err
	}
	fmt.Fprintf(w, "%s: READY (job %s, %d MB rootfs, %s)\n", r.ID, r.JobID, r.SizeBytes>>20, r.Digest[:12])
	return nil
}

func tplCreateBuiltinCmd() *cobra.Command {
	var rootfsOnly, quiet bool
	c := &cobra.Command{
		Use:   "create-builtin NAME...",
		Short: "Build built-in templates (" + strings.Join(template.BuiltinNames(), ", ") + "), cached",
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, cancel := signalContext()
			defer cancel()
			e, err := newTplEnv(ctx, !rootfsOnly)
			if err != nil {
				return err
			}
			defer e.close()
			out := cmd.OutOrStdout()
			for _, name := range args {
				rc, ok := template.Builtin(name)
				if !ok {
					return errs.E(errs.NotFound, "no built-in template %q", name)
				}
				if rootfsOnly {
					last := ""
					p, err := template.BuiltinRootfs(ctx, e.cfg.CacheDir, e.cfg.DebianMirror, rc, func(note string, f float64) {
						// One line per stage, not per package.
						stage, _, _ := strings.Cut(note, " ")
						if !quiet && stage != last {
							last = stage
							fmt.Fprintf(cmd.ErrOrStderr(), "%s: %3.0f%% %s\n", rc.Name, f*100, note)
						}
					})
					if err != nil {
						return err
					}
					fmt.Fprintf(out, "%s: rootfs cached in %s\n", rc.Name, p)
					continue
				}
				var bar *progress
				if !quiet {
					bar = newProgress(cmd.ErrOrStderr(), rc.Name)
					e.builder.OnUpdate = func(r template.Record) { bar.update(rc.Name, r) }
				}
				r, err := e.builder.CreateBuiltin(ctx, rc.Name)
				if bar != nil {
					bar.done()
				}
				if err := printResult(out, r, err); err != nil {
					return err
				}
			}
			return nil
		},
	}
	c.Flags().BoolVar(&rootfsOnly, "rootfs-only", false, "only build the cached root filesystem (no agent, no bake)")
	c.Flags().BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	return c
}

// parseSize parses 512M, 1G, 2048 (MB) into MB.
func parseSize(s string) (int, error) {
	s = strings.TrimSpace(strings.ToUpper(s))
	mult := 1
	switch {
	case strings.HasSuffix(s, "G"), strings.HasSuffix(s, "GB"), strings.HasSuffix(s, "GI"):
		mult, s = 1024, strings.TrimRight(s, "GBI")
	case strings.HasSuffix(s, "M"), strings.HasSuffix(s, "MB"), strings.HasSuffix(s, "MI"):
		s = strings.TrimRight(s, "MBI")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, errs.E(errs.InvalidArgument, "bad size %q (e.g. 512M, 1G)", s)
	}
	return n * mult, nil
}

func tplCreateFromImageCmd() *cobra.Command {
	var (
		image, id, wsize, probePath, user, pass, jobID string
		ports, envs                                    []string
		probe, cpu, mem                                int
		startCmd, readyCmd                             string
		readyTimeout                                   time.Duration
		insecure, detach, quiet                        bool
	)
	c := &cobra.Command{
		Use:   "create-from-image --image REF",
		Short: "Build a template from an OCI image (registry ref, docker save tarball, OCI layout dir)",
		RunE: func(cmd *cobra.Command, args []string) error {
			if image == "" {
				return errs.E(errs.InvalidArgument, "--image is required")
			}
			if id == "" {
				base := image[strings.LastIndexAny(image, "/:")+1:]
				if i := strings.LastIndex(image, ":"); i > strings.LastIndex(image, "/") {
					base = image[strings.LastIndex(image[:i], "/")+1 : i]
				}
				id = strings.ToLower(strings.Trim(strings.Map(func(r rune) rune {
					if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
						return r
					}
					if r >= 'A' && r <= 'Z' {
						return r + 32
					}
					return '-'
				}, base), "-."))
			}
			req := template.ImageRequest{TemplateID: id, Source: template.ImageSource{Ref: image, Username: user, Password: pass, Insecure: insecure},
				ProbePort: probe, ProbePath: probePath, MemoryMB: mem, JobID: jobID}
			if cpu > 0 {
				req.CPUCount = (cpu + 999) / 1000
			}
			if wsize != "" {
				n, err := parseSize(wsize)
				if err != nil {
					return err
				}
				req.DiskMB = n
			}
			for _, p := range ports {
				n, err := strconv.Atoi(p)
				if err != nil || n <= 0 || n > 65535 {
					return errs.E(errs.InvalidArgument, "bad --expose-port %q", p)
				}
				req.ExposePorts = append(req.ExposePorts, n)
			}
			for _, kv := range envs {
				k, v, ok := strings.Cut(kv, "=")
				if !ok || k == "" {
					return errs.E(errs.InvalidArgument, "bad --env %q (K=V)", kv)
				}
				if req.Env == nil {
					req.Env = map[string]string{}
				}
				req.Env[k] = v
			}
			if startCmd != "" {
				req.StartCmd = []string{"/bin/sh", "-c", startCmd}
			}
			if readyTimeout < 0 {
				return errs.E(errs.InvalidArgument, "bad --ready-timeout %s", readyTimeout)
			}
			req.ReadyCmd, req.ReadyTimeout = readyCmd, readyTimeout
			if detach {
				return detachBuild(cmd, req)
			}
			ctx, cancel := signalContext()
			defer cancel()
			e, err := newTplEnv(ctx, true)
			if err != nil {
				return err
			}
			defer e.close()
			var bar *progress
			if !quiet {
				bar = newProgress(cmd.ErrOrStderr(), id)
				e.builder.OnUpdate = func(r template.Record) { bar.update(id, r) }
			}
			r, err := e.builder.CreateFromImage(ctx, req)
			if bar != nil {
				bar.done()
			}
			return printResult(cmd.OutOrStdout(), r, err)
		},
	}
	f := c.Flags()
	f.StringVar(&image, "image", "", "image: registry ref, docker save tarball path, oci-layout:DIR")
	f.StringVar(&id, "template-id", "", "template id (default: from the image name)")
	f.StringVar(&wsize, "writable-layer-size", "1G", "writable layer size")
	f.StringSliceVar(&ports, "expose-port", nil, "port the template serves (repeatable)")
	f.IntVar(&probe, "probe", 0, "probe port (default 49983, the agent)")
	f.StringVar(&probePath, "probe-path", "/health", "probe path")
	f.IntVar(&cpu, "cpu", 2000, "CPU in millicores")
	f.IntVar(&mem, "memory", 512, "memory in MB")
	f.StringArrayVar(&envs, "env", nil, "environment K=V (repeatable)")
	f.StringVar(&startCmd, "cmd", "", "start command (sh -c), started by the agent before the snapshot so that every sandbox has it running (the image's entrypoint/cmd are not run)")
	f.StringVar(&readyCmd, "ready-cmd", "", "ready check (sh -c) run in the sandbox until it exits 0 before the snapshot, e.g. 'wget -q -O /dev/null http://127.0.0.1:8080/' (default: the start command must keep running for 1s)")
	f.DurationVar(&readyTimeout, "ready-timeout", 0, "how long the ready check may take (default 60s)")
	f.StringVar(&user, "username", "", "registry user name")
	f.StringVar(&pass, "password", "", "registry password (or CUBE_REGISTRY_PASSWORD)")
	f.BoolVar(&insecure, "insecure", false, "plain-HTTP registry")
	f.BoolVar(&detach, "detach", false, "run the build in the background and print its job id (follow with `cube tpl watch`)")
	f.BoolVarP(&quiet, "quiet", "q", false, "no progress bar")
	f.StringVar(&jobID, "job-id", "", "job id to use")
	f.MarkHidden("job-id")
	if pass == "" {
		pass = os.Getenv("CUBE_REGISTRY_PASSWORD")
	}
	return c
}

// detachBuild re-runs this command in the background with a fixed job id.
func detachBuild(cmd *cobra.Command, req template.ImageRequest) error {
	cfg, err := loadConfig()
	if err != nil {
		return err
	}
	jobID := fmt.Sprintf("job-%x", time.Now().UnixNano())
	logDir := filepath.Join(cfg.DataDir, "templates", "jobs")
	if err := os.MkdirAll(logDir, 0o755); err != nil {
		return err
	}
	logf, err := os.Create(filepath.Join(logDir, jobID+".log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	var args []string
	for _, a := range os.Args[1:] {
		if a != "--detach" && a != "--detach=true" {
			args = append(args, a)
		}
	}
	args = append(args, "--job-id", jobID, "--quiet")
	exe, _ := os.Executable()
	child := exec.Command(exe, args...)
	child.Stdout, child.Stderr = logf, logf
	child.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := child.Start(); err != nil {
		return err
	}
	child.Process.Release()
	fmt.Fprintf(cmd.OutOrStdout(), "%s\n", jobID)
	return nil
}

func tplWatchCmd() *cobra.Command {
	var jobID string
	c := &cobra.Command{
		Use:   "watch --job-id ID",
		Short: "Follow a template build until it is READY or FAILED",
		RunE: func(cmd *cobra.Command, args []string) error {
			if jobID == "" && len(args) == 1 {
				jobID = args[0]
			}
			if jobID == "" {
				return errs.E(errs.InvalidArgument, "--job-id is required")
			}
			ctx, cancel := signalContext()
			defer cancel()
			e, err := newTplEnv(ctx, false)
			if err != nil {
				return err
			}
			var bar *progress
			deadline := time.Now().Add(10 * time.Second)
			for {
				var rec *template.Record
				all, _ := e.catalog.List(ctx)
				for i := range all {
					if all[i].JobID == jobID {
						rec = &all[i]
					}
				}
				if rec == nil && time.Now().After(deadline) {
					return errs.E(errs.NotFound, "no template build with job id %s", jobID)
				}
				if rec != nil {
					if bar == nil {
						bar = newProgress(cmd.ErrOrStderr(), rec.ID)
					}
					bar.update(rec.ID, *rec)
					if rec.Phase.Done() {
						bar.done()
						if rec.Phase == template.PhaseFailed {
							return printResult(cmd.OutOrStdout(), *rec, errs.E(errs.FailedPrecondition, "template %s failed", rec.ID))
						}
						return printResult(cmd.OutOrStdout(), *rec, nil)
					}
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(200 * time.Millisecond):
				}
			}
		},
	}
	c.Flags().StringVar(&jobID, "job-id", "", "build job id")
	return c
}

func tplListCmd() *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "list",
		Short: "List templates",
		RunE: func(cmd *cobra.Command, args []string) error {
			e, err := newTplEnv(cmd.Context(), false)
			if err != nil {
				return err
			}
			all, err := e.catalog.List(cmd.Context())
			if err != nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(all)
			}
			tw := tabwriter.NewWriter(cmd.OutOrStdout(), 2, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "ID\tPHASE\tSOURCE\tALIASES\tSIZE\tCPU\tMEMORY\tDISK\tUPDATED")
			for _, r := range all {
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%dM\t%d\t%dM\t%dM\t%s\n", r.ID, r.Phase, r.Source, strings.Join(r.Aliases, ","),
					r.SizeBytes>>20, r.CPUCount, r.MemoryMB, r.DiskMB, r.UpdatedAt.Format(time.RFC3339))
			}
			return tw.Flush()
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "JSON output")
	return c
}

func tplInfoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "info ID",
		Short: "Show a template (id or alias) as JSON",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			e, err := newTplEnv(cmd.Context(), false)
			if err != nil {
				return err
			}
			r, err := e.catalog.Resolve(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			enc := json.NewEncoder(cmd.OutOrStdout())
			enc.SetIndent("", "  ")
			return enc.Encode(r)
		},
	}
}

func tplDeleteCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "delete ID",
		Short: "Delete a template (refused while sandboxes use it)",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			e, err := newTplEnv(cmd.Context(), true)
			if err != nil {
				return err
			}
			defer e.close()
			if err := e.builder.Delete(cmd.Context(), args[0]); err != nil {
				return err
			}
			fmt.Fprintf(cmd.OutOrStdout(), "deleted %s\n", args[0])
			return nil
		},
	}
}

func init() {
	addCommand(func() *cobra.Command {
		c := &cobra.Command{Use: "tpl", Short: "Templates: build from OCI images or built-in recipes, list, delete"}
		c.PersistentFlags().StringVar(&tplRuntimeName, "runtime", "", "runtime that bakes (and deletes) templates: auto, gvisor or microvm; use the one `cube server` runs (default: config runtime / CUBE_RUNTIME, auto = microvm on kvm-hardware hosts, else gvisor)")
		c.AddCommand(tplCreateBuiltinCmd(), tplCreateFromImageCmd(), tplWatchCmd(), tplListCmd(), tplInfoCmd(), tplDeleteCmd())
		return c
	})
}
