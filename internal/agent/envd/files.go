//go:build linux

package envd

import (
	"bufio"
	"compress/gzip"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/cubesandbox/cube/internal/errs"
)

// copyBufPool holds the 1 MiB buffers uploads stream through.
var copyBufPool = sync.Pool{New: func() any { b := make([]byte, 1<<20); return &b }}

// filesAuth checks X-Access-Token or a v1 signature for /files.
func (s *Server) filesAuth(r *http.Request, op, path, username string) error {
	tok := s.currentToken()
	if tok == "" || tokenOK(r.Header.Get("X-Access-Token"), tok) {
		return nil
	}
	q := r.URL.Query()
	sig := q.Get("signature")
	if sig == "" {
		return errs.E(errs.Unauthenticated, "invalid or missing access token")
	}
	raw := path + ":" + op + ":" + username + ":" + tok
	if exp := q.Get("signature_expiration"); exp != "" {
		n, err := strconv.ParseInt(exp, 10, 64)
		if err != nil || time.Now().Unix() > n {
			return errs.E(errs.Unauthenticated, "signature expired")
		}
		raw += ":" + exp
	}
	sum := sha256.Sum256([]byte(raw))
	want := "v1_" + base64.RawStdEncoding.EncodeToString(sum[:])
	if subtle.ConstantTimeCompare([]byte(sig), []byte(want)) != 1 {
		return errs.E(errs.Unauthenticated, "invalid signature")
	}
	return nil
}

// filesUser checks a /files request's authorization for op and resolves
// its username.
func (s *Server) filesUser(r *http.Request, op string) (*User, error) {
	q := r.URL.Query()
	if err := s.filesAuth(r, op, q.Get("path"), q.Get("username")); err != nil {
		return nil, err
	}
	return s.resolveUser(q.Get("username"))
}

func (s *Server) handleFilesGet(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	u, err := s.filesUser(r, "read")
	if err != nil {
		writeJSONError(w, err)
		return
	}
	p, err := resolvePath(q.Get("path"), u)
	if err != nil {
		writeJSONError(w, err)
		return
	}
	var f *os.File
	err = asUser(u, func() (err error) {
		// O_NONBLOCK: opening a FIFO or a device must not hang the agent.
		f, err = os.OpenFile(p, os.O_RDONLY|syscall.O_NONBLOCK, 0)
		return err
	})
	if err != nil {
		writeJSONError(w, fsErr(err, "open", p))
		return
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		writeJSONError(w, fsErr(err, "stat", p))
		return
	}
	if fi.IsDir() {
		writeJSONError(w, errs.E(errs.InvalidArgument, "%s is a directory", p))
		return
	}
	if !fi.Mode().IsRegular() {
		writeJSONError(w, errs.E(errs.InvalidArgument, "%s is not a regular file", p))
		return
	}
	ct := mime.TypeByExtension(filepath.Ext(p))
	if ct == "" {
		ct = "application/octet-stream"
	}
	w.Header().Set("Content-Type", ct)
	w.Header().Set("Content-Disposition", mime.FormatMediaType("inline", map[string]string{"filename": filepath.Base(p)}))
	if acceptsGzip(r.Header.Get("Accept-Encoding")) && r.Header.Get("Range") == "" && fi.Size() > 0 {
		// Compressed on the fly (SDK `files.read(path, {gzip: true})`).
		w.Header().Set("Content-Encoding", "gzip")
		w.Header().Set("Vary", "Accept-Encoding")
		w.WriteHeader(http.StatusOK)
		if r.Method == http.MethodHead {
			return
		}
		zw, _ := gzip.NewWriterLevel(w, gzip.BestSpeed)
		bp := copyBufPool.Get().(*[]byte)
		_, _ = copyFull(zw, f, *bp)
		copyBufPool.Put(bp)
		_ = zw.Close()
		return
	}
	http.ServeContent(w, r, "", fi.ModTime(), f)
}

// acceptsGzip reports whether the client asked for gzip explicitly, as
// the SDK does for `files.read(path, {gzip: true})`. HTTP clients' default
// "gzip, deflate, br" does not count: a compressed reply has no
// Content-Length, which the SDK needs to recognise empty files.
func acceptsGzip(h string) bool {
	return strings.EqualFold(strings.TrimSpace(h), "gzip")
}

// uploadResult is one entry of the POST /files response.
type uploadResult struct {
	Path     string            `json:"path"`
	Name     string            `json:"name"`
	Type     string            `json:"type"`
	Metadata map[string]string `json:"metadata,omitempty"`
}

// rawFilename returns a multipart part's filename parameter unmodified
// (Part.FileName strips directories, but E2B sends the full destination).
func rawFilename(p *multipart.Part) string {
	_, params, err := mime.ParseMediaType(p.Header.Get("Content-Disposition"))
	if err != nil {
		return ""
	}
	return params["filename"]
}

