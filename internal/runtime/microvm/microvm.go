//go:build linux

// Package microvm is the runtime.Runtime that runs each sandbox as a
// microVM in its own Cube VMM process (`cube vmm-restore --guest linux`)
// on hardware KVM. A template is baked by booting its ext4 image with the
// guest kernel and cube-agent as PID 1, probing /health over vsock and
// taking a snapshot; a sandbox is created by restoring that snapshot in a
// pre-started VMM (memory file mapped MAP_PRIVATE: clones share the page
// cache), with a per-sandbox copy-on-write disk overlay (taken from a
// pool of pre-created copies) and the tap of its network slot; the node
// then tells the agent the wall-clock time and fresh entropy (POST /init
// over vsock). Pause writes a diff snapshot (only the pages changed since
// the template) and ends the VMM; Resume restores it. Snapshot forks a
// full snapshot of a running sandbox. See docs/microvm.md.
package microvm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
	"github.com/cubesandbox/cube/internal/runtime/readycheck"
	"github.com/cubesandbox/cube/internal/vmm/jail"
	"github.com/cubesandbox/cube/internal/vmm/snapshot"
	"github.com/cubesandbox/cube/internal/vmm/vmmapi"
	"github.com/cubesandbox/cube/internal/vmm/vmmspec"
)

// Options configure the runtime.
type Options struct {
	// Dir holds templates/, sandboxes/, snapshots/ and pool/.
	Dir string
	// Kernel is the guest kernel (bzImage or PVH vmlinux).
	Kernel string
	// CubeBin is the cube binary run as the VMM (default: this binary).
	CubeBin string
	// PoolSize is how many VMM processes are kept pre-started, and how
	// many disk overlays per template are kept pre-copied.
	PoolSize int
	// BootTimeout bounds a template boot until its probe answers.
	BootTimeout time.Duration
	Log         *slog.Logger
	// TemplatesOnly opens the state for baking and deleting templates
	// beside a running server (the CLI, `cube tpl`): no re-adoption of
	// sandboxes, no cleanup of another process's pool, no pool.
	TemplatesOnly bool
	// NoJail runs the VMMs unjailed (debugging): by default each runs as
	// `cube vmm-restore --jail` (own mount/net/IPC/UTS namespaces and
	// cgroup with the sandbox's limits, only its fds; docs/vmm.md).
	NoJail bool
	// NoSeccomp runs the VMMs without their seccomp filter (debugging).
	NoSeccomp bool
	// UID/GID > 0 run jailed VMMs as that user (its files, overlays and
	// snapshot dirs must then be accessible to it).
	UID, GID int
}

// Guest defaults.
const (
	defaultMemMiB = 512
	guestCID      = 3
	defaultMAC    = "06:00:ac:10:00:02"
	cmdline       = "console=ttyS0 reboot=k panic=-1 root=/dev/vda rw rootfstype=ext4 quiet"
)

func checkID(kind, id string) error {
	if !jail.ValidName(id) {
		return errs.E(errs.InvalidArgument, "%s id %q: want 1-128 of [A-Za-z0-9._-]", kind, id)
	}
	return nil
}

// record is a sandbox as persisted in sandboxes/<id>/sandbox.json.
type record struct {
	ID         string            `json:"id"`
	TemplateID string            `json:"template_id"`
	State      runtime.State     `json:"state"`
	PID        int               `json:"pid"`
	Socket     string            `json:"socket"`
	StartedAt  time.Time         `json:"started_at"`
	Net        runtime.NetSlot   `json:"net"`
	Resources  runtime.Resources `json:"resources"`
	Labels     map[string]string `json:"labels,omitempty"`
	// Base is the rootfs image, Snap the snapshot dir the VM runs from.
	Base string            `json:"base"`
	Snap string            `json:"snap"`
	Env  map[string]string `json:"env,omitempty"`
	// Token is the envd access token (kept to re-init after resume).
	Token string `json:"token,omitempty"`
	// Cgroup is the jailed VMM's cgroup (cube-vmm/<Cgroup>).
	Cgroup string `json:"cgroup,omitempty"`
	// Stats sampling.
	lastCPU  uint64
	lastTime time.Time
}

type sandbox struct {
	mu  sync.Mutex
	rec record
	dir string
	// initAuth is the token the restored agent holds when it is not
	// rec.Token (a create from a snapshot of a sandbox that had one).
	initAuth string
}

// Runtime is the microVM runtime.
type Runtime struct {
	o   Options
	log *slog.Logger

	mu        sync.Mutex
	sandboxes map[string]*sandbox

	pool *vmmPool

	// cgPrefix starts the names of this state dir's VMM cgroups.
	cgPrefix string
	cgSeq    atomic.Int64
	supMu    sync.Mutex
	sups     map[int]*vmmapi.Supervised // live VMMs by pid
}

var _ runtime.Runtime = (*Runtime)(nil)

