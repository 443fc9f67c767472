//go:build linux

// Package gvisor is the runtime for hosts without hardware virtualization:
// one runsc (gVisor) sandbox per Cube sandbox.
//
// A template is baked by booting its root filesystem with cube-agent as
// init (`runsc run`), probing the agent and checkpointing it (`runsc
// checkpoint`). A sandbox is a `runsc restore` of that image: the template's
// root directory is the read-only lower layer and writes go to an in-sandbox
// memory overlay capped at the template's writable-layer size
// (--overlay2=root:memory,size=N). Memory and CPU limits are cgroup v1
// limits that runsc applies from the OCI spec. Each sandbox gets its own
// network namespace (or joins the NetSlot's); Dial opens sockets from
// inside it. Pause is checkpoint + exit, Resume a restore, Snapshot a
// checkpoint that leaves the sandbox running. State lives in
// <data>/gvisor so that a restarted process re-adopts its sandboxes.
package gvisor

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/readycheck"
)

// Options configure the runtime.
type Options struct {
	DataDir   string // state lives in DataDir/gvisor
	RunscPath string // runsc binary (static build)
	Platform  string // systrap (default) or ptrace
	PoolSize  int    // warm sandboxes kept per template (0: none)
	Logger    *slog.Logger
	// TemplatesOnly opens the state for baking and deleting templates
	// beside a running server (the CLI): no re-adoption, no orphan
	// cleanup, no pool.
	TemplatesOnly bool
	// Slots, if set, gives sandboxes real networking (internal/network):
	// creates without a NetSlot (and warm-pool sandboxes) acquire one,
	// destroy and pause release it, and Dial goes through it.
	Slots SlotProvider
}

// SlotProvider hands out network slots (network.Manager satisfies it).
type SlotProvider interface {
	Acquire(ctx context.Context) (runtime.NetSlot, error)
	Release(ctx context.Context, slotID string) error
	// Dial connects to GuestIP:port of the slot's guest.
	Dial(ctx context.Context, slotID string, port int) (net.Conn, error)
}

// Defaults used when a template does not say.
const (
	DefaultDiskMB   = 1024
	DefaultMemoryMB = 512
	DefaultCPUs     = 1
	bakeTimeout     = 90 * time.Second
)

