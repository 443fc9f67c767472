// Package ui serves the web UI mount point of `cube server`: GET /ui/.
//
// By default it serves a small embedded dashboard (static/): it asks for an
// API key (kept in the browser's localStorage), lists that key's sandboxes
// and the templates through the same REST API the SDKs use, and can pause,
// resume or kill a sandbox. Nothing in it is privileged: every call it
// makes carries the key and goes through the API's authorisation.
//
// Config.UIDir (CUBE_UI_DIR) mounts another UI instead: the files under
// that directory are served at /ui/, confined to it (os.Root: neither ".."
// nor a symlink leads out of it).
package ui

import (
	"embed"
	"io/fs"
	"net/http"
	"os"
)

//go:embed static
var static embed.FS

// Handler serves the UI under the /ui/ prefix: the embedded dashboard, or
// the files under dir if dir is not empty.
func Handler(dir string) (http.Handler, error) {
	var files fs.FS
	if dir == "" {
		sub, err := fs.Sub(static, "static")
		if err != nil {
			return nil, err
		}
		files = sub
	} else {
		root, err := os.OpenRoot(dir)
		if err != nil {
			return nil, err
		}
		files = root.FS()
	}
	fsrv := http.StripPrefix("/ui/", http.FileServerFS(files))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		// The dashboard loads only its own files and talks only to this
		// origin's API.
		h.Set("Content-Security-Policy", "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		fsrv.ServeHTTP(w, r)
	}), nil
}
