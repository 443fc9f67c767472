//go:build linux

package envd

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/cubesandbox/cube/internal/errs"
	pb "github.com/cubesandbox/cube/proto/filesystem"
)

type filesystemService struct {
	s *Server
}

var (
	nameCacheMu sync.Mutex
	userNames   = map[uint32]string{}
	groupNames  = map[uint32]string{}
)

func ownerName(uid uint32) string {
	return cachedName(userNames, uid, func(id string) (string, error) {
		u, err := user.LookupId(id)
		if err != nil {
			return "", err
		}
		return u.Username, nil
	})
}

func groupName(gid uint32) string {
	return cachedName(groupNames, gid, func(id string) (string, error) {
		g, err := user.LookupGroupId(id)
		if err != nil {
			return "", err
		}
		return g.Name, nil
	})
}

// cachedName returns the name lookup finds for id (the number itself when
// lookup fails), remembering it in cache.
func cachedName(cache map[uint32]string, id uint32, lookup func(string) (string, error)) string {
	nameCacheMu.Lock()
	defer nameCacheMu.Unlock()
	if n, ok := cache[id]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(id), 10)
	if name, err := lookup(n); err == nil {
		n = name
	}
	cache[id] = n
	return n
}

// entryInfo describes path (not following a final symlink).
func entryInfo(path string) (*pb.EntryInfo, error) {
	fi, err := os.Lstat(path)
	if err != nil {
		return nil, fsErr(err, "stat", path)
	}
	return entryFromInfo(path, fi), nil
}

func entryFromInfo(path string, fi fs.FileInfo) *pb.EntryInfo {
	e := &pb.EntryInfo{
		Name:         fi.Name(),
		Path:         path,
		Size:         fi.Size(),
		Mode:         uint32(fi.Mode().Perm()),
		Permissions:  fi.Mode().String(),
		ModifiedTime: timestamppb.New(fi.ModTime()),
	}
	if path == "/" {
		e.Name = "/"
	}
	switch m := fi.Mode(); {
	case m.IsRegular():
		e.Type = pb.FileType_FILE_TYPE_FILE
	case m.IsDir():
		e.Type = pb.FileType_FILE_TYPE_DIRECTORY
	case m&fs.ModeSymlink != 0:
		e.Type = pb.FileType_FILE_TYPE_SYMLINK
		if t, err := filepath.EvalSymlinks(path); err == nil {
			e.SymlinkTarget = &t
		} else if t, err := os.Readlink(path); err == nil {
			if !filepath.IsAbs(t) {
				t = filepath.Join(filepath.Dir(path), t)
			}
			e.SymlinkTarget = &t
		}
	default:
		e.Type = pb.FileType_FILE_TYPE_FILE
	}
	if m := getMetadata(path); m != nil {
		e.Metadata = m
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		e.Owner = ownerName(st.Uid)
		e.Group = groupName(st.Gid)
	}
	return e
}

// userFor resolves the Basic-auth user of a request.
func (fsvc *filesystemService) userFor(h interface{ Get(string) string }) (*User, error) {
	name, err := userFromBasicAuth(h.Get("Authorization"))
	if err != nil {
		return nil, err
	}
	return fsvc.s.resolveUser(name)
}

// userPath resolves the Basic-auth user of a request and path as that user sees it.
func (fsvc *filesystemService) userPath(h interface{ Get(string) string }, path string) (*User, string, error) {
	u, err := fsvc.userFor(h)
	if err != nil {
		return nil, "", err
	}
	p, err := resolvePath(path, u)
	if err != nil {
		return nil, "", err
	}
	return u, p, nil
}

func (fsvc *filesystemService) Stat(ctx context.Context, req *connect.Request[pb.StatRequest]) (*connect.Response[pb.StatResponse], error) {
	u, p, err := fsvc.userPath(req.Header(), req.Msg.Path)
	if err != nil {
		return nil, connectErr(err)
	}
	var e *pb.EntryInfo
	err = asUser(u, func() (err error) { e, err = entryInfo(p); return })
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.StatResponse{Entry: e}), nil
}