// New opens the runtime state in o.Dir, re-adopts live sandboxes and
// starts the VMM pool.
func New(o Options) (*Runtime, error) {
	if o.Dir == "" {
		return nil, errs.E(errs.InvalidArgument, "microvm: no state dir")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.CubeBin == "" {
		exe, err := os.Executable()
		if err != nil {
			return nil, err
		}
		o.CubeBin = exe
	}
	if o.BootTimeout == 0 {
		o.BootTimeout = 2 * time.Minute
	}
	for _, d := range []string{"templates", "sandboxes", "snapshots", "pool"} {
		if err := os.MkdirAll(filepath.Join(o.Dir, d), 0o755); err != nil {
			return nil, errs.Wrap(errs.Internal, err, "microvm state dir")
		}
	}
	r := &Runtime{o: o, log: o.Log, sandboxes: map[string]*sandbox{}, sups: map[int]*vmmapi.Supervised{}}
	abs, _ := filepath.Abs(o.Dir)
	h := sha256.Sum256([]byte(abs))
	r.cgPrefix = "mv-" + hex.EncodeToString(h[:5]) + "-"
	if o.TemplatesOnly {
		o.PoolSize = 0
	} else {
		r.adopt()
	}
	r.pool = newVMMPool(r, o.PoolSize)
	return r, nil
}

// Name implements runtime.Runtime.
func (r *Runtime) Name() string { return "microvm" }

func (r *Runtime) tplDir(id string) string  { return filepath.Join(r.o.Dir, "templates", id) }
func (r *Runtime) sbDir(id string) string   { return filepath.Join(r.o.Dir, "sandboxes", id) }
func (r *Runtime) snapDir(id string) string { return filepath.Join(r.o.Dir, "snapshots", id) }

// templateMeta is templates/<id>/template.json.
type templateMeta struct {
	ID     string `json:"id"`
	MemMiB int    `json:"mem_mib"`
	VCPUs  int    `json:"vcpus"`
	Base   string `json:"base"` // rootfs image
}

// vmm is a running VMM process.
type vmm struct {
	pid    int
	socket string
	cgroup string // jailed: its cgroup's name
	// launcher is the jail launcher's pid (gone once the VMM serves).
	launcher int
	cl       *vmmapi.Client
	sup      *vmmapi.Supervised
}

// startVMM launches `cube vmm-restore --guest linux` in its own session
// and network namespace (where a slot-less sandbox gets a private tap):
// jailed by default (`--jail`: the launcher re-executes the VMM in new
// namespaces and its own cgroup, as a child of this process
// (CLONE_PARENT), and exits once it serves), under its seccomp
// filter from before the first guest instruction. It does not die with
// this process: sandboxes outlive a cube restart. v.pid is the VMM
// itself (as it reports); it is supervised through a pidfd (reaped and
// its cgroup removed when it exits).
func (r *Runtime) startVMM(dir string, extra ...string) (*vmm, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, errs.Wrap(errs.Internal, err, "vmm dir")
	}
	sock := filepath.Join(dir, "vmm.sock")
	os.Remove(sock)
	logf, err := os.OpenFile(filepath.Join(dir, "vmm.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "vmm log")
	}
	defer logf.Close()
	args := []string{"vmm-restore", "--guest", "linux", "--api-socket", sock}
	cgName := ""
	if !r.o.NoJail {
		cgName = fmt.Sprintf("%s%d-%d", r.cgPrefix, os.Getpid(), r.cgSeq.Add(1))
		args = append(args, "--jail", "--cgroup", cgName)
		if r.o.UID > 0 {
			args = append(args, "--uid", strconv.Itoa(r.o.UID), "--gid", strconv.Itoa(r.o.GID))
		}
	}
	if r.o.NoSeccomp {
		args = append(args, "--no-seccomp")
	}
	cmd := exec.Command(r.o.CubeBin, append(args, extra...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if r.o.NoJail {
		cmd.SysProcAttr.Cloneflags = syscall.CLONE_NEWNET
	}
	// Jailed: the launcher's stdout (one JSON line: the VMM's pid) comes
	// through a pipe that closes when the launcher exits.
	var outR, outW *os.File
	if !r.o.NoJail {
		if outR, outW, err = os.Pipe(); err != nil {
			return nil, errs.Wrap(errs.Internal, err, "pipe")
		}
		defer outR.Close()
		cmd.Stdout = outW
	}
	err = cmd.Start()
	if outW != nil {
		outW.Close()
	}
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "start vmm")
	}
	logHint := filepath.Join(dir, "vmm.log")
	v := &vmm{pid: cmd.Process.Pid, launcher: cmd.Process.Pid, socket: sock, cgroup: cgName, cl: vmmapi.NewClient(sock)}
	if r.o.NoJail {
		// The VMM is our child: supervise (and reap) it directly.
		sup, err := r.supervise(v.pid, nil)
		if err != nil {
			cmd.Process.Kill()
			cmd.Wait()
			return nil, errs.Wrap(errs.Internal, err, "supervise vmm")
		}
		cmd.Process.Release()
		v.sup = sup
	} else {
		// The launcher exits once the VMM is in its cgroup and serves; the
		// VMM is our child (CLONE_PARENT), whatever happened.
		cg, _ := jail.OpenCgroup(cgName)
		werr := make(chan error, 1)
		go func() { werr <- cmd.Wait() }()
		select {
		case err = <-werr:
		case <-time.After(40 * time.Second):
			cmd.Process.Kill()
			err = fmt.Errorf("launcher did not finish: %w", <-werr)
		}
		out, _ := io.ReadAll(io.LimitReader(outR, 64<<10))
		var rep struct {
			PID   int    `json:"pid"`
			Error string `json:"error"`
		}
		if line, _, _ := bytes.Cut(out, []byte("\n")); len(line) > 0 {
			json.Unmarshal(line, &rep)
		}
		if rep.PID > 0 {
			v.pid = rep.PID
			sup, serr := r.supervise(v.pid, cg)
			if serr != nil && err == nil {
				err = serr
			}
			v.sup = sup
		}
		if err != nil || rep.Error != "" || v.sup == nil {
			if v.sup != nil {
				v.kill() // kill (if still there), reap, remove its cgroup
			} else {
				r.abandon(sock, cg)
			}
			msg := rep.Error
			if msg == "" && err != nil {
				msg = err.Error()
			}
			if msg == "" {
				msg = "the launcher reported no vmm pid"
			}
			return nil, errs.E(errs.Unavailable, "jailed vmm did not come up: %s (see %s)", msg, logHint)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := v.cl.WaitReady(ctx)
	if err == nil && st.PID != v.pid {
		err = fmt.Errorf("vmm at %s reports pid %d, launched %d", sock, st.PID, v.pid)
	}
	if err != nil {
		v.kill()
		return nil, errs.Wrap(errs.Unavailable, err, "vmm did not come up (see %s)", logHint)
	}
	return v, nil
}

// abandon cleans up after a jailed launch that failed: a VMM that
// answers on the socket is killed, then its cgroup is removed.
func (r *Runtime) abandon(sock string, cg *jail.Cgroup) {
	ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
	st, err := vmmapi.NewClient(sock).Status(ctx)
	cancel()
	if err == nil && st.PID > 0 {
		syscall.Kill(st.PID, syscall.SIGKILL)
		waitGone(st.PID, 5*time.Second)
	}
	if cg != nil {
		cg.Remove()
	}
}

// supervise watches a VMM (our child, or one adopted from an earlier
// process) until it exits: it is reaped if ours, its cgroup removed.
func (r *Runtime) supervise(pid int, cg *jail.Cgroup) (*vmmapi.Supervised, error) {
	s, err := vmmapi.Supervise(pid, cg, "")
	if err != nil {
		return nil, err
	}
	r.supMu.Lock()
	r.sups[pid] = s
	r.supMu.Unlock()
	go func() {
		<-s.Done()
		r.supMu.Lock()
		if r.sups[pid] == s {
			delete(r.sups, pid)
		}
		r.supMu.Unlock()
		r.log.Debug("microvm: vmm exited", "pid", pid, "exit", s.Exit().String())
	}()
	return s, nil
}

func (r *Runtime) supervised(pid int) *vmmapi.Supervised {
	r.supMu.Lock()
	defer r.supMu.Unlock()
	return r.sups[pid]
}

func (v *vmm) kill() {
	if v.sup != nil {
		v.sup.Kill(5 * time.Second)
		return
	}
	if v.pid > 0 {
		syscall.Kill(v.pid, syscall.SIGKILL)
		waitGone(v.pid, 5*time.Second)
	}
}

// stopVMM asks the VMM to stop, then kills it if it lingers; a
// supervised one is signalled through its pidfd and waited for until it
// is reaped and its cgroup removed.
func (r *Runtime) stopVMM(pid int, socket string) {
	if pid <= 0 {
		return
	}
	s := r.supervised(pid)
	if s == nil {
		// Not watched yet (a previous process's VMM): watch it now, so
		// that it is reaped if it is our child and signalled through a
		// pidfd.
		var err error
		if s, err = r.supervise(pid, nil); err != nil {
			return // gone already
		}
	}
	if s.Exited() {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	vmmapi.NewClient(socket).Stop(ctx)
	cancel()
	if !s.WaitFor(3 * time.Second) {
		s.Kill(5 * time.Second)
	}
}

func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie (state Z) is gone for our purposes.
	if i := bytes.LastIndexByte(b, ')'); i > 0 && i+2 < len(b) && b[i+2] == 'Z' {
		return false
	}
	return true
}

func waitGone(pid int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for alive(pid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(5 * time.Millisecond)
	}
	return true
}

// BakeTemplate implements runtime.Runtime.
func (r *Runtime) BakeTemplate(ctx context.Context, t runtime.Template) error {
	if err := checkID("template", t.ID); err != nil {
		return err
	}
	dir := r.tplDir(t.ID)
	if _, err := os.Stat(filepath.Join(dir, "snap", snapshot.StateFile)); err == nil {
		return nil
	}
	if r.o.Kernel == "" {
		return errs.E(errs.FailedPrecondition, "microvm: no guest kernel configured (config kernelPath; `make kernel`)")
	}
	if t.Ext4Image == "" {
		return errs.E(errs.InvalidArgument, "template %s has no ext4 image", t.ID)
	}
	progress := t.Progress
	if progress == nil {
		progress = func(string) {}
	}
	os.RemoveAll(dir)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return errs.Wrap(errs.Internal, err, "template dir")
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(dir)
		}
	}()
	base := filepath.Join(dir, "rootfs.ext4")
	if err := linkOrCopy(t.Ext4Image, base); err != nil {
		return err
	}
	mem := t.Resources.MemoryMB
	if mem <= 0 {
		mem = defaultMemMiB
	}
	cpus := max(t.Resources.CPUCount, 1)
	init := t.Cmd
	if len(init) == 0 {
		init = []string{runtime.DefaultAgentPath}
	}
	cl := cmdline + " init=" + init[0]
	if len(init) > 1 {
		cl += " -- " + strings.Join(init[1:], " ")
	}
	o := vmmapi.Options{
		Kernel: r.o.Kernel, Cmdline: cl, MemMiB: mem, VCPUs: cpus,
		Disks:   []vmmapi.Disk{{Base: base, Overlay: filepath.Join(dir, "disk.overlay")}},
		TapName: vmmspec.PrivateTap, MAC: defaultMAC,
		VsockUDS: filepath.Join(dir, "vsock.sock"), VsockCID: guestCID, RNG: true,
		SerialLog: filepath.Join(dir, "serial.log"),
	}
	optsPath := filepath.Join(dir, "boot.json")
	if err := writeJSON(optsPath, o); err != nil {
		return err
	}
	progress("booting")
	v, err := r.startVMM(filepath.Join(dir, "boot"), "--options", optsPath, "--boot")
	if err != nil {
		return err
	}
	defer r.stopVMM(v.pid, v.socket)
	progress("probing")
	port := t.ProbePort
	if port == 0 {
		port = runtime.EnvdPort
	}
	path := t.ProbePath
	if path == "" {
		path = "/health"
	}
	bctx, cancel := context.WithTimeout(ctx, r.o.BootTimeout)
	defer cancel()
	// The template's env, workdir and start command become the agent's
	// before the snapshot: the agent starts the command on this /init,
	// which therefore comes first when there is one (the probe may be the
	// port it serves; agentInit waits for the agent).
	initAgent := func() error {
		env := t.AgentEnv()
		if len(env) == 0 && t.Workdir == "" {
			return nil
		}
		body := initBody(env, "")
		if t.Workdir != "" {
			body["defaultWorkdir"] = t.Workdir
		}
		return agentInit(bctx, o.VsockUDS, body)
	}
	if len(t.StartCmd) > 0 {
		if err := initAgent(); err != nil {
			return errs.Wrap(errs.Timeout, err, "template %s: agent init (serial log %s)", t.ID, o.SerialLog)
		}
	}
	// A start command that ends fails the probes at once (they may wait
	// on the port it should serve).
	probeCtx, stopWatch := bctx, context.CancelFunc(func() {})
	if len(t.StartCmd) > 0 {
		probeCtx, stopWatch = readycheck.WhileRunning(bctx, func(ctx context.Context) (net.Conn, error) { return DialVsock(ctx, o.VsockUDS, runtime.EnvdPort) })
	}
	defer stopWatch()
	for _, p := range append([]int{port}, t.ExtraProbes...) {
		pp := path
		if p != port {
			pp = "/health"
		}
		if err := probe(probeCtx, o.VsockUDS, p, pp); err != nil {
			if ended := readycheck.Ended(probeCtx); ended != nil {
				return errs.Wrap(errs.FailedPrecondition, ended, "template %s: probe port %d", t.ID, p)
			}
			return errs.Wrap(errs.Timeout, err, "template %s: probe port %d (serial log %s)", t.ID, p, o.SerialLog)
		}
	}
	if len(t.StartCmd) == 0 {
		if err := initAgent(); err != nil {
			return err
		}
	}
	if len(t.StartCmd) > 0 || t.ReadyCmd != "" {
		progress("ready")
		dial := func(ctx context.Context) (net.Conn, error) { return DialVsock(ctx, o.VsockUDS, runtime.EnvdPort) }
		if err := readycheck.Wait(ctx, dial, t); err != nil {
			return errs.Wrap(errs.KindOf(err), err, "template %s", t.ID)
		}
	}
	progress("snapshotting")
	if _, err := v.cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: filepath.Join(dir, "snap")}); err != nil {
		return err
	}
	r.stopVMM(v.pid, v.socket)
	os.Remove(o.VsockUDS)
	if err := writeJSON(filepath.Join(dir, "template.json"), templateMeta{ID: t.ID, MemMiB: mem, VCPUs: cpus, Base: base}); err != nil {
		return err
	}
	ok = true
	return nil
}

