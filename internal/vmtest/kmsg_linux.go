//go:build linux

package vmtest

import (
	"io"
	"syscall"
)

// kmsgReader returns the kernel log records read once through a
// non-blocking /dev/kmsg with raw syscalls (an *os.File would park on the
// poller at the end of the log instead of returning).
func kmsgReader() io.Reader {
	fd, err := syscall.Open("/dev/kmsg", syscall.O_RDONLY|syscall.O_NONBLOCK|syscall.O_CLOEXEC, 0)
	if err != nil {
		return eofReader{}
	}
	return &kmsg{fd: fd}
}

type kmsg struct{ fd int }

func (k *kmsg) Read(p []byte) (int, error) {
	if k.fd < 0 {
		return 0, io.EOF
	}
	for {
		n, err := syscall.Read(k.fd, p)
		if err == syscall.EPIPE { // records overwritten while reading: go on
			continue
		}
		if err != nil || n <= 0 {
			syscall.Close(k.fd)
			k.fd = -1
			return 0, io.EOF
		}
		return n, nil
	}
}

type eofReader struct{}

func (eofReader) Read([]byte) (int, error) { return 0, io.EOF }
