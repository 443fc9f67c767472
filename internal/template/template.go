// Package template builds Cube templates and keeps their catalog.
//
// A template is a root filesystem with cube-agent injected as its init,
// produced either from an OCI image (registry reference, `docker save`
// tarball or OCI layout directory, via go-containerregistry) or from a
// built-in Debian recipe (debootstrap --variant=minbase with the machine's
// configured mirror, cached by recipe hash in the cache dir). Its artifacts
// (rootfs directory and ext4 image) are content-addressed in the data dir;
// then the runtime bakes it: boot, probe the agent, snapshot.
//
// Phases: PULLING -> UNPACKING -> BUILDING_IMAGE -> BOOTING -> PROBING ->
// SNAPSHOTTING -> READY, or FAILED with a reason.
package template

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// Phase is a template build's progress.
type Phase string

const (
	PhasePending       Phase = "PENDING"
	PhasePulling       Phase = "PULLING"
	PhaseUnpacking     Phase = "UNPACKING"
	PhaseBuildingImage Phase = "BUILDING_IMAGE"
	PhaseBooting       Phase = "BOOTING"
	PhaseProbing       Phase = "PROBING"
	PhaseSnapshotting  Phase = "SNAPSHOTTING"
	PhaseReady         Phase = "READY"
	PhaseFailed        Phase = "FAILED"
)

// Phases in order, for progress display.
var Phases = []Phase{PhasePending, PhasePulling, PhaseUnpacking, PhaseBuildingImage, PhaseBooting, PhaseProbing, PhaseSnapshotting, PhaseReady}

// Done reports whether p is final.
func (p Phase) Done() bool { return p == PhaseReady || p == PhaseFailed }

// Record is a template in the catalog.
type Record struct {
	ID      string   `json:"id"`
	Aliases []string `json:"aliases,omitempty"`
	JobID   string   `json:"jobId"`
	Source  string   `json:"source"` // "builtin:base", "image:<ref>", "tarball:<path>", "layout:<dir>"
	Phase   Phase    `json:"phase"`
	Reason  string   `json:"reason,omitempty"` // why FAILED
	// Progress within the current phase, 0..1, and a short note.
	Progress float64 `json:"progress"`
	Note     string  `json:"note,omitempty"`

	Digest    string `json:"digest,omitempty"` // content address of the artifacts
	RootfsDir string `json:"rootfsDir,omitempty"`
	Ext4Image string `json:"ext4Image,omitempty"`
	SizeBytes int64  `json:"sizeBytes,omitempty"` // unpacked root filesystem

	// Image config kept from the OCI image (or the recipe).
	Entrypoint []string          `json:"entrypoint,omitempty"`
	Cmd        []string          `json:"cmd,omitempty"`
	Env        map[string]string `json:"env,omitempty"`
	Workdir    string            `json:"workdir,omitempty"`
	User       string            `json:"user,omitempty"`

	CPUCount    int    `json:"cpuCount"`
	MemoryMB    int    `json:"memoryMB"`
	DiskMB      int    `json:"diskMB"` // writable layer size
	ExposePorts []int  `json:"exposePorts,omitempty"`
	ProbePort   int    `json:"probePort"`
	ProbePath   string `json:"probePath"`
	// StartCmd is started by the agent before the snapshot (every sandbox
	// has it running); ReadyCmd (sh -c) had to exit 0 first, within
	// ReadyTimeoutSec (0 = the runtime's default).
	StartCmd        []string `json:"startCmd,omitempty"`
	ReadyCmd        string   `json:"readyCmd,omitempty"`
	ReadyTimeoutSec int      `json:"readyTimeoutSec,omitempty"`

	CreatedAt time.Time `json:"createdAt"`
	UpdatedAt time.Time `json:"updatedAt"`
}

// Catalog stores template records. The file implementation below is the
// node-local one; the API's SQL store can implement the same interface.
type Catalog interface {
	Get(ctx context.Context, id string) (Record, error)
	// Resolve finds a template by id or alias.
	Resolve(ctx context.Context, idOrAlias string) (Record, error)
	Put(ctx context.Context, r Record) error
	List(ctx context.Context) ([]Record, error)
	Delete(ctx context.Context, id string) error
}

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9_.-]{0,62}$`)

// ValidID reports whether id can name a template.
func ValidID(id string) bool { return idRE.MatchString(id) }

// FileCatalog keeps one JSON file per template in a directory.
type FileCatalog struct {
	dir string
	mu  sync.Mutex
}

// NewFileCatalog opens the catalog in dir (created if missing).
func NewFileCatalog(dir string) (*FileCatalog, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, errs.Wrap(errs.Internal, err, "template catalog %s", dir)
	}
	return &FileCatalog{dir: dir}, nil
}

func (c *FileCatalog) path(id string) string { return filepath.Join(c.dir, id+".json") }

// Get implements Catalog.
func (c *FileCatalog) Get(ctx context.Context, id string) (Record, error) {
	if !ValidID(id) {
		return Record{}, errs.E(errs.InvalidArgument, "bad template id %q", id)
	}
	b, err := os.ReadFile(c.path(id))
	if err != nil {
		return Record{}, errs.E(errs.NotFound, "template %s not found", id)
	}
	var r Record
	if err := json.Unmarshal(b, &r); err != nil {
		return Record{}, errs.Wrap(errs.Internal, err, "template %s: corrupt record", id)
	}
	return r, nil
}

// Resolve implements Catalog.
func (c *FileCatalog) Resolve(ctx context.Context, idOrAlias string) (Record, error) {
	if r, err := c.Get(ctx, idOrAlias); err == nil || !errs.Is(err, errs.NotFound) {
		return r, err
	}
	all, err := c.List(ctx)
	if err != nil {
		return Record{}, err
	}
	for _, r := range all {
		for _, a := range r.Aliases {
			if a == idOrAlias {
				return r, nil
			}
		}
	}
	return Record{}, errs.E(errs.NotFound, "template %s not found", idOrAlias)
}

// Put implements Catalog (atomic replace).
func (c *FileCatalog) Put(ctx context.Context, r Record) error {
	if !ValidID(r.ID) {
		return errs.E(errs.InvalidArgument, "bad template id %q", r.ID)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	r.UpdatedAt = time.Now().UTC()
	b, _ := json.MarshalIndent(r, "", "  ")
	tmp, err := os.CreateTemp(c.dir, ".put-*")
	if err != nil {
		return errs.Wrap(errs.Internal, err, "template catalog")
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return errs.Wrap(errs.Internal, err, "template catalog")
	}
	tmp.Close()
	return errs.Wrap(errs.Internal, os.Rename(tmp.Name(), c.path(r.ID)), "template catalog")
}

// List implements Catalog, sorted by id.
func (c *FileCatalog) List(ctx context.Context) ([]Record, error) {
	ents, err := os.ReadDir(c.dir)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "template catalog")
	}
	var out []Record
	for _, e := range ents {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || !ValidID(id) {
			continue
		}
		if r, err := c.Get(ctx, id); err == nil {
			out = append(out, r)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Delete implements Catalog.
func (c *FileCatalog) Delete(ctx context.Context, id string) error {
	if !ValidID(id) {
		return errs.E(errs.InvalidArgument, "bad template id %q", id)
	}
	if err := os.Remove(c.path(id)); err != nil {
		if os.IsNotExist(err) {
			return errs.E(errs.NotFound, "template %s not found", id)
		}
		return errs.Wrap(errs.Internal, err, "delete template %s", id)
	}
	return nil
}