// DeleteTemplate implements runtime.Runtime.
func (r *Runtime) DeleteTemplate(ctx context.Context, id string) error {
	if err := checkID("template", id); err != nil {
		return err
	}
	r.pool.dropOverlays(id)
	return os.RemoveAll(r.tplDir(id))
}

func (r *Runtime) get(id string) (*sandbox, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.sandboxes[id]
	if s == nil {
		return nil, errs.E(errs.NotFound, "sandbox %s not found", id)
	}
	return s, nil
}

// source resolves what a create restores from: the snapshot dir, the
// disk overlay to copy, the rootfs base and the template's meta.
func (r *Runtime) source(spec runtime.CreateSpec) (snap, overlay string, tm templateMeta, err error) {
	tid := spec.TemplateID
	if spec.SnapshotID != "" {
		if err = checkID("snapshot", spec.SnapshotID); err != nil {
			return
		}
		d := r.snapDir(spec.SnapshotID)
		var sm snapMeta
		if err = readJSON(filepath.Join(d, "meta.json"), &sm); err != nil {
			err = errs.E(errs.NotFound, "snapshot %s not found", spec.SnapshotID)
			return
		}
		tid = sm.TemplateID
		snap, overlay = filepath.Join(d, "snap"), filepath.Join(d, "disk.overlay")
	}
	if err = checkID("template", tid); err != nil {
		return
	}
	if err = readJSON(filepath.Join(r.tplDir(tid), "template.json"), &tm); err != nil {
		err = errs.E(errs.NotFound, "template %s is not baked", tid)
		return
	}
	if snap == "" {
		snap, overlay = filepath.Join(r.tplDir(tid), "snap"), filepath.Join(r.tplDir(tid), "disk.overlay")
	}
	return
}

