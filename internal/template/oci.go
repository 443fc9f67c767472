//go:build linux

package template

import (
	"context"
	"fmt"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"github.com/cubesandbox/cube/internal/errs"
)

// ImageSource says where an OCI image comes from.
type ImageSource struct {
	// Ref is a registry reference ("debian:bookworm", "host:5000/x:tag"),
	// "docker-archive:PATH" (a `docker save` tarball), "oci-layout:DIR",
	// or a path: a directory is an OCI layout, a file a docker tarball.
	Ref      string
	Username string // registry credentials (else ~/.docker/config.json)
	Password string
	Insecure bool // plain HTTP registry
}

// Kind is "registry", "tarball" or "layout".
func (s ImageSource) Kind() (kind, loc string) {
	if p, ok := strings.CutPrefix(s.Ref, "docker-archive:"); ok {
		return "tarball", p
	}
	if p, ok := strings.CutPrefix(s.Ref, "oci-layout:"); ok {
		return "layout", p
	}
	if st, err := os.Stat(s.Ref); err == nil && (strings.HasPrefix(s.Ref, "/") || strings.HasPrefix(s.Ref, ".")) {
		if st.IsDir() {
			return "layout", s.Ref
		}
		return "tarball", s.Ref
	}
	return "registry", s.Ref
}

var amd64 = v1.Platform{OS: "linux", Architecture: "amd64"}

// openImage resolves the source to an image (manifests and config; layers
// are fetched when read).
func openImage(ctx context.Context, s ImageSource) (v1.Image, error) {
	kind, loc := s.Kind()
	switch kind {
	case "tarball":
		img, err := tarball.ImageFromPath(loc, nil)
		if err != nil {
			return nil, errs.Wrap(errs.InvalidArgument, err, "image tarball %s is not a readable `docker save` archive", loc)
		}
		return img, nil
	case "layout":
		idx, err := layout.ImageIndexFromPath(loc)
		if err != nil {
			return nil, errs.Wrap(errs.InvalidArgument, err, "%s is not an OCI layout directory", loc)
		}
		return imageFromIndex(idx, loc)
	}
	var opts []name.Option
	if s.Insecure {
		opts = append(opts, name.Insecure)
	}
	ref, err := name.ParseReference(loc, opts...)
	if err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "bad image reference %q", loc)
	}
	ropts := []remote.Option{remote.WithContext(ctx), remote.WithPlatform(amd64)}
	if s.Username != "" || s.Password != "" {
		ropts = append(ropts, remote.WithAuth(&authn.Basic{Username: s.Username, Password: s.Password}))
	} else {
		ropts = append(ropts, remote.WithAuthFromKeychain(authn.DefaultKeychain))
	}
	img, err := remote.Image(ref, ropts...)
	if err != nil {
		msg := err.Error()
		switch {
		case strings.Contains(msg, "MANIFEST_UNKNOWN"), strings.Contains(msg, "NAME_UNKNOWN"), strings.Contains(msg, "404"):
			return nil, errs.Wrap(errs.NotFound, err, "image %s does not exist", loc)
		case strings.Contains(msg, "UNAUTHORIZED"), strings.Contains(msg, "401"):
			return nil, errs.Wrap(errs.Unauthenticated, err, "registry refused the credentials for %s", loc)
		}
		return nil, errs.Wrap(errs.Unavailable, err, "pull %s", loc)
	}
	return img, nil
}

// imageFromIndex picks the linux/amd64 (or only) image of a layout index,
// descending into nested indexes.
func imageFromIndex(idx v1.ImageIndex, where string) (v1.Image, error) {
	m, err := idx.IndexManifest()
	if err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "%s: bad index", where)
	}
	var fallback *v1.Descriptor
	for i := range m.Manifests {
		d := m.Manifests[i]
		if d.MediaType.IsIndex() {
			sub, err := idx.ImageIndex(d.Digest)
			if err != nil {
				return nil, errs.Wrap(errs.InvalidArgument, err, "%s: nested index", where)
			}
			return imageFromIndex(sub, where)
		}
		if !d.MediaType.IsImage() {
			continue
		}
		if d.Platform == nil || d.Platform.Satisfies(amd64) {
			img, err := idx.Image(d.Digest)
			if err != nil {
				return nil, errs.Wrap(errs.InvalidArgument, err, "%s: image %s", where, d.Digest)
			}
			return img, nil
		}
		if fallback == nil {
			fallback = &d
		}
	}
	if fallback != nil {
		return nil, errs.E(errs.InvalidArgument, "%s has no linux/amd64 image (found %s)", where, fallback.Platform)
	}
	return nil, errs.E(errs.InvalidArgument, "%s holds no image", where)
}

// imageConfig is what Cube keeps of an image's config.
type imageConfig struct {
	Entrypoint, Cmd []string
	Env             map[string]string
	Workdir, User   string
}

func readConfig(img v1.Image) (imageConfig, error) {
	cf, err := img.ConfigFile()
	if err != nil {
		return imageConfig{}, errs.Wrap(errs.InvalidArgument, err, "image config")
	}
	c := imageConfig{Entrypoint: cf.Config.Entrypoint, Cmd: cf.Config.Cmd, Workdir: cf.Config.WorkingDir, User: cf.Config.User, Env: map[string]string{}}
	for _, kv := range cf.Config.Env {
		k, v, _ := strings.Cut(kv, "=")
		c.Env[k] = v
	}
	return c, nil
}

// unpackImage applies img's layers to dir; progress gets (layer i of n).
func unpackImage(ctx context.Context, img v1.Image, dir string, limit int64, progress func(i, n int)) ([]string, error) {
	layers, err := img.Layers()
	if err != nil {
		return nil, errs.Wrap(errs.InvalidArgument, err, "image layers")
	}
	u, err := newUnpacker(dir, limit)
	if err != nil {
		return nil, errs.Wrap(errs.Internal, err, "unpack")
	}
	defer u.Close()
	for i, l := range layers {
		if err := ctx.Err(); err != nil {
			return nil, errs.Wrap(errs.Canceled, err, "unpack")
		}
		progress(i, len(layers))
		rc, err := l.Uncompressed()
		if err != nil {
			return nil, errs.Wrap(errs.InvalidArgument, err, "layer %d", i+1)
		}
		err = u.applyLayer(rc)
		if cerr := rc.Close(); err == nil && cerr != nil {
			err = errs.Wrap(errs.InvalidArgument, cerr, "layer %d: digest or stream", i+1)
		}
		if err != nil {
			return nil, errs.Wrap(errs.KindOf(err), err, "layer %d: %s", i+1, errs.Message(err))
		}
	}
	progress(len(layers), len(layers))
	return u.Skipped, nil
}

func (c imageConfig) String() string {
	return fmt.Sprintf("entrypoint=%q cmd=%q workdir=%q user=%q", c.Entrypoint, c.Cmd, c.Workdir, c.User)
}
