//go:build linux

package envd

import (
	"encoding/base64"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
)

// User is an OS account processes and file operations run as.
type User struct {
	Name   string
	UID    uint32
	GID    uint32
	Groups []uint32
	Home   string
}

// LookupUser resolves an account by name from /etc/passwd and /etc/group
// (pure Go: the agent is built with CGO_ENABLED=0).
func LookupUser(name string) (*User, error) {
	if name == "" || strings.ContainsAny(name, "\x00/:") {
		return nil, errs.E(errs.Unauthenticated, "invalid user %q", name)
	}
	u, err := user.Lookup(name)
	if err != nil {
		return nil, errs.Wrap(errs.Unauthenticated, err, "user %q not found", name)
	}
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return nil, errs.E(errs.Unauthenticated, "user %q has a non-numeric uid/gid", name)
	}
	out := &User{Name: name, UID: uint32(uid), GID: uint32(gid), Home: u.HomeDir}
	if gids, err := u.GroupIds(); err == nil {
		for _, g := range gids {
			if n, err := strconv.ParseUint(g, 10, 32); err == nil {
				out.Groups = append(out.Groups, uint32(n))
			}
		}
	}
	if out.Home == "" {
		out.Home = "/"
	}
	return out, nil
}

// userFromBasicAuth extracts the user name of an `Authorization: Basic
// base64("<user>:")` header; "" when the header is absent.
func userFromBasicAuth(h string) (string, error) {
	if h == "" {
		return "", nil
	}
	const p = "Basic "
	if len(h) < len(p) || !strings.EqualFold(h[:len(p)], p) {
		return "", errs.E(errs.Unauthenticated, "unsupported Authorization scheme")
	}
	raw, err := base64.StdEncoding.DecodeString(strings.TrimSpace(h[len(p):]))
	if err != nil {
		return "", errs.E(errs.Unauthenticated, "malformed Basic authorization")
	}
	name, _, _ := strings.Cut(string(raw), ":")
	if name == "" {
		return "", errs.E(errs.Unauthenticated, "empty user in Basic authorization")
	}
	return name, nil
}

// EnsureUser creates the account name with home /home/<name> if it does
// not exist (useradd when present, else by appending to /etc/passwd and
// /etc/group), as E2B templates expect a `user` account.
func EnsureUser(name string) error {
	if _, err := user.Lookup(name); err == nil {
		return nil
	}
	home := "/home/" + name
	if path, err := exec.LookPath("useradd"); err == nil {
		out, err := exec.Command(path, "--create-home", "--home-dir", home, "--shell", "/bin/bash", "--user-group", name).CombinedOutput()
		if err == nil {
			return nil
		}
		if _, lerr := user.Lookup(name); lerr == nil {
			return nil
		}
		return errs.Wrap(errs.Internal, fmt.Errorf("%v: %s", err, out), "useradd %s", name)
	}
	id := 1000
	for ; id < 60000; id++ {
		_, e1 := user.LookupId(strconv.Itoa(id))
		_, e2 := user.LookupGroupId(strconv.Itoa(id))
		if e1 != nil && e2 != nil {
			break
		}
	}
	if err := appendLine("/etc/group", fmt.Sprintf("%s:x:%d:", name, id)); err != nil {
		return err
	}
	if err := appendLine("/etc/passwd", fmt.Sprintf("%s:x:%d:%d::%s:/bin/bash", name, id, id, home)); err != nil {
		return err
	}
	if err := os.MkdirAll(home, 0o750); err != nil {
		return errs.Wrap(errs.Internal, err, "create %s", home)
	}
	return os.Chown(home, id, id)
}

func appendLine(path, line string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return errs.Wrap(errs.Internal, err, "open %s", path)
	}
	defer f.Close()
	_, err = f.WriteString(line + "\n")
	return errs.Wrap(errs.Internal, err, "append to %s", path)
}

// Credential returns the SysProcAttr credential that makes a child run as
// u, or nil when the agent already is u (or cannot switch).
func (u *User) Credential() *syscall.Credential {
	if os.Geteuid() != 0 || u.UID == uint32(os.Geteuid()) {
		return nil
	}
	return &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: u.Groups}
}

var rootGroups = sync.OnceValue(func() []int {
	g, _ := unix.Getgroups()
	return g
})