// Create implements runtime.Runtime.
func (r *Runtime) Create(ctx context.Context, spec runtime.CreateSpec) (runtime.Info, error) {
	if err := checkID("sandbox", spec.ID); err != nil {
		return runtime.Info{}, err
	}
	snap, overlay, tm, err := r.source(spec)
	if err != nil {
		return runtime.Info{}, err
	}
	r.mu.Lock()
	if r.sandboxes[spec.ID] != nil {
		r.mu.Unlock()
		return runtime.Info{}, errs.E(errs.AlreadyExists, "sandbox %s exists", spec.ID)
	}
	sb := &sandbox{dir: r.sbDir(spec.ID)}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	r.sandboxes[spec.ID] = sb
	r.mu.Unlock()
	ok := false
	defer func() {
		if !ok {
			r.mu.Lock()
			delete(r.sandboxes, spec.ID)
			r.mu.Unlock()
			os.RemoveAll(sb.dir)
		}
	}()
	if err := os.MkdirAll(sb.dir, 0o755); err != nil {
		return runtime.Info{}, errs.Wrap(errs.Internal, err, "sandbox dir")
	}
	ov := filepath.Join(sb.dir, "disk.overlay")
	if spec.SnapshotID == "" {
		err = r.pool.takeOverlay(spec.TemplateID, overlay, ov)
	} else {
		err = copySparse(overlay, ov)
	}
	if err != nil {
		return runtime.Info{}, err
	}
	sb.rec = record{ID: spec.ID, TemplateID: tm.ID, Net: spec.Net, Resources: spec.Resources, Labels: spec.Labels,
		Base: tm.Base, Snap: snap, Env: spec.Env, Token: spec.AccessToken}
	sb.rec.Resources.MemoryMB, sb.rec.Resources.CPUCount = tm.MemMiB, tm.VCPUs
	sb.initAuth = spec.SnapshotAccessToken
	if err := r.run(ctx, sb); err != nil {
		return runtime.Info{}, err
	}
	ok = true
	return sb.info(), nil
}

