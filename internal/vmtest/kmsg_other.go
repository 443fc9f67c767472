//go:build !linux

package vmtest

import "io"

func kmsgReader() io.Reader { return eofReader{} }

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
