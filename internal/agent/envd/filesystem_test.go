//go:build linux

package envd

import (
	"context"
	"os"
	"path/filepath"
	"sort"
	"testing"
	"time"

	"connectrpc.com/connect"

	fspb "github.com/cubesandbox/cube/proto/filesystem"
)

func TestFilesystemRPCs(t *testing.T) {
	e := newTestEnv(t, Options{})
	ctx := context.Background()
	dir := t.TempDir()

	// MakeDir creates parents; again → already_exists; over a file → invalid_argument.
	deep := filepath.Join(dir, "a/b/c")
	mk, err := e.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: deep}))
	if err != nil || mk.Msg.Entry.Type != fspb.FileType_FILE_TYPE_DIRECTORY || mk.Msg.Entry.Path != deep {
		t.Fatalf("makedir: %v %v", mk, err)
	}
	if _, err := e.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: deep})); codeOf(err) != connect.CodeAlreadyExists {
		t.Fatalf("makedir again: %v", err)
	}
	file := filepath.Join(dir, "a/f.txt")
	os.WriteFile(file, []byte("12345"), 0o640)
	if _, err := e.fs.MakeDir(ctx, connect.NewRequest(&fspb.MakeDirRequest{Path: file})); codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("makedir over file: %v", err)
	}

	// Stat.
	st, err := e.fs.Stat(ctx, statReq(file))
	if err != nil {
		t.Fatal(err)
	}
	en := st.Msg.Entry
	if en.Name != "f.txt" || en.Size != 5 || en.Type != fspb.FileType_FILE_TYPE_FILE || en.Permissions != "-rw-r-----" || en.Mode != 0o640 || en.ModifiedTime == nil || en.Owner == "" {
		t.Fatalf("stat: %+v", en)
	}
	if _, err := e.fs.Stat(ctx, statReq(filepath.Join(dir, "nope"))); codeOf(err) != connect.CodeNotFound {
		t.Fatalf("stat missing: %v", err)
	}
	if _, err := e.fs.Stat(ctx, statReq("bad\x00path")); codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("stat NUL: %v", err)
	}
	link := filepath.Join(dir, "a/link")
	os.Symlink("f.txt", link)
	st, err = e.fs.Stat(ctx, statReq(link))
	if err != nil || st.Msg.Entry.Type != fspb.FileType_FILE_TYPE_SYMLINK || st.Msg.Entry.GetSymlinkTarget() != file {
		t.Fatalf("stat symlink: %+v %v", st, err)
	}

	// ListDir depth 1 and 2; entries exclude the directory itself.
	ls, err := e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: filepath.Join(dir, "a")}))
	if err != nil {
		t.Fatal(err)
	}
	if got := names(ls.Msg.Entries); !equal(got, []string{"b", "f.txt", "link"}) {
		t.Fatalf("list depth 1: %v", got)
	}
	ls, err = e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: filepath.Join(dir, "a"), Depth: 3}))
	if err != nil {
		t.Fatal(err)
	}
	if got := names(ls.Msg.Entries); !equal(got, []string{"b", "c", "f.txt", "link"}) {
		t.Fatalf("list depth 3: %v", got)
	}
	if _, err := e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: file})); codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("list file: %v", err)
	}
	if _, err := e.fs.ListDir(ctx, connect.NewRequest(&fspb.ListDirRequest{Path: dir + "/nope"})); codeOf(err) != connect.CodeNotFound {
		t.Fatalf("list missing: %v", err)
	}

	// Move (creates destination parents); missing source → not_found.
	dst := filepath.Join(dir, "moved/g.txt")
	mv, err := e.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: file, Destination: dst}))
	if err != nil || mv.Msg.Entry.Path != dst {
		t.Fatalf("move: %v %v", mv, err)
	}
	if _, err := e.fs.Move(ctx, connect.NewRequest(&fspb.MoveRequest{Source: file, Destination: dst})); codeOf(err) != connect.CodeNotFound {
		t.Fatalf("move missing: %v", err)
	}

	// Remove is recursive and a missing path is fine.
	if _, err := e.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: filepath.Join(dir, "a")})); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "a")); !os.IsNotExist(err) {
		t.Fatal("remove left the tree")
	}
	if _, err := e.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: filepath.Join(dir, "a")})); err != nil {
		t.Fatalf("remove missing: %v", err)
	}
	if _, err := e.fs.Remove(ctx, connect.NewRequest(&fspb.RemoveRequest{Path: "/"})); codeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("remove /: %v", err)
	}
}