// run restores sb.rec.Snap in a pre-started VMM, inits the agent and
// persists the record. sb.mu is held.
func (r *Runtime) run(ctx context.Context, sb *sandbox) error {
	v, err := r.pool.get(sb.dir)
	if err != nil {
		return err
	}
	rec := &sb.rec
	tap, mac, netns := vmmspec.PrivateTap, defaultMAC, ""
	if rec.Net.Tap != "" {
		tap, netns = rec.Net.Tap, rec.Net.NetnsPath
		if rec.Net.RouterNetnsPath != "" {
			netns = rec.Net.RouterNetnsPath
		}
	}
	if rec.Net.GuestMAC != "" {
		mac = rec.Net.GuestMAC
	}
	uds := filepath.Join(sb.dir, "vsock.sock")
	os.Remove(uds)
	o := vmmapi.Options{MemMiB: rec.Resources.MemoryMB, VCPUs: rec.Resources.CPUCount,
		Disks:   []vmmapi.Disk{{Base: rec.Base, Overlay: filepath.Join(sb.dir, "disk.overlay")}},
		TapName: tap, MAC: mac, VsockUDS: uds, VsockCID: guestCID, RNG: true}
	if _, err := v.cl.Restore(ctx, vmmapi.RestoreRequest{Dir: rec.Snap, Options: &o, TapNetns: netns}); err != nil {
		v.kill()
		return err
	}
	rec.PID, rec.Socket, rec.Cgroup, rec.State, rec.StartedAt = v.pid, v.socket, v.cgroup, runtime.StateRunning, time.Now()
	auth := rec.Token
	if sb.initAuth != "" {
		auth, sb.initAuth = sb.initAuth, ""
	}
	if err := agentInitAs(ctx, uds, initBody(rec.Env, rec.Token), auth); err != nil {
		v.kill()
		return errs.Wrap(errs.Unavailable, err, "agent init after restore")
	}
	if err := writeJSON(filepath.Join(sb.dir, "sandbox.json"), rec); err != nil {
		v.kill()
		return err
	}
	return nil
}

func (s *sandbox) info() runtime.Info {
	return runtime.Info{ID: s.rec.ID, TemplateID: s.rec.TemplateID, State: s.rec.State, StartedAt: s.rec.StartedAt,
		Net: s.rec.Net, Resources: s.rec.Resources, Labels: s.rec.Labels}
}

// Pause implements runtime.Runtime: a diff snapshot (pages changed since
// the template) into sandboxes/<id>/pause, then the VMM exits.
func (r *Runtime) Pause(ctx context.Context, id string) error {
	sb, err := r.get(id)
	if err != nil {
		return err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.rec.State != runtime.StateRunning {
		return errs.E(errs.Conflict, "sandbox %s is %s", id, sb.rec.State)
	}
	dir := filepath.Join(sb.dir, "pause-"+strconv.FormatInt(time.Now().UnixNano(), 36))
	cl := vmmapi.NewClient(sb.rec.Socket)
	if _, err := cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: dir, Diff: true}); err != nil {
		return err
	}
	r.stopVMM(sb.rec.PID, sb.rec.Socket)
	old := sb.rec.Snap
	sb.rec.Snap, sb.rec.State, sb.rec.PID, sb.rec.Cgroup = dir, runtime.StatePaused, 0, ""
	if strings.HasPrefix(old, sb.dir+"/") {
		os.RemoveAll(old)
	}
	return writeJSON(filepath.Join(sb.dir, "sandbox.json"), &sb.rec)
}