func (fsvc *filesystemService) MakeDir(ctx context.Context, req *connect.Request[pb.MakeDirRequest]) (*connect.Response[pb.MakeDirResponse], error) {
	u, p, err := fsvc.userPath(req.Header(), req.Msg.Path)
	if err != nil {
		return nil, connectErr(err)
	}
	if fi, err := os.Stat(p); err == nil {
		if fi.IsDir() {
			return nil, connectErr(errs.E(errs.AlreadyExists, "directory %s already exists", p))
		}
		return nil, connectErr(errs.E(errs.InvalidArgument, "%s exists and is not a directory", p))
	}
	if err := mkdirAllAs(u, p); err != nil {
		return nil, connectErr(fsErr(err, "mkdir", p))
	}
	e, err := entryInfo(p)
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.MakeDirResponse{Entry: e}), nil
}

func (fsvc *filesystemService) Move(ctx context.Context, req *connect.Request[pb.MoveRequest]) (*connect.Response[pb.MoveResponse], error) {
	u, src, err := fsvc.userPath(req.Header(), req.Msg.Source)
	if err != nil {
		return nil, connectErr(err)
	}
	dst, err := resolvePath(req.Msg.Destination, u)
	if err != nil {
		return nil, connectErr(err)
	}
	if _, err := os.Lstat(src); err != nil {
		return nil, connectErr(fsErr(err, "move", src))
	}
	if err := mkdirAllAs(u, filepath.Dir(dst)); err != nil {
		return nil, connectErr(fsErr(err, "mkdir", filepath.Dir(dst)))
	}
	if err := asUser(u, func() error { return os.Rename(src, dst) }); err != nil {
		return nil, connectErr(fsErr(err, "move", src))
	}
	e, err := entryInfo(dst)
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(&pb.MoveResponse{Entry: e}), nil
}

func (fsvc *filesystemService) ListDir(ctx context.Context, req *connect.Request[pb.ListDirRequest]) (*connect.Response[pb.ListDirResponse], error) {
	u, p, err := fsvc.userPath(req.Header(), req.Msg.Path)
	if err != nil {
		return nil, connectErr(err)
	}
	depth := int(req.Msg.Depth)
	if depth <= 0 {
		depth = 1
	}
	if depth > 64 {
		depth = 64
	}
	out := &pb.ListDirResponse{}
	err = asUser(u, func() error {
		root, err := filepath.EvalSymlinks(p)
		if err != nil {
			return fsErr(err, "list", p)
		}
		fi, err := os.Stat(root)
		if err != nil {
			return fsErr(err, "list", p)
		}
		if !fi.IsDir() {
			return errs.E(errs.InvalidArgument, "%s is not a directory", p)
		}
		var walk func(dir, shown string, level int) error
		walk = func(dir, shown string, level int) error {
			ents, err := os.ReadDir(dir)
			if err != nil {
				if level > 1 {
					return nil // unreadable subdirectory: list what we can
				}
				return fsErr(err, "list", p)
			}
			for _, de := range ents {
				full := filepath.Join(dir, de.Name())
				info, err := de.Info()
				if err != nil {
					continue
				}
				out.Entries = append(out.Entries, entryFromInfo(filepath.Join(shown, de.Name()), info))
				if de.IsDir() && level < depth {
					if err := walk(full, filepath.Join(shown, de.Name()), level+1); err != nil {
						return err
					}
				}
			}
			return nil
		}
		return walk(root, p, 1)
	})
	if err != nil {
		return nil, connectErr(err)
	}
	return connect.NewResponse(out), nil
}

