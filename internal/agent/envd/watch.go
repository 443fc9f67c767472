//go:build linux

package envd

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/cubesandbox/cube/internal/errs"
	pb "github.com/cubesandbox/cube/proto/filesystem"
)

// maxPolledEvents bounds the queue of a polling watcher (CreateWatcher).
const maxPolledEvents = 10000

// watcher turns inotify events under a directory into FilesystemEvents.
type watcher struct {
	root      string
	recursive bool
	entries   bool
	f         *os.File

	mu     sync.Mutex
	wds    map[int32]string // watch descriptor -> directory
	queue  []*pb.FilesystemEvent
	notify chan struct{}
	closed bool
	done   chan struct{}
}

const watchMask = unix.IN_CREATE | unix.IN_MODIFY | unix.IN_CLOSE_WRITE | unix.IN_DELETE | unix.IN_DELETE_SELF |
	unix.IN_MOVED_FROM | unix.IN_MOVED_TO | unix.IN_ATTRIB | unix.IN_MOVE_SELF

func newWatcher(root string, recursive, entries bool) (*watcher, error) {
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC | unix.IN_NONBLOCK)
	if err != nil {
		return nil, errs.Wrap(errs.ResourceExhausted, err, "inotify")
	}
	w := &watcher{root: root, recursive: recursive, entries: entries, f: os.NewFile(uintptr(fd), "inotify"),
		wds: map[int32]string{}, notify: make(chan struct{}, 1), done: make(chan struct{})}
	if err := w.add(root); err != nil {
		w.f.Close()
		return nil, err
	}
	if recursive {
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() && p != root {
				_ = w.add(p)
			}
			return nil
		})
	}
	go w.loop()
	return w, nil
}

func (w *watcher) add(dir string) error {
	wd, err := unix.InotifyAddWatch(int(w.f.Fd()), dir, watchMask)
	if err != nil {
		return fsErr(err, "watch", dir)
	}
	w.mu.Lock()
	w.wds[int32(wd)] = dir
	w.mu.Unlock()
	return nil
}

func (w *watcher) loop() {
	defer close(w.done)
	buf := make([]byte, 64<<10)
	for {
		n, err := w.f.Read(buf)
		if err != nil {
			return
		}
		for off := 0; off+unix.SizeofInotifyEvent <= n; {
			ev := (*unix.InotifyEvent)(unsafe.Pointer(&buf[off]))
			nameLen := int(ev.Len)
			if off+unix.SizeofInotifyEvent+nameLen > n {
				break
			}
			name := strings.TrimRight(string(buf[off+unix.SizeofInotifyEvent:off+unix.SizeofInotifyEvent+nameLen]), "\x00")
			off += unix.SizeofInotifyEvent + nameLen
			w.handle(ev.Wd, ev.Mask, name)
		}
	}
}

func (w *watcher) handle(wd int32, mask uint32, name string) {
	w.mu.Lock()
	dir, ok := w.wds[wd]
	if mask&unix.IN_IGNORED != 0 {
		delete(w.wds, wd)
	}
	w.mu.Unlock()
	if !ok {
		return
	}
	full := dir
	if name != "" {
		full = filepath.Join(dir, name)
	}
	rel, err := filepath.Rel(w.root, full)
	if err != nil || rel == "." {
		if mask&(unix.IN_DELETE_SELF|unix.IN_MOVE_SELF) == 0 {
			return
		}
		rel = ""
	}
	var t pb.EventType
	switch {
	case mask&(unix.IN_CREATE|unix.IN_MOVED_TO) != 0:
		t = pb.EventType_EVENT_TYPE_CREATE
		if w.recursive && mask&unix.IN_ISDIR != 0 {
			_ = w.add(full)
		}
	case mask&unix.IN_MODIFY != 0:
		t = pb.EventType_EVENT_TYPE_WRITE
	case mask&(unix.IN_DELETE|unix.IN_DELETE_SELF) != 0:
		t = pb.EventType_EVENT_TYPE_REMOVE
	case mask&(unix.IN_MOVED_FROM|unix.IN_MOVE_SELF) != 0:
		t = pb.EventType_EVENT_TYPE_RENAME
	case mask&unix.IN_ATTRIB != 0:
		t = pb.EventType_EVENT_TYPE_CHMOD
	default:
		return
	}
	if rel == "" {
		return
	}
	ev := &pb.FilesystemEvent{Name: rel, Type: t}
	if w.entries && t != pb.EventType_EVENT_TYPE_REMOVE && t != pb.EventType_EVENT_TYPE_RENAME {
		if e, err := entryInfo(full); err == nil {
			ev.Entry = e
		}
	}
	w.mu.Lock()
	if len(w.queue) < maxPolledEvents {
		w.queue = append(w.queue, ev)
	}
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (w *watcher) drain() []*pb.FilesystemEvent {
	w.mu.Lock()
	defer w.mu.Unlock()
	q := w.queue
	w.queue = nil
	return q
}

// stream sends events (nil = keepalive) until ctx ends or send fails.
func (w *watcher) stream(ctx context.Context, keepalive time.Duration, send func(*pb.FilesystemEvent) error) error {
	t := time.NewTicker(keepalive)
	defer t.Stop()
	for {
		select {
		case <-w.notify:
			for _, ev := range w.drain() {
				if err := send(ev); err != nil {
					return err
				}
			}
		case <-t.C:
			if err := send(nil); err != nil {
				return err
			}
		case <-w.done:
			return nil
		case <-ctx.Done():
			return nil
		}
	}
}

func (w *watcher) close() {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	w.closed = true
	w.mu.Unlock()
	w.f.Close()
	<-w.done
}

type watcherTable struct {
	mu sync.Mutex
	m  map[string]*watcher
}

func newWatcherTable() *watcherTable { return &watcherTable{m: map[string]*watcher{}} }

func (t *watcherTable) add(w *watcher) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	t.mu.Lock()
	t.m[id] = w
	t.mu.Unlock()
	return id
}

func (t *watcherTable) get(id string) *watcher {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.m[id]
}

func (t *watcherTable) remove(id string) bool {
	t.mu.Lock()
	w := t.m[id]
	delete(t.m, id)
	t.mu.Unlock()
	if w == nil {
		return false
	}
	w.close()
	return true
}

func (t *watcherTable) closeAll() {
	t.mu.Lock()
	ws := t.m
	t.m = map[string]*watcher{}
	t.mu.Unlock()
	for _, w := range ws {
		w.close()
	}
}