// Resume implements runtime.Runtime.
func (r *Runtime) Resume(ctx context.Context, id string, slot runtime.NetSlot) (runtime.Info, error) {
	sb, err := r.get(id)
	if err != nil {
		return runtime.Info{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.rec.State != runtime.StatePaused {
		return runtime.Info{}, errs.E(errs.Conflict, "sandbox %s is %s", id, sb.rec.State)
	}
	sb.rec.Net = slot
	if err := r.run(ctx, sb); err != nil {
		return runtime.Info{}, err
	}
	return sb.info(), nil
}

type snapMeta struct {
	ID         string    `json:"id"`
	SandboxID  string    `json:"sandbox_id"`
	TemplateID string    `json:"template_id"`
	CreatedAt  time.Time `json:"created_at"`
}

// Snapshot implements runtime.Runtime (fork): a full snapshot and a copy
// of the disk overlay taken while the vCPUs are stopped; the sandbox
// then runs on.
func (r *Runtime) Snapshot(ctx context.Context, id, snapshotID string) (runtime.Snapshot, error) {
	if err := checkID("snapshot", snapshotID); err != nil {
		return runtime.Snapshot{}, err
	}
	sb, err := r.get(id)
	if err != nil {
		return runtime.Snapshot{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	if sb.rec.State != runtime.StateRunning {
		return runtime.Snapshot{}, errs.E(errs.Conflict, "sandbox %s is %s", id, sb.rec.State)
	}
	d := r.snapDir(snapshotID)
	if _, err := os.Stat(d); err == nil {
		return runtime.Snapshot{}, errs.E(errs.AlreadyExists, "snapshot %s exists", snapshotID)
	}
	cl := vmmapi.NewClient(sb.rec.Socket)
	if _, err := cl.Snapshot(ctx, vmmapi.SnapshotRequest{Dir: filepath.Join(d, "snap")}); err != nil {
		os.RemoveAll(d)
		return runtime.Snapshot{}, err
	}
	err = copySparse(filepath.Join(sb.dir, "disk.overlay"), filepath.Join(d, "disk.overlay"))
	if _, rerr := cl.Resume(ctx); err == nil {
		err = rerr
	}
	if err != nil {
		os.RemoveAll(d)
		return runtime.Snapshot{}, err
	}
	m := snapMeta{ID: snapshotID, SandboxID: id, TemplateID: sb.rec.TemplateID, CreatedAt: time.Now()}
	if err := writeJSON(filepath.Join(d, "meta.json"), m); err != nil {
		os.RemoveAll(d)
		return runtime.Snapshot{}, err
	}
	return runtime.Snapshot{ID: snapshotID, SandboxID: id, TemplateID: m.TemplateID, CreatedAt: m.CreatedAt, Dir: d}, nil
}

// DeleteSnapshot implements runtime.Runtime.
func (r *Runtime) DeleteSnapshot(ctx context.Context, id string) error {
	if err := checkID("snapshot", id); err != nil {
		return err
	}
	d := r.snapDir(id)
	if _, err := os.Stat(d); err != nil {
		return errs.E(errs.NotFound, "snapshot %s not found", id)
	}
	return os.RemoveAll(d)
}

// Destroy implements runtime.Runtime. It is idempotent: an unknown (or
// already destroyed) sandbox is not an error.
func (r *Runtime) Destroy(ctx context.Context, id string) error {
	if err := checkID("sandbox", id); err != nil {
		return err
	}
	sb, err := r.get(id)
	if err != nil {
		os.RemoveAll(r.sbDir(id))
		return nil
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	r.stopVMM(sb.rec.PID, sb.rec.Socket)
	r.mu.Lock()
	delete(r.sandboxes, id)
	r.mu.Unlock()
	if err := os.RemoveAll(sb.dir); err != nil {
		return errs.Wrap(errs.Internal, err, "remove sandbox %s", id)
	}
	return nil
}

// Dial implements runtime.Runtime: hybrid vsock (CONNECT port).
func (r *Runtime) Dial(ctx context.Context, id string, port int) (net.Conn, error) {
	sb, err := r.get(id)
	if err != nil {
		return nil, err
	}
	sb.mu.Lock()
	st := sb.rec.State
	sb.mu.Unlock()
	if st != runtime.StateRunning {
		return nil, errs.E(errs.Conflict, "sandbox %s is %s", id, st)
	}
	if port < 1 || port > 65535 {
		return nil, errs.E(errs.InvalidArgument, "port %d", port)
	}
	return DialVsock(ctx, filepath.Join(sb.dir, "vsock.sock"), port)
}

// DialVsock connects to guest port through a hybrid vsock unix socket:
// write "CONNECT <port>\n", read "OK <host port>\n".
func DialVsock(ctx context.Context, uds string, port int) (net.Conn, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", uds)
	if err != nil {
		return nil, errs.Wrap(errs.Unavailable, err, "vsock")
	}
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(10 * time.Second))
	}
	if _, err := fmt.Fprintf(c, "CONNECT %d\n", port); err != nil {
		c.Close()
		return nil, errs.Wrap(errs.Unavailable, err, "vsock connect")
	}
	br := bufio.NewReaderSize(c, 64)
	line, err := br.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "OK ") {
		c.Close()
		return nil, errs.E(errs.Unavailable, "vsock connect to port %d refused (%q, %v)", port, strings.TrimSpace(line), err)
	}
	c.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		// Bytes the guest sent right after OK stay in front.
		b, _ := br.Peek(br.Buffered())
		return &prefixConn{Conn: c, pre: append([]byte(nil), b...)}, nil
	}
	return c, nil
}

type prefixConn struct {
	net.Conn
	pre []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.pre) > 0 {
		n := copy(b, p.pre)
		p.pre = p.pre[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

func vsockHTTP(uds string, port int) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return DialVsock(ctx, uds, port)
		},
		DisableKeepAlives: true,
	}}
}