var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$`)

// Runtime is the gVisor runtime. It implements runtime.Runtime.
type Runtime struct {
	opts  Options
	dir   string
	runsc *runsc
	log   *slog.Logger

	mu        sync.Mutex
	sandboxes map[string]*sandbox
	pool      *pool
}

var _ runtime.Runtime = (*Runtime)(nil)

// source is what a sandbox is restored from: a template or a snapshot.
type source struct {
	TemplateID string            `json:"templateId"`
	Image      string            `json:"image"` // checkpoint image dir
	Bundle     bundleParams      `json:"bundle"`
	DiskMB     int               `json:"diskMB"`
	Resources  runtime.Resources `json:"resources"`
}

type templateMeta struct {
	ID      string    `json:"id"`
	BakedAt time.Time `json:"bakedAt"`
	source
}

type snapshotMeta struct {
	ID        string    `json:"id"`
	SandboxID string    `json:"sandboxId"`
	CreatedAt time.Time `json:"createdAt"`
	source
}

// sandboxMeta is a sandbox's state on disk (dir/sandboxes/<id>/meta.json).
type sandboxMeta struct {
	ID        string            `json:"id"`
	CID       string            `json:"cid"` // runsc container id
	State     runtime.State     `json:"state"`
	StartedAt time.Time         `json:"startedAt"`
	Net       runtime.NetSlot   `json:"net"`
	OwnNetns  string            `json:"ownNetns,omitempty"` // netns we created
	OwnSlot   bool              `json:"ownSlot,omitempty"`  // slot we acquired (released with the sandbox)
	Resources runtime.Resources `json:"resources"`
	Labels    map[string]string `json:"labels,omitempty"`
	Source    source            `json:"source"`
}

type sandbox struct {
	mu   sync.Mutex // serialises operations on this sandbox
	meta sandboxMeta
	dir  string
	gone bool

	lastCPU   uint64
	lastCPUAt time.Time
}

// New opens (or creates) the runtime's state in opts.DataDir/gvisor,
// re-adopts sandboxes that are still running or paused and removes what a
// crash left behind.
func New(ctx context.Context, opts Options) (*Runtime, error) {
	if opts.RunscPath == "" {
		return nil, errs.E(errs.FailedPrecondition, "gvisor: no runsc binary configured")
	}
	if _, err := os.Stat(opts.RunscPath); err != nil {
		return nil, errs.Wrap(errs.FailedPrecondition, err, "gvisor: runsc not found at %s", opts.RunscPath)
	}
	if opts.Platform == "" {
		opts.Platform = "systrap"
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	dir := filepath.Join(opts.DataDir, "gvisor")
	for _, d := range []string{"run", "templates", "sandboxes", "snapshots", "pool"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o700); err != nil {
			return nil, errs.Wrap(errs.Internal, err, "gvisor: state dir")
		}
	}
	r := &Runtime{
		opts:      opts,
		dir:       dir,
		runsc:     &runsc{path: opts.RunscPath, root: filepath.Join(dir, "run"), platform: opts.Platform},
		log:       opts.Logger.With("runtime", "gvisor"),
		sandboxes: map[string]*sandbox{},
	}
	if opts.TemplatesOnly {
		opts.PoolSize = 0
	} else {
		r.adopt(ctx)
	}
	r.pool = newPool(r, opts.PoolSize)
	if opts.PoolSize > 0 {
		ents, _ := os.ReadDir(filepath.Join(dir, "templates"))
		for _, e := range ents {
			if _, err := r.loadTemplate(e.Name()); err == nil {
				r.pool.want(e.Name())
			}
		}
	}
	return r, nil
}

// Name implements runtime.Runtime.
func (r *Runtime) Name() string { return "gvisor" }

// Close stops the warm pools (their sandboxes are destroyed) and leaves
// every handed-out sandbox running.
func (r *Runtime) Close() error {
	r.pool.close()
	// runsc bind-mounts a shared empty network namespace for gofers at
	// <root>/null-netns; running sandboxes do not need the mount, new
	// runsc invocations recreate it.
	for unix.Unmount(filepath.Join(r.runsc.root, "null-netns"), unix.MNT_DETACH) == nil {
	}
	return nil
}

// adopt loads sandboxes from disk, keeps those whose container is still
// there and cleans up everything else this runtime may have left.
func (r *Runtime) adopt(ctx context.Context) {
	known := map[string]bool{} // cids in use
	ownNS := map[string]bool{}
	ents, _ := os.ReadDir(filepath.Join(r.dir, "sandboxes"))
	for _, e := range ents {
		d := filepath.Join(r.dir, "sandboxes", e.Name())
		var m sandboxMeta
		if err := readJSON(filepath.Join(d, "meta.json"), &m); err != nil || m.ID != e.Name() {
			r.log.Warn("removing unreadable sandbox state", "dir", d, "err", err)
			os.RemoveAll(d)
			continue
		}
		switch m.State {
		case runtime.StateRunning:
			if r.runsc.state(ctx, m.CID) != "running" {
				r.log.Warn("sandbox died while cube was down; cleaning up", "sandbox", m.ID)
				r.destroyMeta(ctx, &m)
				os.RemoveAll(d)
				continue
			}
			known[m.CID] = true
			if m.OwnNetns != "" {
				ownNS[m.OwnNetns] = true
			}
		case runtime.StatePaused:
			if _, err := os.Stat(filepath.Join(d, "ckpt", "checkpoint.img")); err != nil {
				r.log.Warn("paused sandbox lost its checkpoint; removing", "sandbox", m.ID)
				os.RemoveAll(d)
				continue
			}
		default:
			os.RemoveAll(d)
			continue
		}
		r.sandboxes[m.ID] = &sandbox{meta: m, dir: d}
		r.log.Info("re-adopted sandbox", "sandbox", m.ID, "state", m.State)
	}
	// Warm-pool sandboxes are not handed out: destroy them, the pool refills.
	pents, _ := os.ReadDir(filepath.Join(r.dir, "pool"))
	for _, e := range pents {
		var m sandboxMeta
		d := filepath.Join(r.dir, "pool", e.Name())
		if readJSON(filepath.Join(d, "meta.json"), &m) == nil && m.CID != "" {
			r.destroyMeta(ctx, &m)
		}
		os.RemoveAll(d)
	}
	// Orphans: containers, namespaces and cgroups nobody owns.
	for _, cid := range r.runsc.list(ctx) {
		if !known[cid] {
			r.log.Warn("destroying orphan runsc container", "cid", cid)
			r.runsc.destroy(ctx, cid)
		}
	}
	for _, ns := range r.ownNetns() {
		if !ownNS[ns] {
			deleteNetns(ns)
		}
	}
	for _, cid := range r.ownCgroups() {
		if !known[cid] {
			removeCgroups(cid)
		}
	}
}

// ---- templates

func (r *Runtime) templateDir(id string) string { return filepath.Join(r.dir, "templates", id) }

func (r *Runtime) loadTemplate(id string) (*templateMeta, error) {
	var m templateMeta
	if err := readJSON(filepath.Join(r.templateDir(id), "meta.json"), &m); err != nil {
		return nil, errs.E(errs.NotFound, "template %s is not baked for gvisor", id)
	}
	return &m, nil
}

// BakeTemplate boots t's root filesystem with its init (cube-agent), waits
// for the probe(s) and checkpoints it. Idempotent per t.ID.
func (r *Runtime) BakeTemplate(ctx context.Context, t runtime.Template) error {
	if !idRE.MatchString(t.ID) {
		return errs.E(errs.InvalidArgument, "bad template id %q", t.ID)
	}
	if st, err := os.Stat(t.RootfsDir); err != nil || !st.IsDir() {
		return errs.E(errs.InvalidArgument, "template %s: root filesystem %q is not a directory", t.ID, t.RootfsDir)
	}
	if _, err := r.loadTemplate(t.ID); err == nil {
		return nil
	}
	cmd := t.Cmd
	if len(cmd) == 0 {
		cmd = []string{runtime.DefaultAgentPath}
	}
	if _, err := os.Stat(filepath.Join(t.RootfsDir, cmd[0])); err != nil {
		return errs.E(errs.InvalidArgument, "template %s: init %s is not in the root filesystem", t.ID, cmd[0])
	}
	res := t.Resources
	if res.DiskMB <= 0 {
		res.DiskMB = DefaultDiskMB
	}
	if res.MemoryMB <= 0 {
		res.MemoryMB = DefaultMemoryMB
	}
	if res.CPUCount <= 0 {
		res.CPUCount = DefaultCPUs
	}
	probePort, probePath := t.ProbePort, t.ProbePath
	if probePort == 0 {
		probePort = runtime.EnvdPort
	}
	if probePath == "" {
		probePath = "/health"
	}
	step := t.Progress
	if step == nil {
		step = func(string) {}
	}
	tdir := r.templateDir(t.ID)
	os.RemoveAll(tdir)
	work := filepath.Join(tdir, "bake")
	if err := os.MkdirAll(work, 0o700); err != nil {
		return errs.Wrap(errs.Internal, err, "template dir")
	}
	// The agent starts the start command from its environment at boot.
	env := t.AgentEnv()
	bp := bundleParams{RootfsDir: t.RootfsDir, Cmd: cmd, Env: env, Workdir: t.Workdir}
	cid := r.newCID()
	nsName := netnsPrefix + cid
	fail := func(err error) error {
		r.runsc.destroy(context.WithoutCancel(ctx), cid)
		deleteNetns(nsName)
		os.RemoveAll(tdir)
		return err
	}
	nsPath, err := createPlainNetns(nsName)
	if err != nil {
		return fail(errs.Wrap(errs.Internal, err, "template %s: network namespace", t.ID))
	}
	if err := writeBundle(filepath.Join(work, "bundle"), bp, cid, nsPath, res.CPUCount, res.MemoryMB); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "template %s: bundle", t.ID))
	}
	logPath := filepath.Join(work, "console.log")
	step("booting")
	if err := r.runsc.start(ctx, res.DiskMB, logPath, "run", "--detach", "--bundle", filepath.Join(work, "bundle"), cid); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "template %s: boot", t.ID))
	}
	if err := plainNetnsStarted(nsPath); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "template %s: network", t.ID))
	}
	pctx, cancel := ctx, context.CancelFunc(func() {})
	if _, ok := ctx.Deadline(); !ok {
		pctx, cancel = context.WithTimeout(ctx, bakeTimeout)
	}
	defer cancel()
	dial := func(ctx context.Context, port int) (net.Conn, error) {
		return dialInNetns(ctx, nsPath, net.JoinHostPort(plainGuestIP, strconv.Itoa(port)))
	}
	step("probing")
	type probe struct {
		port int
		path string
	}
	probes := []probe{{probePort, probePath}}
	for _, p := range t.ExtraProbes {
		probes = append(probes, probe{p, "/health"})
	}
	// A start command that ends fails the probes at once (they may wait
	// on the port it should serve).
	probeCtx, stopWatch := pctx, context.CancelFunc(func() {})
	if len(t.StartCmd) > 0 {
		probeCtx, stopWatch = readycheck.WhileRunning(pctx, func(ctx context.Context) (net.Conn, error) { return dial(ctx, runtime.EnvdPort) })
	}
	defer stopWatch()
	for _, p := range probes {
		if err := r.probe(probeCtx, cid, logPath, dial, p.port, p.path); err != nil {
			if ended := readycheck.Ended(probeCtx); ended != nil {
				err = ended
			}
			return fail(errs.Wrap(errs.FailedPrecondition, err, "template %s: probe :%d%s", t.ID, p.port, p.path))
		}
	}
	// The template's environment and workdir become the agent's defaults
	// before the snapshot, so every sandbox starts with them (also when the
	// probe is another port, e.g. the start command's server, as long as
	// the init is the agent).
	if (probePort == runtime.EnvdPort || len(t.Cmd) == 0) && (len(env) > 0 || t.Workdir != "") {
		body := map[string]any{}
		if len(env) > 0 {
			body["envVars"] = env
		}
		if t.Workdir != "" {
			body["defaultWorkdir"] = t.Workdir
		}
		if err := r.postInit(pctx, func(ctx context.Context) (net.Conn, error) { return dial(ctx, runtime.EnvdPort) }, body, ""); err != nil {
			return fail(errs.Wrap(errs.FailedPrecondition, err, "template %s: agent init", t.ID))
		}
	}
	// The start command runs and is ready: the snapshot has it running.
	if len(t.StartCmd) > 0 || t.ReadyCmd != "" {
		step("ready")
		if err := readycheck.Wait(ctx, func(ctx context.Context) (net.Conn, error) { return dial(ctx, runtime.EnvdPort) }, t); err != nil {
			return fail(errs.Wrap(errs.KindOf(err), err, "template %s", t.ID))
		}
	}
	step("snapshotting")
	img := filepath.Join(tdir, "image")
	if _, err := r.runsc.run(ctx, res.DiskMB, "checkpoint", "--image-path", img, cid); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "template %s: checkpoint", t.ID))
	}
	r.runsc.destroy(ctx, cid)
	deleteNetns(nsName)
	os.RemoveAll(filepath.Join(work, "bundle"))
	m := templateMeta{ID: t.ID, BakedAt: time.Now().UTC(), source: source{
		TemplateID: t.ID, Image: img, Bundle: bp, DiskMB: res.DiskMB, Resources: res,
	}}
	if err := writeJSON(filepath.Join(tdir, "meta.json"), m); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "template %s: meta", t.ID))
	}
	r.log.Info("template baked", "template", t.ID)
	r.pool.want(t.ID)
	return nil
}

// probe polls http://sandbox:port/path until it answers 2xx, the context
// ends or the container stops.
func (r *Runtime) probe(ctx context.Context, cid, logPath string, dial func(context.Context, int) (net.Conn, error), port int, path string) error {
	client := &http.Client{Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx, port) },
		DisableKeepAlives: true,
	}, Timeout: time.Second}
	var last error
	lastCheck := time.Now()
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://sandbox"+path, nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return nil
			}
			err = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		last = err
		// An init that exited leaves nobody to answer (a dial to it may
		// hang until the timeout): look at the container every second.
		if time.Since(lastCheck) >= time.Second {
			lastCheck = time.Now()
			if st := r.runsc.state(ctx, cid); st != "running" {
				b, _ := os.ReadFile(logPath)
				return fmt.Errorf("the sandbox's init exited (state %q): %s", st, lastLines(string(b), 5))
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("no answer before the deadline (last: %v)", last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// DeleteTemplate removes a baked template. It refuses while sandboxes
// (running or paused) still use it.
func (r *Runtime) DeleteTemplate(ctx context.Context, templateID string) error {
	if !idRE.MatchString(templateID) {
		return errs.E(errs.InvalidArgument, "bad template id %q", templateID)
	}
	// Sandboxes on disk, so that another process's (a server's) count too.
	n := 0
	ents, _ := os.ReadDir(filepath.Join(r.dir, "sandboxes"))
	for _, e := range ents {
		var m sandboxMeta
		if readJSON(filepath.Join(r.dir, "sandboxes", e.Name(), "meta.json"), &m) == nil && m.Source.TemplateID == templateID {
			n++
		}
	}
	if n > 0 {
		return errs.E(errs.Conflict, "template %s is used by %d sandbox(es)", templateID, n)
	}
	r.pool.drop(templateID)
	if _, err := os.Stat(r.templateDir(templateID)); err != nil {
		return errs.E(errs.NotFound, "template %s is not baked for gvisor", templateID)
	}
	return os.RemoveAll(r.templateDir(templateID))
}

// ---- sandboxes

// newCID returns a fresh runsc container id. Ids carry a tag derived from
// the state dir, so that two runtimes on one host (a server and a test)
// never take each other's namespaces or cgroups for orphans.
func (r *Runtime) newCID() string {
	var b [6]byte
	rand.Read(b[:])
	return r.cidPrefix() + hex.EncodeToString(b[:])
}

func (r *Runtime) cidPrefix() string {
	h := sha256.Sum256([]byte(r.dir))
	return "gv-" + hex.EncodeToString(h[:3]) + "-"
}

func (r *Runtime) ownCgroups() []string {
	var out []string
	for _, c := range listCgroups() {
		if strings.HasPrefix(c, r.cidPrefix()) {
			out = append(out, c)
		}
	}
	return out
}

func (r *Runtime) ownNetns() []string {
	var out []string
	for _, n := range listOwnNetns() {
		if strings.HasPrefix(n, netnsPrefix+r.cidPrefix()) {
			out = append(out, n)
		}
	}
	return out
}

func (r *Runtime) get(id string) (*sandbox, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s, ok := r.sandboxes[id]
	if !ok {
		return nil, errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	return s, nil
}

// restore brings up a new runsc container cid from src in dir, with its own
// network namespace unless net names one. On failure nothing is left.
func (r *Runtime) restore(ctx context.Context, dir string, src source, cid string, netSlot runtime.NetSlot, res runtime.Resources) (sandboxMeta, error) {
	m := sandboxMeta{CID: cid, State: runtime.StateRunning, Net: netSlot, Resources: res, Source: src}
	if netSlot.NetnsPath == "" && r.opts.Slots != nil {
		slot, err := r.opts.Slots.Acquire(ctx)
		if err != nil {
			return m, errs.Wrap(errs.KindOf(err), err, "network slot: %s", errs.Message(err))
		}
		m.Net, m.OwnSlot = slot, true
	}
	nsPath := m.Net.NetnsPath
	if nsPath == "" {
		m.OwnNetns = netnsPrefix + cid
	}
	fail := func(err error) (sandboxMeta, error) {
		r.destroyMeta(ctx, &m)
		os.RemoveAll(filepath.Join(dir, "bundle"))
		return m, err
	}
	if m.OwnNetns != "" {
		p, err := createPlainNetns(m.OwnNetns)
		if err != nil {
			return fail(errs.Wrap(errs.Internal, err, "network namespace"))
		}
		nsPath = p
	} else if _, err := os.Stat(nsPath); err != nil {
		return m, errs.E(errs.InvalidArgument, "network namespace %s does not exist", nsPath)
	}
	if err := writeBundle(filepath.Join(dir, "bundle"), src.Bundle, cid, nsPath, res.CPUCount, res.MemoryMB); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "bundle"))
	}
	if err := r.runsc.start(ctx, src.DiskMB, filepath.Join(dir, "console.log"),
		"restore", "--detach", "--image-path", src.Image, "--bundle", filepath.Join(dir, "bundle"), cid); err != nil {
		if ctx.Err() != nil {
			return fail(errs.Wrap(errs.Canceled, ctx.Err(), "restore canceled"))
		}
		return fail(errs.Wrap(errs.Internal, err, "restore"))
	}
	if m.OwnNetns != "" {
		if err := plainNetnsStarted(nsPath); err != nil {
			return fail(errs.Wrap(errs.Internal, err, "network"))
		}
	}
	m.StartedAt = time.Now().UTC()
	return m, nil
}

func (r *Runtime) netnsPath(m *sandboxMeta) string {
	if m.Net.NetnsPath != "" {
		return m.Net.NetnsPath
	}
	return filepath.Join(netnsDir, m.OwnNetns)
}

func guestIP(m *sandboxMeta) string {
	if m.Net.NetnsPath != "" && m.Net.GuestIP != "" {
		return m.Net.GuestIP
	}
	return plainGuestIP
}

func withDefaults(res, def runtime.Resources) runtime.Resources {
	if res.CPUCount <= 0 {
		res.CPUCount = def.CPUCount
	}
	if res.MemoryMB <= 0 {
		res.MemoryMB = def.MemoryMB
	}
	res.DiskMB = def.DiskMB // fixed by the template's overlay size
	return res
}

// Create restores a new sandbox from a template (from the warm pool when
// one is ready) or from a snapshot.
func (r *Runtime) Create(ctx context.Context, spec runtime.CreateSpec) (runtime.Info, error) {
	if !idRE.MatchString(spec.ID) {
		return runtime.Info{}, errs.E(errs.InvalidArgument, "bad sandbox id %q", spec.ID)
	}
	var src source
	if spec.SnapshotID != "" {
		sm, err := r.loadSnapshot(spec.SnapshotID)
		if err != nil {
			return runtime.Info{}, err
		}
		src = sm.source
	} else {
		tm, err := r.loadTemplate(spec.TemplateID)
		if err != nil {
			// Deleted (perhaps by another process): drop its warm sandboxes.
			r.pool.drop(spec.TemplateID)
			return runtime.Info{}, err
		}
		src = tm.source
	}
	res := withDefaults(spec.Resources, src.Resources)
	s := &sandbox{dir: filepath.Join(r.dir, "sandboxes", spec.ID)}
	s.mu.Lock()
	defer s.mu.Unlock()
	r.mu.Lock()
	if _, ok := r.sandboxes[spec.ID]; ok {
		r.mu.Unlock()
		return runtime.Info{}, errs.E(errs.AlreadyExists, "sandbox %s already exists", spec.ID)
	}
	r.sandboxes[spec.ID] = s // reserved; removed again on failure
	r.mu.Unlock()
	fail := func(err error) (runtime.Info, error) {
		r.mu.Lock()
		delete(r.sandboxes, spec.ID)
		r.mu.Unlock()
		os.RemoveAll(s.dir)
		return runtime.Info{}, err
	}
	if err := os.MkdirAll(s.dir, 0o700); err != nil {
		return fail(errs.Wrap(errs.Internal, err, "sandbox dir"))
	}
	var m sandboxMeta
	fromPool := false
	if spec.SnapshotID == "" && spec.Net.NetnsPath == "" {
		if pm, pdir, ok := r.pool.take(spec.TemplateID); ok {
			// Move the pooled sandbox's files under its new id.
			os.RemoveAll(s.dir)
			if err := os.Rename(pdir, s.dir); err != nil {
				r.runsc.destroy(ctx, pm.CID)
				deleteNetns(pm.OwnNetns)
				os.RemoveAll(pdir)
				return fail(errs.Wrap(errs.Internal, err, "pool hand-over"))
			}
			m, fromPool = pm, true
			if res != m.Resources {
				if err := setLimits(m.CID, res.CPUCount, res.MemoryMB); err != nil {
					r.destroyMeta(ctx, &m)
					return fail(errs.Wrap(errs.Internal, err, "cgroup limits"))
				}
				m.Resources = res
			}
		}
	}
	if !fromPool {
		var err error
		m, err = r.restore(ctx, s.dir, src, r.newCID(), spec.Net, res)
		if err != nil {
			return fail(errs.Wrap(errs.KindOf(err), err, "create sandbox %s: %s", spec.ID, errs.Message(err)))
		}
	}
	m.ID = spec.ID
	m.Labels = spec.Labels
	m.StartedAt = time.Now().UTC()
	s.meta = m
	if err := r.initAgent(ctx, &m, spec.Env, spec.AccessToken, spec.SnapshotAccessToken); err != nil {
		r.destroyMeta(ctx, &m)
		return fail(errs.Wrap(errs.Unavailable, err, "create sandbox %s: agent", spec.ID))
	}
	if err := writeJSON(filepath.Join(s.dir, "meta.json"), m); err != nil {
		r.destroyMeta(ctx, &m)
		return fail(errs.Wrap(errs.Internal, err, "sandbox meta"))
	}
	if spec.SnapshotID == "" {
		r.pool.want(spec.TemplateID)
	}
	return info(&m), nil
}

// initAgent hands the agent the sandbox's environment and access token
// (envd POST /init, with the time and fresh entropy for agents that manage
// them). auth is the token the agent already holds (a sandbox restored
// from a snapshot of a sandbox that had one).
func (r *Runtime) initAgent(ctx context.Context, m *sandboxMeta, env map[string]string, token, auth string) error {
	// gVisor serves time and randomness from the host, so a restored
	// sandbox needs /init only for its environment and token.
	if len(env) == 0 && token == "" {
		return nil
	}
	req := map[string]any{"timestamp": time.Now().UTC().Format(time.RFC3339Nano), "entropy": entropy()}
	if len(env) > 0 {
		req["envVars"] = env
	}
	if token != "" {
		req["accessToken"] = token
	}
	return r.postInit(ctx, func(ctx context.Context) (net.Conn, error) { return r.dial(ctx, m, runtime.EnvdPort) }, req, auth)
}

func entropy() string {
	var b [64]byte
	rand.Read(b[:])
	return base64.StdEncoding.EncodeToString(b[:])
}

// postInit sends POST /init to the agent; an agent without /init (404,
// 501) is tolerated with a warning.
func (r *Runtime) postInit(ctx context.Context, dial func(context.Context) (net.Conn, error), body map[string]any, auth string) error {
	client := &http.Client{Transport: &http.Transport{
		DialContext:       func(ctx context.Context, _, _ string) (net.Conn, error) { return dial(ctx) },
		DisableKeepAlives: true,
	}, Timeout: 10 * time.Second}
	b, _ := json.Marshal(body)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://sandbox/init", strings.NewReader(string(b)))
	req.Header.Set("Content-Type", "application/json")
	if auth != "" {
		req.Header.Set("X-Access-Token", auth)
	}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode/100 != 2 {
		if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusNotImplemented {
			r.log.Warn("agent has no /init; env and token not applied")
			return nil
		}
		return fmt.Errorf("POST /init: HTTP %d", resp.StatusCode)
	}
	return nil
}

func info(m *sandboxMeta) runtime.Info {
	return runtime.Info{
		ID: m.ID, TemplateID: m.Source.TemplateID, State: m.State, StartedAt: m.StartedAt,
		Net: m.Net, Resources: m.Resources, Labels: m.Labels,
	}
}

// destroyMeta stops m's container and removes its namespace.
func (r *Runtime) destroyMeta(ctx context.Context, m *sandboxMeta) {
	if m.CID != "" {
		r.runsc.destroy(context.WithoutCancel(ctx), m.CID)
	}
	if m.OwnNetns != "" {
		deleteNetns(m.OwnNetns)
	}
	if m.OwnSlot && r.opts.Slots != nil && m.Net.ID != "" {
		if err := r.opts.Slots.Release(context.WithoutCancel(ctx), m.Net.ID); err != nil {
			r.log.Warn("releasing network slot", "slot", m.Net.ID, "err", err)
		}
	}
}

// dial connects to port in the sandbox described by m.
func (r *Runtime) dial(ctx context.Context, m *sandboxMeta, port int) (net.Conn, error) {
	if m.Net.ID != "" && r.opts.Slots != nil {
		return r.opts.Slots.Dial(ctx, m.Net.ID, port)
	}
	// A caller's slot without a provider: its router namespace (runsc
	// takes eth0's address away from the guest namespace's kernel).
	nsPath := r.netnsPath(m)
	if m.Net.NetnsPath != "" && m.Net.RouterNetnsPath != "" {
		nsPath = m.Net.RouterNetnsPath
	}
	return dialInNetns(ctx, nsPath, net.JoinHostPort(guestIP(m), strconv.Itoa(port)))
}

// Pause checkpoints the sandbox to disk and stops it.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	s, err := r.get(id)
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	if s.meta.State != runtime.StateRunning {
		return errs.E(errs.Conflict, "sandbox %s is %s, not running", id, s.meta.State)
	}
	tmp, ckpt := filepath.Join(s.dir, "ckpt.tmp"), filepath.Join(s.dir, "ckpt")
	os.RemoveAll(tmp)
	if _, err := r.runsc.run(ctx, s.meta.Source.DiskMB, "checkpoint", "--image-path", tmp, s.meta.CID); err != nil {
		os.RemoveAll(tmp)
		if r.runsc.state(ctx, s.meta.CID) != "running" {
			// The checkpoint failed and took the sandbox down with it.
			r.destroyMeta(ctx, &s.meta)
			s.meta.State = runtime.StateStopped
			writeJSON(filepath.Join(s.dir, "meta.json"), s.meta)
		}
		return errs.Wrap(errs.Internal, err, "pause sandbox %s", id)
	}
	r.destroyMeta(ctx, &s.meta)
	os.RemoveAll(ckpt)
	if err := os.Rename(tmp, ckpt); err != nil {
		return errs.Wrap(errs.Internal, err, "pause sandbox %s", id)
	}
	s.meta.State = runtime.StatePaused
	s.meta.CID, s.meta.OwnNetns = "", ""
	if s.meta.OwnSlot {
		s.meta.Net, s.meta.OwnSlot = runtime.NetSlot{}, false
	}
	return writeJSON(filepath.Join(s.dir, "meta.json"), s.meta)
}

// Resume restores a paused sandbox, possibly on another network slot.
func (r *Runtime) Resume(ctx context.Context, id string, netSlot runtime.NetSlot) (runtime.Info, error) {
	s, err := r.get(id)
	if err != nil {
		return runtime.Info{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return runtime.Info{}, errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	if s.meta.State != runtime.StatePaused {
		return runtime.Info{}, errs.E(errs.Conflict, "sandbox %s is %s, not paused", id, s.meta.State)
	}
	src := s.meta.Source
	src.Image = filepath.Join(s.dir, "ckpt")
	m, err := r.restore(ctx, s.dir, src, r.newCID(), netSlot, s.meta.Resources)
	if err != nil {
		return runtime.Info{}, errs.Wrap(errs.KindOf(err), err, "resume sandbox %s: %s", id, errs.Message(err))
	}
	m.ID, m.Labels, m.Source = id, s.meta.Labels, s.meta.Source
	s.meta = m
	if err := writeJSON(filepath.Join(s.dir, "meta.json"), s.meta); err != nil {
		return runtime.Info{}, errs.Wrap(errs.Internal, err, "resume sandbox %s", id)
	}
	return info(&s.meta), nil
}

func (r *Runtime) snapshotDir(id string) string { return filepath.Join(r.dir, "snapshots", id) }

func (r *Runtime) loadSnapshot(id string) (*snapshotMeta, error) {
	if !idRE.MatchString(id) {
		return nil, errs.E(errs.InvalidArgument, "bad snapshot id %q", id)
	}
	var m snapshotMeta
	if err := readJSON(filepath.Join(r.snapshotDir(id), "meta.json"), &m); err != nil {
		return nil, errs.E(errs.NotFound, "snapshot %s not found", id)
	}
	return &m, nil
}

// Snapshot checkpoints a running sandbox and lets it continue; of a
// paused sandbox it takes the pause checkpoint (hard links, a copy across
// file systems), leaving the sandbox paused and resumable.
func (r *Runtime) Snapshot(ctx context.Context, id, snapshotID string) (runtime.Snapshot, error) {
	if !idRE.MatchString(snapshotID) {
		return runtime.Snapshot{}, errs.E(errs.InvalidArgument, "bad snapshot id %q", snapshotID)
	}
	s, err := r.get(id)
	if err != nil {
		return runtime.Snapshot{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return runtime.Snapshot{}, errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	if s.meta.State != runtime.StateRunning && s.meta.State != runtime.StatePaused {
		return runtime.Snapshot{}, errs.E(errs.Conflict, "sandbox %s is %s, not running or paused", id, s.meta.State)
	}
	d := r.snapshotDir(snapshotID)
	if _, err := os.Stat(d); err == nil {
		return runtime.Snapshot{}, errs.E(errs.AlreadyExists, "snapshot %s already exists", snapshotID)
	}
	img := filepath.Join(d, "image")
	if s.meta.State == runtime.StatePaused {
		// The pause checkpoint is the snapshot: link its files (restores
		// only read an image, and the next pause writes a new directory).
		if err := linkTree(filepath.Join(s.dir, "ckpt"), img); err != nil {
			os.RemoveAll(d)
			return runtime.Snapshot{}, errs.Wrap(errs.Internal, err, "snapshot paused sandbox %s", id)
		}
	} else if _, err := r.runsc.run(ctx, s.meta.Source.DiskMB, "checkpoint", "--leave-running", "--image-path", img, s.meta.CID); err != nil {
		os.RemoveAll(d)
		return runtime.Snapshot{}, errs.Wrap(errs.Internal, err, "snapshot sandbox %s", id)
	}
	sm := snapshotMeta{ID: snapshotID, SandboxID: id, CreatedAt: time.Now().UTC(), source: s.meta.Source}
	sm.Image = img
	sm.Resources = s.meta.Resources
	if err := writeJSON(filepath.Join(d, "meta.json"), sm); err != nil {
		os.RemoveAll(d)
		return runtime.Snapshot{}, errs.Wrap(errs.Internal, err, "snapshot meta")
	}
	return runtime.Snapshot{ID: snapshotID, SandboxID: id, TemplateID: sm.TemplateID, CreatedAt: sm.CreatedAt, Dir: d}, nil
}

// linkTree makes dst a copy of the flat directory src by hard links,
// copying files that cannot be linked.
func linkTree(src, dst string) error {
	ents, err := os.ReadDir(src)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return err
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			return fmt.Errorf("checkpoint %s: %s is not a regular file", src, e.Name())
		}
		from, to := filepath.Join(src, e.Name()), filepath.Join(dst, e.Name())
		if os.Link(from, to) == nil {
			continue
		}
		if err := copyFile(from, to); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// DeleteSnapshot removes a snapshot, also an incomplete one (its
// meta.json goes first, so an interrupted deletion leaves an incomplete
// snapshot, never a restorable half).
func (r *Runtime) DeleteSnapshot(ctx context.Context, snapshotID string) error {
	if !idRE.MatchString(snapshotID) {
		return errs.E(errs.InvalidArgument, "bad snapshot id %q", snapshotID)
	}
	d := r.snapshotDir(snapshotID)
	if fi, err := os.Stat(d); err != nil || !fi.IsDir() {
		return errs.E(errs.NotFound, "snapshot %s not found", snapshotID)
	}
	if err := os.Remove(filepath.Join(d, "meta.json")); err != nil && !os.IsNotExist(err) {
		return errs.Wrap(errs.Internal, err, "delete snapshot %s", snapshotID)
	}
	if err := os.RemoveAll(d); err != nil {
		return errs.Wrap(errs.Internal, err, "delete snapshot %s", snapshotID)
	}
	return nil
}

// ListSnapshots implements runtime.SnapshotLister: the directories under
// snapshots/, complete when their meta.json (written last) reads.
func (r *Runtime) ListSnapshots(ctx context.Context) ([]runtime.SnapshotEntry, error) {
	ents, err := os.ReadDir(filepath.Join(r.dir, "snapshots"))
	if err != nil {
		if os.IsNotExist(err) {
			return nil, nil
		}
		return nil, errs.Wrap(errs.Internal, err, "list snapshots")
	}
	var out []runtime.SnapshotEntry
	for _, e := range ents {
		if !e.IsDir() || !idRE.MatchString(e.Name()) {
			continue
		}
		var m snapshotMeta
		ok := readJSON(filepath.Join(r.snapshotDir(e.Name()), "meta.json"), &m) == nil && m.ID == e.Name()
		out = append(out, runtime.SnapshotEntry{ID: e.Name(), Complete: ok})
	}
	return out, nil
}

// Destroy stops the sandbox and removes everything it had. Unknown ids
// are not an error (idempotent).
func (r *Runtime) Destroy(ctx context.Context, id string) error {
	s, err := r.get(id)
	if err != nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.gone {
		return nil
	}
	r.destroyMeta(ctx, &s.meta)
	if err := os.RemoveAll(s.dir); err != nil {
		return errs.Wrap(errs.Internal, err, "destroy sandbox %s", id)
	}
	s.gone = true
	r.mu.Lock()
	delete(r.sandboxes, id)
	r.mu.Unlock()
	return nil
}

// Dial connects to a TCP port inside the sandbox: the socket is opened in
// the sandbox's network namespace and connects to its address there.
func (r *Runtime) Dial(ctx context.Context, id string, port int) (net.Conn, error) {
	if port <= 0 || port > 65535 {
		return nil, errs.E(errs.InvalidArgument, "bad port %d", port)
	}
	s, err := r.get(id)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.gone || s.meta.State != runtime.StateRunning {
		st := s.meta.State
		s.mu.Unlock()
		return nil, errs.E(errs.Conflict, "sandbox %s is %s, not running", id, st)
	}
	m := s.meta
	s.mu.Unlock()
	c, err := r.dial(ctx, &m, port)
	if err != nil {
		return nil, errs.Wrap(errs.Unavailable, err, "sandbox %s: port %d", id, port)
	}
	return c, nil
}

// Stats reads the sandbox's cgroups.
func (r *Runtime) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	s, err := r.get(id)
	if err != nil {
		return runtime.Stats{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.meta.State != runtime.StateRunning {
		return runtime.Stats{}, errs.E(errs.Conflict, "sandbox %s is %s, not running", id, s.meta.State)
	}
	cid := s.meta.CID
	now := time.Now()
	st := runtime.Stats{
		Timestamp: now.UTC(), CPUCount: s.meta.Resources.CPUCount,
		MemTotal:  uint64(s.meta.Resources.MemoryMB) << 20,
		DiskTotal: uint64(s.meta.Source.DiskMB) << 20,
	}
	if u, ok := readUint(filepath.Join(cgroupDir("memory", cid), "memory.usage_in_bytes")); ok {
		st.MemUsed = u - min(u, memStat(cid, "total_inactive_file"))
	}
	if lim, ok := readUint(filepath.Join(cgroupDir("memory", cid), "memory.limit_in_bytes")); ok && lim < st.MemTotal {
		st.MemTotal = lim
	}
	if cpu, ok := readUint(filepath.Join(cgroupDir("cpuacct", cid), "cpuacct.usage")); ok {
		prev, prevAt := s.lastCPU, s.lastCPUAt
		if prevAt.IsZero() || cpu < prev {
			prev, prevAt = 0, s.meta.StartedAt
		}
		if el := now.Sub(prevAt); el > 0 && st.CPUCount > 0 {
			st.CPUUsedPct = 100 * float64(cpu-prev) / float64(el.Nanoseconds()) / float64(st.CPUCount)
		}
		s.lastCPU, s.lastCPUAt = cpu, now
	}
	return st, nil
}

func memStat(cid, key string) uint64 {
	f, err := os.Open(filepath.Join(cgroupDir("memory", cid), "memory.stat"))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), " ")
		if ok && k == key {
			n, _ := strconv.ParseUint(v, 10, 64)
			return n
		}
	}
	return 0
}

// List returns the running and paused sandboxes.
func (r *Runtime) List(ctx context.Context) ([]runtime.Info, error) {
	r.mu.Lock()
	ss := make([]*sandbox, 0, len(r.sandboxes))
	for _, s := range r.sandboxes {
		ss = append(ss, s)
	}
	r.mu.Unlock()
	out := make([]runtime.Info, 0, len(ss))
	for _, s := range ss {
		if !s.mu.TryLock() {
			continue // being created or changed
		}
		if !s.gone && s.meta.ID != "" && s.meta.State != runtime.StateStopped {
			out = append(out, info(&s.meta))
		}
		s.mu.Unlock()
	}
	return out, nil
}

// Resources of a sandbox's runsc container, for tests and tools.
type Resources struct {
	CID       string
	Netns     string   // path
	Cgroups   []string // existing cgroup dirs
	Processes []int
	Dir       string
}

// Inspect reports what the sandbox holds on the host (for leak checks).
func (r *Runtime) Inspect(id string) (Resources, error) {
	s, err := r.get(id)
	if err != nil {
		return Resources{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	res := Resources{CID: s.meta.CID, Dir: s.dir}
	if s.meta.CID != "" {
		res.Netns = r.netnsPath(&s.meta)
		res.Cgroups = cgroupLeftovers(s.meta.CID)
		res.Processes = r.runsc.processes(s.meta.CID)
	}
	return res, nil
}

// Leftovers reports host resources that still exist for container cid.
func (r *Runtime) Leftovers(cid string) []string {
	var out []string
	out = append(out, cgroupLeftovers(cid)...)
	for _, p := range r.runsc.processes(cid) {
		out = append(out, fmt.Sprintf("process %d", p))
	}
	if _, err := os.Stat(filepath.Join(netnsDir, netnsPrefix+cid)); err == nil {
		out = append(out, "netns "+netnsPrefix+cid)
	}
	if m, _ := filepath.Glob(filepath.Join(r.runsc.root, cid+"_sandbox:*")); len(m) > 0 {
		out = append(out, m...)
	}
	if b, err := os.ReadFile("/proc/self/mountinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if strings.Contains(l, cid) {
				out = append(out, "mount "+l)
			}
		}
	}
	return out
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// Leaks lists host resources under this runtime's name that no sandbox,
// warm-pool entry or bake owns: runsc containers, runsc processes,
// network namespaces, cgroups. Tests assert it is empty after failures.
func (r *Runtime) Leaks() []string {
	owned := map[string]bool{}
	ownedNS := map[string]bool{}
	r.mu.Lock()
	for _, s := range r.sandboxes {
		owned[s.meta.CID] = true
		ownedNS[s.meta.OwnNetns] = true
	}
	r.mu.Unlock()
	r.pool.mu.Lock()
	for _, l := range r.pool.ready {
		for _, m := range l {
			owned[m.CID] = true
			ownedNS[m.OwnNetns] = true
		}
	}
	r.pool.mu.Unlock()
	var out []string
	for _, cid := range r.runsc.list(context.Background()) {
		if !owned[cid] {
			out = append(out, "runsc container "+cid)
		}
	}
	for _, ns := range r.ownNetns() {
		if !ownedNS[ns] {
			out = append(out, "netns "+ns)
		}
	}
	for _, cid := range r.ownCgroups() {
		if !owned[cid] {
			out = append(out, "cgroup "+cid)
		}
	}
	ents, _ := os.ReadDir("/proc")
	rootArg := []byte("--root=" + r.runsc.root + "\x00")
	for _, e := range ents {
		b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
		if err != nil || !bytesContains(b, rootArg) {
			continue
		}
		mine := false
		for cid := range owned {
			if cid != "" && bytesContains(b, []byte(cid)) {
				mine = true
			}
		}
		if !mine {
			out = append(out, "process "+e.Name()+": "+strings.ReplaceAll(string(b), "\x00", " "))
		}
	}
	return out
}

func bytesContains(b, sub []byte) bool { return strings.Contains(string(b), string(sub)) }
