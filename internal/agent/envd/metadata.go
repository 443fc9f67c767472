//go:build linux

package envd

import (
	"net/http"
	"strings"

	"golang.org/x/sys/unix"
)

// File metadata (SDK `files.write(..., {metadata})`, envd >= 0.6.2) comes
// as `X-Metadata-<key>: <value>` headers and is kept in the file's
// extended attributes `user.e2b.<key>` (keys lower-cased: HTTP header names
// are case-insensitive).
const (
	metadataHeader = "X-Metadata-"
	xattrPrefix    = "user.e2b."
	maxMetadata    = 64
)

// metadataFromHeaders extracts X-Metadata-* headers.
func metadataFromHeaders(h http.Header) map[string]string {
	var m map[string]string
	for k, vs := range h {
		if len(k) <= len(metadataHeader) || !strings.EqualFold(k[:len(metadataHeader)], metadataHeader) || len(vs) == 0 {
			continue
		}
		if m == nil {
			m = map[string]string{}
		}
		if len(m) < maxMetadata {
			m[strings.ToLower(k[len(metadataHeader):])] = vs[0]
		}
	}
	return m
}

// setMetadata stores m on path; it reports what was stored (nothing when
// the filesystem has no user xattrs).
func setMetadata(path string, m map[string]string) map[string]string {
	stored := map[string]string{}
	for k, v := range m {
		if err := unix.Lsetxattr(path, xattrPrefix+k, []byte(v), 0); err == nil {
			stored[k] = v
		}
	}
	if len(stored) == 0 {
		return nil
	}
	return stored
}

// getMetadata reads the user.e2b.* attributes of path.
func getMetadata(path string) map[string]string {
	buf := make([]byte, 4096)
	n, err := unix.Llistxattr(path, buf)
	if err != nil || n <= 0 {
		return nil
	}
	var m map[string]string
	for _, name := range strings.Split(string(buf[:n]), "\x00") {
		key, ok := strings.CutPrefix(name, xattrPrefix)
		if !ok || key == "" {
			continue
		}
		val := make([]byte, 4096)
		vn, err := unix.Lgetxattr(path, name, val)
		if err != nil {
			continue
		}
		if m == nil {
			m = map[string]string{}
		}
		m[key] = string(val[:vn])
	}
	return m
}