// probe polls GET path on guest port until it answers 2xx.
func probe(ctx context.Context, uds string, port int, path string) error {
	hc := vsockHTTP(uds, port)
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://sandbox"+path, nil)
		resp, err := hc.Do(req)
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return nil
			}
			err = fmt.Errorf("HTTP %d", resp.StatusCode)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (last: %v)", ctx.Err(), last)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// InitBody is what the node sends to cube-agent's POST /init after a
// restore: the host's wall-clock time and 64 fresh random bytes (the
// agent steps the clock and reseeds the kernel RNG before anything
// else), plus the sandbox's environment and token.
func initBody(env map[string]string, token string) map[string]any {
	ent := make([]byte, 64)
	rand.Read(ent)
	b := map[string]any{
		"timestamp": time.Now().UTC().Format(time.RFC3339Nano),
		"entropy":   base64.StdEncoding.EncodeToString(ent),
	}
	if len(env) > 0 {
		b["envVars"] = env
	}
	if token != "" {
		b["accessToken"] = token
	}
	return b
}

// agentInit posts body to /init on the envd port, retrying while the
// agent's vsock listener comes back after the transport reset.
func agentInit(ctx context.Context, uds string, body map[string]any) error {
	tok, _ := body["accessToken"].(string)
	return agentInitAs(ctx, uds, body, tok)
}

// agentInitAs is agentInit presenting auth as X-Access-Token (the token the
// agent holds, "" = none).
func agentInitAs(ctx context.Context, uds string, body map[string]any, auth string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	raw, _ := json.Marshal(body)
	hc := vsockHTTP(uds, runtime.EnvdPort)
	var last error
	for {
		// Time and entropy are taken fresh on each attempt.
		if last != nil {
			body["timestamp"] = time.Now().UTC().Format(time.RFC3339Nano)
			raw, _ = json.Marshal(body)
		}
		req, _ := http.NewRequestWithContext(ctx, "POST", "http://sandbox/init", bytes.NewReader(raw))
		req.Header.Set("Content-Type", "application/json")
		if auth != "" {
			req.Header.Set("X-Access-Token", auth)
		}
		resp, err := hc.Do(req)
		if err == nil {
			msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			if resp.StatusCode/100 == 2 {
				return nil
			}
			if resp.StatusCode/100 == 4 {
				return errs.E(errs.InvalidArgument, "agent refused /init: HTTP %d: %s", resp.StatusCode, msg)
			}
			err = fmt.Errorf("HTTP %d: %s", resp.StatusCode, msg)
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent /init: %w (last: %v)", ctx.Err(), last)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// Stats implements runtime.Runtime: CPU from /proc/PID/stat between two
// calls, memory as the VMM's PSS (clones share the template's pages).
func (r *Runtime) Stats(ctx context.Context, id string) (runtime.Stats, error) {
	sb, err := r.get(id)
	if err != nil {
		return runtime.Stats{}, err
	}
	sb.mu.Lock()
	defer sb.mu.Unlock()
	s := runtime.Stats{Timestamp: time.Now(), CPUCount: sb.rec.Resources.CPUCount,
		MemTotal: uint64(sb.rec.Resources.MemoryMB) << 20}
	if fi, err := os.Stat(filepath.Join(sb.dir, "disk.overlay")); err == nil {
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			s.DiskUsed = uint64(st.Blocks) * 512
		}
	}
	if fi, err := os.Stat(sb.rec.Base); err == nil {
		s.DiskTotal = uint64(fi.Size())
	}
	if sb.rec.State != runtime.StateRunning {
		return s, nil
	}
	if m, err := readPSS(sb.rec.PID); err == nil {
		s.MemUsed = m
	}
	if cpu, err := cpuTicks(sb.rec.PID); err == nil {
		now := time.Now()
		if !sb.rec.lastTime.IsZero() {
			dt := now.Sub(sb.rec.lastTime).Seconds()
			if dt > 0 {
				s.CPUUsedPct = float64(cpu-sb.rec.lastCPU) / 100 / dt * 100 / float64(max(s.CPUCount, 1))
			}
		}
		sb.rec.lastCPU, sb.rec.lastTime = cpu, now
	}
	return s, nil
}

func readPSS(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "Pss:" {
			v, err := strconv.ParseUint(f[1], 10, 64)
			return v << 10, err
		}
	}
	return 0, errors.New("no Pss")
}

func cpuTicks(pid int) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, errors.New("bad stat")
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, errors.New("bad stat")
	}
	u, _ := strconv.ParseUint(f[11], 10, 64)
	s, _ := strconv.ParseUint(f[12], 10, 64)
	return u + s, nil
}

// List implements runtime.Runtime.
func (r *Runtime) List(ctx context.Context) ([]runtime.Info, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []runtime.Info
	for _, sb := range r.sandboxes {
		sb.mu.Lock()
		if sb.rec.ID != "" {
			out = append(out, sb.info())
		}
		sb.mu.Unlock()
	}
	return out, nil
}