func (fsvc *filesystemService) Remove(ctx context.Context, req *connect.Request[pb.RemoveRequest]) (*connect.Response[pb.RemoveResponse], error) {
	u, p, err := fsvc.userPath(req.Header(), req.Msg.Path)
	if err != nil {
		return nil, connectErr(err)
	}
	if p == "/" {
		return nil, connectErr(errs.E(errs.InvalidArgument, "refusing to remove /"))
	}
	if err := asUser(u, func() error { return os.RemoveAll(p) }); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, connectErr(fsErr(err, "remove", p))
	}
	return connect.NewResponse(&pb.RemoveResponse{}), nil
}

// watchTarget validates a directory to watch.
func (fsvc *filesystemService) watchTarget(h interface{ Get(string) string }, path string) (string, error) {
	u, p, err := fsvc.userPath(h, path)
	if err != nil {
		return "", err
	}
	err = asUser(u, func() error {
		fi, err := os.Stat(p)
		if err != nil {
			return fsErr(err, "watch", p)
		}
		if !fi.IsDir() {
			return errs.E(errs.InvalidArgument, "%s is not a directory", p)
		}
		_, err = os.ReadDir(p)
		return fsErr(err, "watch", p)
	})
	return p, err
}

func (fsvc *filesystemService) WatchDir(ctx context.Context, req *connect.Request[pb.WatchDirRequest], st *connect.ServerStream[pb.WatchDirResponse]) error {
	p, err := fsvc.watchTarget(req.Header(), req.Msg.Path)
	if err != nil {
		return connectErr(err)
	}
	w, err := newWatcher(p, req.Msg.Recursive, req.Msg.IncludeEntry)
	if err != nil {
		return connectErr(err)
	}
	defer w.close()
	if err := st.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Start{Start: &pb.WatchDirResponse_StartEvent{}}}); err != nil {
		return err
	}
	ka := keepaliveInterval(req.Header().Get("Keepalive-Ping-Interval"))
	return w.stream(ctx, ka, func(ev *pb.FilesystemEvent) error {
		if ev == nil {
			return st.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Keepalive{Keepalive: &pb.WatchDirResponse_KeepAlive{}}})
		}
		return st.Send(&pb.WatchDirResponse{Event: &pb.WatchDirResponse_Filesystem{Filesystem: ev}})
	})
}

func (fsvc *filesystemService) CreateWatcher(ctx context.Context, req *connect.Request[pb.CreateWatcherRequest]) (*connect.Response[pb.CreateWatcherResponse], error) {
	p, err := fsvc.watchTarget(req.Header(), req.Msg.Path)
	if err != nil {
		return nil, connectErr(err)
	}
	w, err := newWatcher(p, req.Msg.Recursive, req.Msg.IncludeEntry)
	if err != nil {
		return nil, connectErr(err)
	}
	id := fsvc.s.watch.add(w)
	return connect.NewResponse(&pb.CreateWatcherResponse{WatcherId: id}), nil
}

func (fsvc *filesystemService) GetWatcherEvents(ctx context.Context, req *connect.Request[pb.GetWatcherEventsRequest]) (*connect.Response[pb.GetWatcherEventsResponse], error) {
	w := fsvc.s.watch.get(req.Msg.WatcherId)
	if w == nil {
		return nil, connectErr(errs.E(errs.NotFound, "watcher %q not found", req.Msg.WatcherId))
	}
	return connect.NewResponse(&pb.GetWatcherEventsResponse{Events: w.drain()}), nil
}

func (fsvc *filesystemService) RemoveWatcher(ctx context.Context, req *connect.Request[pb.RemoveWatcherRequest]) (*connect.Response[pb.RemoveWatcherResponse], error) {
	if !fsvc.s.watch.remove(req.Msg.WatcherId) {
		return nil, connectErr(errs.E(errs.NotFound, "watcher %q not found", req.Msg.WatcherId))
	}
	return connect.NewResponse(&pb.RemoveWatcherResponse{}), nil
}
