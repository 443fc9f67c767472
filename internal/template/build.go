//go:build linux

package template

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
	"github.com/cubesandbox/cube/internal/runtime"
)

// Builder builds templates: rootfs and ext4 artifacts, then the runtime's
// bake. Records go to Catalog as the build progresses.
type Builder struct {
	DataDir    string // artifacts in DataDir/templates/artifacts/<digest>
	CacheDir   string // debootstrap output in CacheDir/rootfs
	AgentPath  string // static cube-agent binary injected in every template
	Mirror     string // Debian mirror ("" = the machine's)
	Runtime    runtime.Runtime
	Catalog    Catalog
	MaxImageMB int // unpacked image size limit (default 8192)
	Log        *slog.Logger
	// OnUpdate, if set, sees every record change.
	OnUpdate func(Record)
}

// ImageRequest asks for a template from an OCI image.
type ImageRequest struct {
	TemplateID string
	Source     ImageSource
	CPUCount   int
	MemoryMB   int
	DiskMB     int // writable layer size
	Env        map[string]string
	// StartCmd (argv) is started by the agent in the background before the
	// snapshot, so every sandbox has it running (E2B's startCmd). The
	// image's own entrypoint and cmd are kept in the record, not run.
	StartCmd []string
	// ReadyCmd is a shell command run in the sandbox until it exits 0
	// before the snapshot, bounded by ReadyTimeout (E2B's readyCmd).
	ReadyCmd     string
	ReadyTimeout time.Duration
	ExposePorts  []int
	ProbePort    int
	ProbePath    string
	JobID        string // optional: a job id chosen by the caller
}

// Defaults for new templates.
const (
	DefaultCPUCount = 2
	DefaultMemoryMB = 512
	DefaultDiskMB   = 1024
	defaultMaxMB    = 8192
	builderVersion  = "cube-template-v1"
)

func newJobID() string {
	var b [8]byte
	rand.Read(b[:])
	return "job-" + hex.EncodeToString(b[:])
}

func (b *Builder) log() *slog.Logger {
	if b.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return b.Log
}

// set records a phase change (and progress) in the catalog.
func (b *Builder) set(ctx context.Context, r *Record, p Phase, frac float64, note string) {
	r.Phase, r.Progress, r.Note = p, frac, note
	if err := b.Catalog.Put(context.WithoutCancel(ctx), *r); err != nil {
		b.log().Warn("template catalog update failed", "template", r.ID, "err", err)
	}
	if b.OnUpdate != nil {
		b.OnUpdate(*r)
	}
}

// Prepare validates and records a new build in PENDING (so that a watcher
// can follow it by JobID), returning the record.
func (b *Builder) prepare(ctx context.Context, id, source string, aliases []string, allowRebuild bool, jobID string) (Record, error) {
	if !ValidID(id) {
		return Record{}, errs.E(errs.InvalidArgument, "bad template id %q (lower-case letters, digits, ._-)", id)
	}
	if old, err := b.Catalog.Get(ctx, id); err == nil {
		if !old.Phase.Done() && time.Since(old.UpdatedAt) < 10*time.Minute {
			return Record{}, errs.E(errs.Conflict, "template %s is being built (job %s)", id, old.JobID)
		}
		if old.Phase == PhaseReady && !allowRebuild {
			return Record{}, errs.E(errs.AlreadyExists, "template %s already exists; delete it first", id)
		}
	}
	if jobID == "" {
		jobID = newJobID()
	}
	r := Record{ID: id, Aliases: aliases, JobID: jobID, Source: source, CreatedAt: time.Now().UTC()}
	b.set(ctx, &r, PhasePending, 0, "")
	return r, nil
}

// fail ends a build with reason.
func (b *Builder) fail(ctx context.Context, r *Record, err error) (Record, error) {
	// The whole chain: the reason is for the operator, who needs the cause.
	r.Reason = err.Error()
	b.set(ctx, r, PhaseFailed, 0, "")
	b.log().Warn("template build failed", "template", r.ID, "job", r.JobID, "err", err)
	return *r, err
}

