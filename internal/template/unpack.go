//go:build linux

package template

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
)

// Whiteout markers of the OCI image layer format.
const (
	whiteoutPrefix = ".wh."
	opaqueWhiteout = ".wh..wh..opq"
)

// unpacker applies OCI layers, in order, to a root directory. Every path
// is resolved with openat2(RESOLVE_IN_ROOT): absolute symlinks and ".."
// planted by an earlier entry or layer are resolved inside the root, so a
// hostile image cannot write, link or delete outside it. Device nodes are
// skipped (a sandbox's /dev is its own).
type unpacker struct {
	root    *os.File
	limit   int64 // bytes of file data allowed in total (0: unlimited)
	used    int64
	layer   map[string]bool // paths created by the layer being applied
	Skipped []string
}

func newUnpacker(rootDir string, limit int64) (*unpacker, error) {
	f, err := os.Open(rootDir)
	if err != nil {
		return nil, err
	}
	return &unpacker{root: f, limit: limit}, nil
}

func (u *unpacker) Close() error { return u.root.Close() }

// cleanName maps a tar entry name to a path relative to the root ("" for
// the root itself).
func cleanName(name string) string {
	return strings.TrimPrefix(path.Clean("/"+name), "/")
}

// openDir opens directory rel (relative to the root, resolved in it).
func (u *unpacker) openDir(rel string) (int, error) {
	if rel == "" || rel == "." {
		return unix.Dup(int(u.root.Fd()))
	}
	return unix.Openat2(int(u.root.Fd()), rel, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
}

// mkdirAll makes directory rel and its parents, resolving each in the root.
func (u *unpacker) mkdirAll(rel string) (int, error) {
	fd, err := u.openDir(rel)
	if err == nil || !errors.Is(err, unix.ENOENT) {
		return fd, err
	}
	parent, base := path.Split(rel)
	pfd, err := u.mkdirAll(strings.TrimSuffix(parent, "/"))
	if err != nil {
		return -1, err
	}
	defer unix.Close(pfd)
	if err := unix.Mkdirat(pfd, base, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
		return -1, err
	}
	return u.openDir(rel)
}

// removeAt removes name in directory dfd, recursively, never following a
// symlink.
func removeAt(dfd int, name string) error {
	err := unix.Unlinkat(dfd, name, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM) {
		return err
	}
	fd, err := unix.Openat(dfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	if err := removeChildren(fd, nil, ""); err != nil {
		unix.Close(fd)
		return err
	}
	unix.Close(fd)
	return unix.Unlinkat(dfd, name, unix.AT_REMOVEDIR)
}

// removeChildren removes the entries of directory fd, except those whose
// path (prefix/name) is in keep.
func removeChildren(fd int, keep map[string]bool, prefix string) error {
	rfd, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	d := os.NewFile(uintptr(rfd), "dir")
	defer d.Close()
	names, err := d.Readdirnames(-1)
	if err != nil {
		return err
	}
	for _, n := range names {
		if keep[path.Join(prefix, n)] {
			continue
		}
		if err := removeAt(fd, n); err != nil {
			return err
		}
	}
	return nil
}

// applyLayer applies one uncompressed layer tar stream.
func (u *unpacker) applyLayer(r io.Reader) error {
	u.layer = map[string]bool{}
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return errs.Wrap(errs.InvalidArgument, err, "corrupt layer")
		}
		if err := u.apply(hdr, tr); err != nil {
			return err
		}
	}
}

func (u *unpacker) apply(hdr *tar.Header, r io.Reader) error {
	rel := cleanName(hdr.Name)
	if rel == "" {
		return nil // the root itself keeps its owner and mode
	}
	dir, base := path.Split(rel)
	dir = strings.TrimSuffix(dir, "/")
	dfd, err := u.mkdirAll(dir)
	if err != nil {
		return errs.Wrap(errs.InvalidArgument, err, "layer entry %q: parent", hdr.Name)
	}
	defer unix.Close(dfd)
	bad := func(err error) error { return errs.Wrap(errs.InvalidArgument, err, "layer entry %q", hdr.Name) }

	if base == opaqueWhiteout {
		return bad(removeChildren(dfd, u.layer, dir))
	}
	if name, ok := strings.CutPrefix(base, whiteoutPrefix); ok {
		if name == "" || name == "." || name == ".." {
			return bad(fmt.Errorf("bad whiteout"))
		}
		return bad(removeAt(dfd, name))
	}
	u.layer[rel] = true

	// Replace what is there, except a directory by a directory.
	var st unix.Stat_t
	exists := unix.Fstatat(dfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil
	if exists && !(hdr.Typeflag == tar.TypeDir && st.Mode&unix.S_IFMT == unix.S_IFDIR) {
		if err := removeAt(dfd, base); err != nil {
			return bad(err)
		}
	}
	mode := uint32(hdr.Mode & 0o7777)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := unix.Mkdirat(dfd, base, 0o755); err != nil && !errors.Is(err, unix.EEXIST) {
			return bad(err)
		}
	case tar.TypeReg, tar.TypeRegA:
		if hdr.Size < 0 {
			return bad(fmt.Errorf("negative size"))
		}
		u.used += hdr.Size
		if u.limit > 0 && u.used > u.limit {
			return errs.E(errs.TooLarge, "image is larger than the %d MB allowed", u.limit>>20)
		}
		fd, err := unix.Openat(dfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return bad(err)
		}
		f := os.NewFile(uintptr(fd), base)
		n, err := io.Copy(f, io.LimitReader(r, hdr.Size))
		if err == nil && n != hdr.Size {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			f.Close()
			if errors.Is(err, unix.ENOSPC) {
				return errs.Wrap(errs.ResourceExhausted, err, "no space left unpacking the image")
			}
			return bad(err)
		}
		if err := f.Close(); err != nil {
			return bad(err)
		}
	case tar.TypeSymlink:
		if err := unix.Symlinkat(hdr.Linkname, dfd, base); err != nil {
			return bad(err)
		}
	case tar.TypeLink:
		target := cleanName(hdr.Linkname)
		tdir, tbase := path.Split(target)
		if tbase == "" {
			return bad(fmt.Errorf("hard link to the root"))
		}
		tfd, err := u.openDir(strings.TrimSuffix(tdir, "/"))
		if err != nil {
			return bad(fmt.Errorf("hard link target %q: %w", hdr.Linkname, err))
		}
		err = unix.Linkat(tfd, tbase, dfd, base, 0)
		unix.Close(tfd)
		if err != nil {
			return bad(fmt.Errorf("hard link to %q: %w", hdr.Linkname, err))
		}
		return nil // shares the target's metadata
	case tar.TypeFifo:
		if err := unix.Mknodat(dfd, base, unix.S_IFIFO|mode, 0); err != nil {
			return bad(err)
		}
	case tar.TypeChar, tar.TypeBlock:
		u.Skipped = append(u.Skipped, rel)
		delete(u.layer, rel)
		return nil
	default:
		delete(u.layer, rel)
		return nil // PAX/GNU metadata entries are consumed by archive/tar
	}
	if err := unix.Fchownat(dfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return bad(err)
	}
	if hdr.Typeflag != tar.TypeSymlink {
		if err := unix.Fchmodat(dfd, base, mode, 0); err != nil {
			return bad(err)
		}
	}
	if !hdr.ModTime.IsZero() {
		ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
		unix.UtimesNanoAt(dfd, base, ts, unix.AT_SYMLINK_NOFOLLOW)
	}
	return nil
}