func (s *Server) handleFilesPost(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	u, err := s.filesUser(r, "write")
	if err != nil {
		writeJSONError(w, err)
		return
	}
	qpath := q.Get("path")
	meta := metadataFromHeaders(r.Header)
	ct, params, _ := mime.ParseMediaType(r.Header.Get("Content-Type"))
	var results []uploadResult
	switch ct {
	case "multipart/form-data":
		if params["boundary"] == "" {
			writeJSONError(w, errs.E(errs.InvalidArgument, "multipart body without boundary"))
			return
		}
		// Large socket reads under multipart's small internal buffer.
		mr := multipart.NewReader(bufio.NewReaderSize(r.Body, 1<<20), params["boundary"])
		for {
			part, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				writeJSONError(w, errs.Wrap(errs.InvalidArgument, err, "malformed multipart body"))
				return
			}
			if part.FormName() != "file" {
				part.Close()
				continue
			}
			dest := qpath
			if dest == "" {
				dest = rawFilename(part)
			}
			res, err := s.writeFile(u, dest, part, meta)
			part.Close()
			if err != nil {
				writeJSONError(w, err)
				return
			}
			results = append(results, res)
		}
	case "application/octet-stream":
		if qpath == "" {
			writeJSONError(w, errs.E(errs.InvalidArgument, "path is required for application/octet-stream uploads"))
			return
		}
		var body io.Reader = r.Body
		if strings.EqualFold(r.Header.Get("Content-Encoding"), "gzip") {
			zr, err := gzip.NewReader(r.Body)
			if err != nil {
				writeJSONError(w, errs.Wrap(errs.InvalidArgument, err, "malformed gzip body"))
				return
			}
			defer zr.Close()
			body = zr
		}
		res, err := s.writeFile(u, qpath, body, meta)
		if err != nil {
			writeJSONError(w, err)
			return
		}
		results = append(results, res)
	default:
		writeJSONError(w, errs.E(errs.InvalidArgument, "unsupported Content-Type %q", r.Header.Get("Content-Type")))
		return
	}
	if len(results) == 0 {
		writeJSONError(w, errs.E(errs.InvalidArgument, "no file part in the upload"))
		return
	}
	writeJSON(w, http.StatusOK, results)
}

// writeFile streams body to dest as u, creating parent directories.
func (s *Server) writeFile(u *User, dest string, body io.Reader, meta map[string]string) (uploadResult, error) {
	p, err := resolvePath(dest, u)
	if err != nil {
		return uploadResult{}, err
	}
	if fi, err := os.Stat(p); err == nil && fi.IsDir() {
		return uploadResult{}, errs.E(errs.InvalidArgument, "%s is a directory", p)
	}
	if err := mkdirAllAs(u, filepath.Dir(p)); err != nil {
		return uploadResult{}, fsErr(err, "mkdir", filepath.Dir(p))
	}
	var f *os.File
	_, statErr := os.Lstat(p)
	err = asUser(u, func() (err error) {
		f, err = os.OpenFile(p, os.O_WRONLY|os.O_CREATE|syscall.O_NONBLOCK, 0o644)
		return err
	})
	if err != nil {
		return uploadResult{}, fsErr(err, "open", p)
	}
	if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() {
		f.Close()
		return uploadResult{}, errs.E(errs.InvalidArgument, "%s is not a regular file", p)
	}
	if err := f.Truncate(0); err != nil {
		f.Close()
		return uploadResult{}, fsErr(err, "truncate", p)
	}
	if statErr != nil {
		chownAs(u, p)
	}
	// The multipart reader hands out at most 4 KiB per Read: gather 1 MiB
	// before each write.
	bp := copyBufPool.Get().(*[]byte)
	_, err = copyFull(f, body, *bp)
	copyBufPool.Put(bp)
	cerr := f.Close()
	if err == nil {
		err = cerr
	}
	if err != nil {
		var pe *os.PathError
		if errors.As(err, &pe) {
			return uploadResult{}, fsErr(err, "write", p)
		}
		return uploadResult{}, errs.Wrap(errs.InvalidArgument, err, "upload of %s interrupted: %v", p, err)
	}
	res := uploadResult{Path: p, Name: filepath.Base(p), Type: "file"}
	if len(meta) > 0 {
		res.Metadata = setMetadata(p, meta)
	}
	return res, nil
}

// copyFull copies r to w through buf, filling buf before every write.
func copyFull(w io.Writer, r io.Reader, buf []byte) (int64, error) {
	var total int64
	for {
		n, rerr := io.ReadFull(r, buf)
		if n > 0 {
			if _, err := w.Write(buf[:n]); err != nil {
				return total, err
			}
			total += int64(n)
		}
		if rerr == io.EOF || rerr == io.ErrUnexpectedEOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

var _ = fmt.Sprintf