// asUser runs fn with this OS thread's filesystem identity (fsuid, fsgid,
// supplementary groups) switched to u, so the kernel applies u's
// permissions to every path fn touches, symlinks included: the agent runs
// as root but a client acting as `user` can read and write only what
// `user` may. When the switch is impossible (not root, or the kernel lacks
// setfsuid, as some gVisor versions do) fn runs unswitched, and the
// callers chown what they create.
func asUser(u *User, fn func() error) error {
	if u == nil || os.Geteuid() != 0 || u.UID == 0 {
		return fn()
	}
	runtime.LockOSThread()
	groups := make([]int, len(u.Groups))
	for i, g := range u.Groups {
		groups[i] = int(g)
	}
	if len(groups) == 0 {
		groups = []int{int(u.GID)}
	}
	if unix.Setgroups(groups) == nil {
		unix.SetfsgidRetGid(int(u.GID))
		unix.SetfsuidRetUid(int(u.UID))
	}
	err := fn()
	// Restore root; if that fails keep the thread locked so that it dies
	// with this goroutine instead of serving others with u's identity.
	unix.SetfsuidRetUid(0)
	unix.SetfsgidRetGid(0)
	rerr := unix.Setgroups(rootGroups())
	if cur, _ := unix.SetfsuidRetUid(-1); cur == 0 && rerr == nil {
		runtime.UnlockOSThread()
	}
	return err
}

// chownAs gives path to u when the agent is root and u is not.
func chownAs(u *User, path string) {
	if u == nil || os.Geteuid() != 0 || u.UID == 0 {
		return
	}
	_ = os.Lchown(path, int(u.UID), int(u.GID))
}

// mkdirAllAs creates dir and its missing parents as u, owned by u.
func mkdirAllAs(u *User, dir string) error {
	var missing []string
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Lstat(d); err == nil || d == "/" || d == "." {
			break
		}
		missing = append(missing, d)
	}
	err := asUser(u, func() error { return os.MkdirAll(dir, 0o755) })
	if err != nil {
		return err
	}
	for _, d := range missing {
		chownAs(u, d)
	}
	return nil
}

// resolvePath maps a client path to an absolute, cleaned path: `~` and
// `~/x` are under u's home, relative paths are relative to u's home.
func resolvePath(p string, u *User) (string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return "", errs.E(errs.InvalidArgument, "path contains a NUL byte")
	}
	if len(p) > 4096 {
		return "", errs.E(errs.InvalidArgument, "path too long")
	}
	home := "/"
	if u != nil && u.Home != "" {
		home = u.Home
	}
	switch {
	case p == "":
		return "", errs.E(errs.InvalidArgument, "path is empty")
	case p == "~":
		p = home
	case strings.HasPrefix(p, "~/"):
		p = filepath.Join(home, p[2:])
	case !filepath.IsAbs(p):
		p = filepath.Join(home, p)
	}
	return filepath.Clean(p), nil
}

// fsErr maps an OS error on path to an errs kind.
func fsErr(err error, op, path string) error {
	if err == nil {
		return nil
	}
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return errs.Wrap(errs.NotFound, err, "%s: %s: no such file or directory", op, path)
	case errors.Is(err, fs.ErrPermission):
		return errs.Wrap(errs.PermissionDenied, err, "%s: %s: permission denied", op, path)
	case errors.Is(err, fs.ErrExist):
		return errs.Wrap(errs.AlreadyExists, err, "%s: %s: already exists", op, path)
	case errors.Is(err, syscall.ENOTDIR):
		return errs.Wrap(errs.InvalidArgument, err, "%s: %s: not a directory", op, path)
	case errors.Is(err, syscall.EISDIR):
		return errs.Wrap(errs.InvalidArgument, err, "%s: %s: is a directory", op, path)
	case errors.Is(err, syscall.ENOSPC), errors.Is(err, syscall.EDQUOT):
		return errs.Wrap(errs.ResourceExhausted, err, "%s: %s: not enough space", op, path)
	case errors.Is(err, syscall.ENAMETOOLONG), errors.Is(err, syscall.ELOOP), errors.Is(err, syscall.EINVAL):
		return errs.Wrap(errs.InvalidArgument, err, "%s: %s: invalid path", op, path)
	}
	return errs.Wrap(errs.Internal, err, "%s: %s", op, path)
}