// CreateBuiltin builds (or finds ready) built-in recipe name.
func (b *Builder) CreateBuiltin(ctx context.Context, name string) (Record, error) {
	rc, ok := Builtin(name)
	if !ok {
		return Record{}, errs.E(errs.NotFound, "no built-in template %q (have %s)", name, strings.Join(BuiltinNames(), ", "))
	}
	agentSum, err := fileSHA(b.AgentPath)
	if err != nil {
		return Record{}, errs.Wrap(errs.FailedPrecondition, err, "cube-agent binary %q", b.AgentPath)
	}
	mirror := b.Mirror
	if mirror == "" {
		if mirror, err = DebianMirror(rc.Suite); err != nil {
			return Record{}, err
		}
	}
	digest := artifactDigest("recipe:"+rc.Hash(mirror), agentSum)
	if old, err := b.Catalog.Get(ctx, rc.Name); err == nil && old.Phase == PhaseReady && old.Digest == digest {
		// The artifacts are ready; make sure this runtime has baked them
		// too (a no-op when it has: BakeTemplate is idempotent per id),
		// e.g. after switching the server between gvisor and microvm.
		if b.Runtime == nil {
			return old, nil
		}
		if err := b.Runtime.BakeTemplate(ctx, b.runtimeTemplate(ctx, &old, old.RootfsDir, old.Ext4Image, rc.ExtraProbes)); err != nil {
			return b.fail(ctx, &old, err)
		}
		if old.Phase != PhaseReady {
			b.set(ctx, &old, PhaseReady, 1, "")
		}
		return old, nil
	}
	r, err := b.prepare(ctx, rc.Name, "builtin:"+rc.Name, rc.Aliases, true, "")
	if err != nil {
		return r, err
	}
	r.CPUCount, r.MemoryMB, r.DiskMB = DefaultCPUCount, rc.MemoryMB, rc.DiskMB
	r.ProbePort, r.ProbePath = runtime.EnvdPort, "/health"
	r.ExposePorts = rc.ExtraProbes
	r.Workdir, r.User = "/home/user", "user"
	b.set(ctx, &r, PhasePulling, 0, "debootstrap "+rc.Suite+" from "+mirror)
	cached, err := BuiltinRootfs(ctx, b.CacheDir, mirror, rc, func(note string, f float64) {
		b.set(ctx, &r, PhasePulling, f, note)
	})
	if err != nil {
		return b.fail(ctx, &r, err)
	}
	produce := func(dir string) error {
		b.set(ctx, &r, PhaseUnpacking, 0, "copying "+filepath.Base(cached))
		out, err := exec.CommandContext(ctx, "cp", "-a", "--reflink=auto", cached+"/.", dir).CombinedOutput()
		if err != nil {
			return errs.Wrap(errs.Internal, err, "copy rootfs: %s", strings.TrimSpace(string(out)))
		}
		return nil
	}
	return b.finish(ctx, &r, digest, produce, rc.ExtraProbes)
}

// CreateFromImage builds a template from an OCI image.
func (b *Builder) CreateFromImage(ctx context.Context, req ImageRequest) (Record, error) {
	r, err := b.PrepareImage(ctx, req)
	if err != nil {
		return r, err
	}
	return b.RunImage(ctx, r, req)
}

// PrepareImage records a PENDING build of req (the first half of
// CreateFromImage, for callers that run the build in the background).
func (b *Builder) PrepareImage(ctx context.Context, req ImageRequest) (Record, error) {
	if req.Source.Ref == "" {
		return Record{}, errs.E(errs.InvalidArgument, "no image given")
	}
	if len(req.StartCmd) > 0 && req.StartCmd[0] == "" {
		return Record{}, errs.E(errs.InvalidArgument, "the start command names no program")
	}
	for _, a := range append([]string{req.ReadyCmd}, req.StartCmd...) {
		if strings.IndexByte(a, 0) >= 0 {
			return Record{}, errs.E(errs.InvalidArgument, "the start or ready command contains a NUL byte")
		}
	}
	if req.ReadyTimeout < 0 {
		return Record{}, errs.E(errs.InvalidArgument, "negative ready timeout")
	}
	kind, loc := req.Source.Kind()
	return b.prepare(ctx, req.TemplateID, kind+":"+loc, nil, false, req.JobID)
}

