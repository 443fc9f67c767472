// Package storetest starts throwaway databases for tests: a real
// PostgreSQL server (Debian's postgresql package: initdb + pg_ctl in a
// temporary directory, run as the postgres user, listening only on a unix
// socket in that directory).
package storetest

import (
	"fmt"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// pgBinDir finds Debian's PostgreSQL server binaries.
func pgBinDir() string {
	if out, err := exec.Command("pg_config", "--bindir").Output(); err == nil {
		d := strings.TrimSpace(string(out))
		if _, err := os.Stat(filepath.Join(d, "pg_ctl")); err == nil {
			if _, err := os.Stat(filepath.Join(d, "postgres")); err == nil {
				return d
			}
		}
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Strings(dirs)
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(filepath.Join(dirs[i], "postgres")); err == nil {
			return dirs[i]
		}
	}
	return ""
}

// Postgres starts a PostgreSQL server for the test and returns a URL for
// a fresh database on it. The server is stopped and its directory removed
// when the test ends. It skips the test (with the reason) when PostgreSQL
// is not installed or cannot be started as the postgres user.
func Postgres(t testing.TB) string {
	t.Helper()
	bin := pgBinDir()
	if bin == "" {
		t.Skip("PostgreSQL server binaries not installed (Debian package postgresql; `make test` installs it)")
	}
	if os.Geteuid() != 0 {
		t.Skip("starting PostgreSQL as the postgres user needs root")
	}
	pg, err := user.Lookup("postgres")
	if err != nil {
		t.Skip("no postgres user: " + err.Error())
	}
	uid, _ := strconv.Atoi(pg.Uid)
	gid, _ := strconv.Atoi(pg.Gid)
	dir, err := os.MkdirTemp("", "cube-pg-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(dir, uid, gid); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data")
	run := func(name string, args ...string) error {
		cmd := exec.Command("runuser", append([]string{"-u", "postgres", "--", filepath.Join(bin, name)}, args...)...)
		cmd.Dir = dir
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%s %v: %v\n%s", name, args, err, out)
		}
		return nil
	}
	if err := run("initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8", "--locale=C"); err != nil {
		t.Skip("initdb failed: " + err.Error())
	}
	opts := fmt.Sprintf("-c listen_addresses='' -c unix_socket_directories=%s -c fsync=off -c max_connections=50 -p 5432", dir)
	if err := run("pg_ctl", "-D", data, "-o", opts, "-l", filepath.Join(dir, "log"), "-w", "-t", "60", "start"); err != nil {
		log, _ := os.ReadFile(filepath.Join(dir, "log"))
		t.Skip("pg_ctl start failed: " + err.Error() + "\n" + string(log))
	}
	t.Cleanup(func() {
		if err := run("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"); err != nil {
			t.Logf("stop PostgreSQL: %v", err)
		}
	})
	return fmt.Sprintf("postgres:///postgres?host=%s&port=5432&user=postgres&sslmode=disable", dir)
}