// adopt loads sandboxes/<id>/sandbox.json records: running ones whose
// VMM still answers and paused ones are kept; the rest are removed.
func (r *Runtime) adopt() {
	ents, _ := os.ReadDir(filepath.Join(r.o.Dir, "sandboxes"))
	for _, e := range ents {
		dir := filepath.Join(r.o.Dir, "sandboxes", e.Name())
		var rec record
		if err := readJSON(filepath.Join(dir, "sandbox.json"), &rec); err != nil || rec.ID != e.Name() {
			r.log.Info("microvm: removing sandbox dir without a record", "dir", dir)
			os.RemoveAll(dir)
			continue
		}
		switch rec.State {
		case runtime.StateRunning:
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			st, err := vmmapi.NewClient(rec.Socket).Status(ctx)
			cancel()
			if err != nil || !alive(rec.PID) || st.PID != rec.PID || (st.State != "running" && st.State != "paused") {
				r.log.Warn("microvm: sandbox VMM is gone; removing", "id", rec.ID, "err", err)
				if err == nil && st.PID == rec.PID {
					// Ours but unusable; a pid that does not answer as
					// ours may be another process's now: left alone.
					r.stopVMM(rec.PID, rec.Socket)
				}
				os.RemoveAll(dir)
				continue
			}
			// Watch it (it is init's or a subreaper's child now): its exit
			// removes its cgroup.
			var cg *jail.Cgroup
			if rec.Cgroup != "" {
				cg, _ = jail.OpenCgroup(rec.Cgroup)
			}
			if _, err := r.supervise(rec.PID, cg); err != nil {
				r.log.Warn("microvm: cannot supervise adopted VMM", "id", rec.ID, "pid", rec.PID, "err", err)
			}
		case runtime.StatePaused:
		default:
			os.RemoveAll(dir)
			continue
		}
		r.sandboxes[rec.ID] = &sandbox{rec: rec, dir: dir}
	}
	// Pool leftovers of a previous process are stopped.
	pents, _ := os.ReadDir(filepath.Join(r.o.Dir, "pool"))
	for _, e := range pents {
		dir := filepath.Join(r.o.Dir, "pool", e.Name())
		if b, err := os.ReadFile(filepath.Join(dir, "pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && alive(pid) {
				sock := filepath.Join(dir, "vmm.sock")
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				st, err := vmmapi.NewClient(sock).Status(ctx)
				cancel()
				if err == nil && st.PID == pid {
					r.stopVMM(pid, sock)
				}
			}
		}
		os.RemoveAll(dir)
	}
	// Cgroups of VMMs that exited while no runtime watched them (rmdir
	// leaves those of live VMMs alone).
	if gone := jail.RemoveStale(r.cgPrefix); len(gone) > 0 {
		r.log.Info("microvm: removed cgroups of exited VMMs", "cgroups", gone)
	}
}

// Close implements runtime.Runtime: stops the pool, leaves sandboxes.
func (r *Runtime) Close() error {
	r.pool.close()
	return nil
}

func writeJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", " ")
	if err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return errs.Wrap(errs.Internal, err, "write %s", path)
	}
	if err := os.Rename(tmp, path); err != nil {
		return errs.Wrap(errs.Internal, err, "write %s", path)
	}
	return nil
}

func readJSON(path string, v any) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

func linkOrCopy(src, dst string) error {
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	return copySparse(src, dst)
}

// copySparse copies a (sparse) file keeping its holes (SEEK_DATA /
// SEEK_HOLE, copy_file_range: reflinks where the filesystem can).
func copySparse(src, dst string) error {
	in, err := os.Open(src)
	if errors.Is(err, os.ErrNotExist) {
		// No overlay yet (nothing written): the copy is empty too.
		return nil
	}
	if err != nil {
		return errs.Wrap(errs.Internal, err, "copy %s: %v", src, err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return errs.Wrap(errs.Internal, err, "copy %s: %v", src, err)
	}
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "copy to %s: %v", dst, err)
	}
	fail := func(err error) error {
		out.Close()
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "copy %s to %s: %v", src, dst, err)
	}
	size := st.Size()
	if err := out.Truncate(size); err != nil {
		return fail(err)
	}
	ifd, ofd := int(in.Fd()), int(out.Fd())
	plain := false
	var buf []byte
	for off := int64(0); off < size; {
		data, err := unix.Seek(ifd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break
		}
		if err != nil {
			return fail(err)
		}
		hole, err := unix.Seek(ifd, data, unix.SEEK_HOLE)
		if err != nil {
			return fail(err)
		}
		for p := data; p < hole; {
			var n int
			if !plain {
				ip, op := p, p
				n, err = unix.CopyFileRange(ifd, &ip, ofd, &op, int(min(hole-p, 1<<30)), 0)
				if err == unix.EXDEV || err == unix.EINVAL || err == unix.ENOSYS || err == unix.EOPNOTSUPP {
					plain, err = true, nil // another filesystem: read and write
					continue
				}
			} else {
				if buf == nil {
					buf = make([]byte, 1<<20)
				}
				n, err = unix.Pread(ifd, buf[:min(hole-p, int64(len(buf)))], p)
				if err == nil && n > 0 {
					n, err = unix.Pwrite(ofd, buf[:n], p)
				}
			}
			if err != nil || n == 0 {
				if err == nil {
					err = io.ErrUnexpectedEOF
				}
				return fail(err)
			}
			p += int64(n)
		}
		off = hole
	}
	if err := out.Close(); err != nil {
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "copy to %s: %v", dst, err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return errs.Wrap(errs.Internal, err, "copy to %s: %v", dst, err)
	}
	return nil
}

// Dir is the runtime's state directory.
func (r *Runtime) Dir() string { return r.o.Dir }