// RunImage runs a build prepared by PrepareImage to its end.
func (b *Builder) RunImage(ctx context.Context, r Record, req ImageRequest) (Record, error) {
	r.CPUCount, r.MemoryMB, r.DiskMB = orDefault(req.CPUCount, DefaultCPUCount), orDefault(req.MemoryMB, DefaultMemoryMB), orDefault(req.DiskMB, DefaultDiskMB)
	r.ProbePort, r.ProbePath = orDefault(req.ProbePort, runtime.EnvdPort), req.ProbePath
	if r.ProbePath == "" {
		r.ProbePath = "/health"
	}
	r.ExposePorts = req.ExposePorts
	agentSum, err := fileSHA(b.AgentPath)
	if err != nil {
		return b.fail(ctx, &r, errs.Wrap(errs.FailedPrecondition, err, "cube-agent binary %q", b.AgentPath))
	}
	b.set(ctx, &r, PhasePulling, 0, req.Source.Ref)
	img, err := openImage(ctx, req.Source)
	if err != nil {
		return b.fail(ctx, &r, err)
	}
	cfg, err := readConfig(img)
	if err != nil {
		return b.fail(ctx, &r, err)
	}
	imgDigest, err := img.Digest()
	if err != nil {
		return b.fail(ctx, &r, errs.Wrap(errs.InvalidArgument, err, "image digest"))
	}
	r.Entrypoint, r.Cmd, r.Workdir, r.User = cfg.Entrypoint, cfg.Cmd, cfg.Workdir, cfg.User
	r.Env = cfg.Env
	for k, v := range req.Env {
		if r.Env == nil {
			r.Env = map[string]string{}
		}
		r.Env[k] = v
	}
	r.StartCmd, r.ReadyCmd = req.StartCmd, req.ReadyCmd
	r.ReadyTimeoutSec = int((req.ReadyTimeout + time.Second - 1) / time.Second)
	limit := int64(orDefault(b.MaxImageMB, defaultMaxMB)) << 20
	produce := func(dir string) error {
		skipped, err := unpackImage(ctx, img, dir, limit, func(i, n int) {
			b.set(ctx, &r, PhaseUnpacking, float64(i)/float64(max(n, 1)), fmt.Sprintf("layer %d/%d", min(i+1, n), n))
		})
		if len(skipped) > 0 {
			b.log().Info("device nodes skipped", "template", r.ID, "count", len(skipped))
		}
		return err
	}
	digest := artifactDigest("image:"+imgDigest.String(), agentSum)
	return b.finish(ctx, &r, digest, produce, nil)
}

func orDefault(v, d int) int {
	if v > 0 {
		return v
	}
	return d
}

func artifactDigest(source, agentSum string) string {
	h := sha256.Sum256([]byte(builderVersion + "\n" + source + "\n" + agentSum))
	return hex.EncodeToString(h[:])
}