func TestFilesystemAsUser(t *testing.T) {
	needRoot(t)
	e := newTestEnv(t, Options{DefaultUser: "root"})
	ctx := context.Background()
	dir := t.TempDir()
	os.Chmod(dir, 0o700) // nobody may not enter
	os.WriteFile(filepath.Join(dir, "secret"), []byte("s"), 0o600)
	req := statReq(filepath.Join(dir, "secret"))
	req.Header().Set("Authorization", basic("nobody"))
	if _, err := e.fs.Stat(ctx, req); codeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("nobody stat in 0700 dir: %v", err)
	}
	rm := connect.NewRequest(&fspb.RemoveRequest{Path: filepath.Join(dir, "secret")})
	rm.Header().Set("Authorization", basic("nobody"))
	if _, err := e.fs.Remove(ctx, rm); codeOf(err) != connect.CodePermissionDenied {
		t.Fatalf("nobody remove: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "secret")); err != nil {
		t.Fatal("file removed by a user without permission")
	}
	// Directories nobody creates are nobody's.
	open := worldDir(t)
	mk := connect.NewRequest(&fspb.MakeDirRequest{Path: filepath.Join(open, "x/y")})
	mk.Header().Set("Authorization", basic("nobody"))
	res, err := e.fs.MakeDir(ctx, mk)
	if err != nil || res.Msg.Entry.Owner != "nobody" {
		t.Fatalf("makedir as nobody: %v %v", res, err)
	}
	if st, _ := e.fs.Stat(ctx, statReq(filepath.Join(open, "x"))); st.Msg.Entry.Owner != "nobody" {
		t.Fatalf("parent owner %q", st.Msg.Entry.Owner)
	}
}

func TestWatchDir(t *testing.T) {
	e := newTestEnv(t, Options{})
	dir := t.TempDir()
	os.Mkdir(filepath.Join(dir, "sub"), 0o755)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := e.fs.WatchDir(ctx, connect.NewRequest(&fspb.WatchDirRequest{Path: dir, Recursive: true, IncludeEntry: true}))
	if err != nil {
		t.Fatal(err)
	}
	if !st.Receive() || st.Msg().GetStart() == nil {
		t.Fatalf("first message must be start: %v", st.Err())
	}
	os.WriteFile(filepath.Join(dir, "stay.txt"), []byte("x"), 0o644)
	time.Sleep(50 * time.Millisecond)
	os.WriteFile(filepath.Join(dir, "sub/new.txt"), []byte("x"), 0o644)
	os.Rename(filepath.Join(dir, "sub/new.txt"), filepath.Join(dir, "renamed.txt"))
	os.Remove(filepath.Join(dir, "renamed.txt"))
	seen := map[string]bool{}
	for st.Receive() {
		if ev := st.Msg().GetFilesystem(); ev != nil {
			seen[ev.Type.String()+" "+ev.Name] = true
			if ev.Type == fspb.EventType_EVENT_TYPE_CREATE && ev.Name == "stay.txt" && ev.Entry == nil {
				t.Error("create event without entry")
			}
		}
		if seen["EVENT_TYPE_CREATE sub/new.txt"] && seen["EVENT_TYPE_RENAME sub/new.txt"] && seen["EVENT_TYPE_CREATE renamed.txt"] && seen["EVENT_TYPE_REMOVE renamed.txt"] {
			break
		}
	}
	if !seen["EVENT_TYPE_REMOVE renamed.txt"] {
		t.Fatalf("events seen: %v (%v)", seen, st.Err())
	}
	cancel()
	st.Close()

	// Errors: missing dir, file.
	ws, err := e.fs.WatchDir(context.Background(), connect.NewRequest(&fspb.WatchDirRequest{Path: dir + "/nope"}))
	if err == nil {
		for ws.Receive() {
		}
		err = ws.Err()
	}
	if codeOf(err) != connect.CodeNotFound {
		t.Fatalf("watch missing: %v", err)
	}

	// Polling watcher.
	cw, err := e.fs.CreateWatcher(context.Background(), connect.NewRequest(&fspb.CreateWatcherRequest{Path: dir}))
	if err != nil {
		t.Fatal(err)
	}
	id := cw.Msg.WatcherId
	os.WriteFile(filepath.Join(dir, "p.txt"), nil, 0o644)
	var evs []*fspb.FilesystemEvent
	waitFor(t, "polled event", func() bool {
		r, err := e.fs.GetWatcherEvents(context.Background(), connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id}))
		if err != nil {
			t.Fatal(err)
		}
		evs = append(evs, r.Msg.Events...)
		return len(evs) > 0
	})
	if evs[0].Name != "p.txt" || evs[0].Type != fspb.EventType_EVENT_TYPE_CREATE {
		t.Fatalf("polled: %v", evs)
	}
	if _, err := e.fs.RemoveWatcher(context.Background(), connect.NewRequest(&fspb.RemoveWatcherRequest{WatcherId: id})); err != nil {
		t.Fatal(err)
	}
	if _, err := e.fs.GetWatcherEvents(context.Background(), connect.NewRequest(&fspb.GetWatcherEventsRequest{WatcherId: id})); codeOf(err) != connect.CodeNotFound {
		t.Fatalf("removed watcher: %v", err)
	}
}

func names(es []*fspb.EntryInfo) []string {
	var out []string
	for _, e := range es {
		out = append(out, e.Name)
	}
	sort.Strings(out)
	return out
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// worldDir is a temporary directory any user may enter and write
// (t.TempDir's parent is 0700).
func worldDir(t *testing.T) string {
	d, err := os.MkdirTemp("", "envd-world-")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o777)
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}