func fileSHA(p string) (string, error) {
	f, err := os.Open(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ArtifactDir is where artifacts with digest live.
func (b *Builder) ArtifactDir(digest string) string {
	return filepath.Join(b.DataDir, "templates", "artifacts", digest)
}

// finish produces the artifacts (unless they exist), then bakes.
func (b *Builder) finish(ctx context.Context, r *Record, digest string, produce func(dir string) error, extraProbes []int) (Record, error) {
	dir := b.ArtifactDir(digest)
	rootfs, img := filepath.Join(dir, "rootfs"), filepath.Join(dir, "rootfs.ext4")
	if _, err := os.Stat(filepath.Join(dir, "complete")); err != nil {
		tmp := dir + ".tmp-" + r.JobID
		if err := os.MkdirAll(filepath.Join(tmp, "rootfs"), 0o755); err != nil {
			return b.fail(ctx, r, errs.Wrap(errs.Internal, err, "artifact dir"))
		}
		defer os.RemoveAll(tmp)
		if err := produce(filepath.Join(tmp, "rootfs")); err != nil {
			return b.fail(ctx, r, err)
		}
		b.set(ctx, r, PhaseBuildingImage, 0, "injecting cube-agent")
		if err := injectAgent(filepath.Join(tmp, "rootfs"), b.AgentPath); err != nil {
			return b.fail(ctx, r, err)
		}
		size, err := dirSize(filepath.Join(tmp, "rootfs"))
		if err != nil {
			return b.fail(ctx, r, errs.Wrap(errs.Internal, err, "rootfs size"))
		}
		if max := int64(orDefault(b.MaxImageMB, defaultMaxMB)) << 20; size > max {
			return b.fail(ctx, r, errs.E(errs.TooLarge, "the root filesystem is %d MB, more than the %d MB allowed", size>>20, max>>20))
		}
		b.set(ctx, r, PhaseBuildingImage, 0.3, "mkfs.ext4")
		if err := makeExt4(ctx, filepath.Join(tmp, "rootfs"), filepath.Join(tmp, "rootfs.ext4"), size); err != nil {
			return b.fail(ctx, r, err)
		}
		if err := os.WriteFile(filepath.Join(tmp, "complete"), []byte(fmt.Sprintf("%d\n", size)), 0o644); err != nil {
			return b.fail(ctx, r, errs.Wrap(errs.Internal, err, "artifact"))
		}
		os.RemoveAll(dir)
		if err := os.Rename(tmp, dir); err != nil {
			return b.fail(ctx, r, errs.Wrap(errs.Internal, err, "artifact"))
		}
	}
	r.Digest, r.RootfsDir, r.Ext4Image = digest, rootfs, img
	if b, err := os.ReadFile(filepath.Join(dir, "complete")); err == nil {
		fmt.Sscan(string(b), &r.SizeBytes)
	}
	b.set(ctx, r, PhaseBuildingImage, 1, "")
	if b.Runtime == nil {
		return b.fail(ctx, r, errs.E(errs.FailedPrecondition, "no runtime to bake the template"))
	}
	// A rebuild replaces the runtime's snapshot.
	if err := b.Runtime.DeleteTemplate(ctx, r.ID); err != nil && !errs.Is(err, errs.NotFound) {
		return b.fail(ctx, r, err)
	}
	if err := b.Runtime.BakeTemplate(ctx, b.runtimeTemplate(ctx, r, rootfs, img, extraProbes)); err != nil {
		// The runtime left nothing; nor do we: artifacts no other
		// template has go too (the record stays, FAILED, with the reason).
		b.dropArtifacts(ctx, r.ID, digest)
		r.Digest, r.RootfsDir, r.Ext4Image, r.SizeBytes = "", "", "", 0
		return b.fail(ctx, r, err)
	}
	r.Reason = ""
	b.set(ctx, r, PhaseReady, 1, "")
	return *r, nil
}

// runtimeTemplate is what the runtime bakes for r: both the rootfs dir
// (gvisor) and the ext4 image (microvm), whichever runtime the server uses.
func (b *Builder) runtimeTemplate(ctx context.Context, r *Record, rootfs, img string, extraProbes []int) runtime.Template {
	env := map[string]string{}
	for k, v := range r.Env {
		env[k] = v
	}
	return runtime.Template{
		ID: r.ID, RootfsDir: rootfs, Ext4Image: img, Env: env, Workdir: r.Workdir,
		StartCmd: r.StartCmd, ReadyCmd: r.ReadyCmd, ReadyTimeout: time.Duration(r.ReadyTimeoutSec) * time.Second,
		Resources: runtime.Resources{CPUCount: r.CPUCount, MemoryMB: r.MemoryMB, DiskMB: r.DiskMB},
		ProbePort: r.ProbePort, ProbePath: r.ProbePath, ExtraProbes: extraProbes,
		Progress: func(step string) {
			switch step {
			case "booting":
				b.set(ctx, r, PhaseBooting, 0, "")
			case "probing":
				b.set(ctx, r, PhaseProbing, 0, fmt.Sprintf(":%d%s", r.ProbePort, r.ProbePath))
			case "ready":
				note := "start command settling"
				if r.ReadyCmd != "" {
					note = "ready: " + r.ReadyCmd
				}
				b.set(ctx, r, PhaseProbing, 0.5, note)
			case "snapshotting":
				b.set(ctx, r, PhaseSnapshotting, 0, "")
			}
		},
	}
}

// dropArtifacts removes the artifacts of digest unless a template other
// than id has them.
func (b *Builder) dropArtifacts(ctx context.Context, id, digest string) {
	all, err := b.Catalog.List(ctx)
	if err != nil {
		return
	}
	for _, o := range all {
		if o.ID != id && o.Digest == digest {
			return
		}
	}
	os.RemoveAll(b.ArtifactDir(digest))
}

// Delete removes a template: the runtime's snapshot (refused while
// sandboxes use it), the record, and its artifacts unless another template
// shares them.
func (b *Builder) Delete(ctx context.Context, idOrAlias string) error {
	r, err := b.Catalog.Resolve(ctx, idOrAlias)
	if err != nil {
		return err
	}
	if b.Runtime != nil {
		if err := b.Runtime.DeleteTemplate(ctx, r.ID); err != nil && !errs.Is(err, errs.NotFound) {
			return err
		}
	}
	if err := b.Catalog.Delete(ctx, r.ID); err != nil {
		return err
	}
	if r.Digest == "" {
		return nil
	}
	all, _ := b.Catalog.List(ctx)
	for _, o := range all {
		if o.Digest == r.Digest {
			return nil
		}
	}
	return os.RemoveAll(b.ArtifactDir(r.Digest))
}

// injectAgent puts cube-agent at runtime.DefaultAgentPath and makes sure
// the E2B default user (user, uid 1000, home /home/user) exists.
func injectAgent(rootfs, agent string) error {
	dst := filepath.Join(rootfs, runtime.DefaultAgentPath)
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return errs.Wrap(errs.Internal, err, "inject agent")
	}
	os.Remove(dst)
	in, err := os.Open(agent)
	if err != nil {
		return errs.Wrap(errs.FailedPrecondition, err, "cube-agent binary")
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "inject agent")
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return errs.Wrap(errs.Internal, err, "inject agent")
	}
	if err := out.Close(); err != nil {
		return errs.Wrap(errs.Internal, err, "inject agent")
	}
	return errs.Wrap(errs.Internal, ensureUser(rootfs), "default user")
}

func ensureUser(rootfs string) error {
	etc := filepath.Join(rootfs, "etc")
	if err := os.MkdirAll(etc, 0o755); err != nil {
		return err
	}
	shell := "/bin/sh"
	if _, err := os.Lstat(filepath.Join(rootfs, "bin/bash")); err == nil {
		shell = "/bin/bash"
	}
	appendLine := func(file, prefix, line string) error {
		p := filepath.Join(etc, file)
		b, _ := os.ReadFile(p)
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, prefix) {
				return nil
			}
		}
		if len(b) > 0 && b[len(b)-1] != '\n' {
			line = "\n" + line
		}
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return err
		}
		_, err = f.WriteString(line + "\n")
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		return err
	}
	if err := appendLine("passwd", "root:", "root:x:0:0:root:/root:"+shell); err != nil {
		return err
	}
	if err := appendLine("group", "root:", "root:x:0:"); err != nil {
		return err
	}
	if err := appendLine("passwd", "user:", "user:x:1000:1000::/home/user:"+shell); err != nil {
		return err
	}
	if err := appendLine("group", "user:", "user:x:1000:"); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(etc, "shadow")); err == nil {
		if err := appendLine("shadow", "user:", "user:*:19000:0:99999:7:::"); err != nil {
			return err
		}
	}
	if st, err := os.Stat(filepath.Join(etc, "sudoers.d")); err == nil && st.IsDir() {
		if err := os.WriteFile(filepath.Join(etc, "sudoers.d", "cube-user"), []byte("user ALL=(ALL:ALL) NOPASSWD: ALL\n"), 0o440); err != nil {
			return err
		}
	}
	for _, d := range []string{"home/user", "root", "tmp"} {
		os.MkdirAll(filepath.Join(rootfs, d), 0o755)
	}
	os.Chmod(filepath.Join(rootfs, "tmp"), 0o1777)
	return os.Chown(filepath.Join(rootfs, "home/user"), 1000, 1000)
}

// dirSize sums the allocated size of everything under dir (hard links once).
func dirSize(dir string) (int64, error) {
	var total int64
	seen := map[uint64]bool{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		if st.Nlink > 1 && !d.IsDir() {
			if seen[st.Ino] {
				return nil
			}
			seen[st.Ino] = true
		}
		total += st.Blocks * 512
		return nil
	})
	return total, err
}

// makeExt4 builds an ext4 image of dir without mounting it (mkfs.ext4 -d).
func makeExt4(ctx context.Context, dir, img string, used int64) error {
	size := used + used/4 + 64<<20
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	var st syscall.Statfs_t
	if err := syscall.Statfs(filepath.Dir(img), &st); err == nil {
		if free := int64(st.Bavail) * st.Bsize; free < size+256<<20 {
			return errs.E(errs.ResourceExhausted, "not enough disk space for the %d MB image (%d MB free)", size>>20, free>>20)
		}
	}
	f, err := os.Create(img)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "ext4 image")
	}
	err = f.Truncate(size)
	f.Close()
	if err != nil {
		return errs.Wrap(errs.Internal, err, "ext4 image")
	}
	out, err := exec.CommandContext(ctx, "mkfs.ext4", "-q", "-F", "-L", "cube-root", "-E", "root_owner=0:0", "-d", dir, img).CombinedOutput()
	if err != nil {
		os.Remove(img)
		return errs.Wrap(errs.Internal, err, "mkfs.ext4: %s", strings.TrimSpace(string(out)))
	}
	return nil
}
