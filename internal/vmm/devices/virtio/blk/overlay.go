package blk

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// Disk is a block device backend. Offsets and lengths are in bytes.
type Disk interface {
	io.ReaderAt
	io.WriterAt
	// Flush makes completed writes durable.
	Flush() error
	// Size is the disk size in bytes (a multiple of 512).
	Size() int64
	ReadOnly() bool
	Close() error
}

// ErrReadOnly is returned by writes to a read-only disk.
var ErrReadOnly = errors.New("blk: read-only disk")

// FileDisk is a disk on a plain file.
type FileDisk struct {
	f    *os.File
	size int64
	ro   bool
}

// OpenFile opens path as a disk; readOnly opens it O_RDONLY.
func OpenFile(path string, readOnly bool) (*FileDisk, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	return &FileDisk{f: f, size: st.Size() &^ 511, ro: readOnly}, nil
}

func (d *FileDisk) ReadAt(p []byte, off int64) (int, error) {
	n, err := d.f.ReadAt(p, off)
	if err == io.EOF && off+int64(len(p)) <= d.size {
		err = nil
	}
	return n, err
}

func (d *FileDisk) WriteAt(p []byte, off int64) (int, error) {
	if d.ro {
		return 0, ErrReadOnly
	}
	if off < 0 || off+int64(len(p)) > d.size {
		return 0, fmt.Errorf("blk: write past end of disk")
	}
	return d.f.WriteAt(p, off)
}

func (d *FileDisk) Flush() error {
	if d.ro {
		return nil
	}
	return d.f.Sync()
}

func (d *FileDisk) Size() int64    { return d.size }
func (d *FileDisk) ReadOnly() bool { return d.ro }
func (d *FileDisk) Close() error   { return d.f.Close() }

// Overlay file format (version 1), all integers little endian:
//
//	[0, 4096)      header: magic "CUBECOW1", u32 version, u32 block size,
//	               u64 disk size, u64 map offset, u64 map length,
//	               u64 data offset, u32 CRC-32 (IEEE) of bytes [0, 48)
//	[map offset)   block map: bit i (byte i/8, bit i%8) set = block i is
//	               in the overlay; padded to 4096
//	[data offset)  block i's bytes at data offset + i*block size; blocks
//	               never written are holes (the file is sparse)
//
// Reads of blocks not in the map fall through to the read-only base.
// A first write to a block copies the rest of it from the base (when the
// write does not cover it whole), writes it to the overlay and sets its
// bit. Flush syncs the data, then writes the map and syncs again, so
// after a flush the file is a complete, reopenable disk state and a
// crash at any point leaves a consistent (possibly older) one.
const (
	overlayMagic   = "CUBECOW1"
	overlayVersion = 1
	headerSize     = 4096
	// DefaultBlockSize is the overlay's copy-on-write granularity.
	DefaultBlockSize = 4096
)

// Overlay is a sparse copy-on-write disk over a read-only base.
type Overlay struct {
	base    *os.File
	ov      *os.File
	size    int64
	bs      int64
	mapOff  int64
	dataOff int64

	mu sync.RWMutex
	// Guarded by mu.
	bitmap []byte
	dirty  bool
}

// OpenOverlay opens the read-only base image and the overlay file at
// overlayPath, creating the overlay if it does not exist or is empty.
func OpenOverlay(basePath, overlayPath string) (*Overlay, error) {
	base, err := os.Open(basePath)
	if err != nil {
		return nil, err
	}
	st, err := base.Stat()
	if err != nil {
		base.Close()
		return nil, err
	}
	ov, err := os.OpenFile(overlayPath, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		base.Close()
		return nil, err
	}
	o := &Overlay{base: base, ov: ov, size: st.Size() &^ 511, bs: DefaultBlockSize}
	if err := o.init(); err != nil {
		base.Close()
		ov.Close()
		return nil, fmt.Errorf("overlay %s: %w", overlayPath, err)
	}
	return o, nil
}

func (o *Overlay) blocks() int64 { return (o.size + o.bs - 1) / o.bs }

func (o *Overlay) init() error {
	st, err := o.ov.Stat()
	if err != nil {
		return err
	}
	mapLen := (o.blocks() + 7) / 8
	o.mapOff = headerSize
	o.dataOff = headerSize + (mapLen+4095)&^4095
	if st.Size() == 0 {
		o.bitmap = make([]byte, mapLen)
		h := make([]byte, headerSize)
		copy(h, overlayMagic)
		binary.LittleEndian.PutUint32(h[8:], overlayVersion)
		binary.LittleEndian.PutUint32(h[12:], uint32(o.bs))
		binary.LittleEndian.PutUint64(h[16:], uint64(o.size))
		binary.LittleEndian.PutUint64(h[24:], uint64(o.mapOff))
		binary.LittleEndian.PutUint64(h[32:], uint64(mapLen))
		binary.LittleEndian.PutUint64(h[40:], uint64(o.dataOff))
		binary.LittleEndian.PutUint32(h[48:], crc32.ChecksumIEEE(h[:48]))
		if _, err := o.ov.WriteAt(h, 0); err != nil {
			return err
		}
		if err := o.ov.Truncate(o.dataOff + o.size); err != nil {
			return err
		}
		return o.ov.Sync()
	}
	h := make([]byte, headerSize)
	if _, err := o.ov.ReadAt(h, 0); err != nil {
		return fmt.Errorf("reading header: %w", err)
	}
	switch {
	case string(h[:8]) != overlayMagic:
		return errors.New("not a Cube overlay (bad magic)")
	case binary.LittleEndian.Uint32(h[48:]) != crc32.ChecksumIEEE(h[:48]):
		return errors.New("header checksum mismatch")
	case binary.LittleEndian.Uint32(h[8:]) != overlayVersion:
		return fmt.Errorf("unsupported version %d", binary.LittleEndian.Uint32(h[8:]))
	case int64(binary.LittleEndian.Uint64(h[16:])) != o.size:
		return fmt.Errorf("made for a %d-byte base, base is %d bytes", binary.LittleEndian.Uint64(h[16:]), o.size)
	}
	o.bs = int64(binary.LittleEndian.Uint32(h[12:]))
	if o.bs < 512 || o.bs&(o.bs-1) != 0 || o.bs > 1<<20 {
		return fmt.Errorf("bad block size %d", o.bs)
	}
	mapLen = (o.blocks() + 7) / 8
	o.mapOff = int64(binary.LittleEndian.Uint64(h[24:]))
	o.dataOff = int64(binary.LittleEndian.Uint64(h[40:]))
	if int64(binary.LittleEndian.Uint64(h[32:])) != mapLen || o.mapOff < headerSize || o.dataOff < o.mapOff+mapLen {
		return errors.New("bad map layout")
	}
	o.bitmap = make([]byte, mapLen)
	if _, err := o.ov.ReadAt(o.bitmap, o.mapOff); err != nil {
		return fmt.Errorf("reading block map: %w", err)
	}
	return nil
}

func (o *Overlay) has(b int64) bool { return o.bitmap[b/8]&(1<<(b%8)) != 0 }
func (o *Overlay) set(b int64)      { o.bitmap[b/8] |= 1 << (b % 8); o.dirty = true }

// Size implements Disk.
func (o *Overlay) Size() int64 { return o.size }

// ReadOnly implements Disk.
func (o *Overlay) ReadOnly() bool { return false }

// BlocksInOverlay counts the blocks held by the overlay.
func (o *Overlay) BlocksInOverlay() int {
	o.mu.RLock()
	defer o.mu.RUnlock()
	n := 0
	for b := int64(0); b < o.blocks(); b++ {
		if o.has(b) {
			n++
		}
	}
	return n
}

func (o *Overlay) check(p []byte, off int64) error {
	if off < 0 || off > o.size || int64(len(p)) > o.size-off {
		return fmt.Errorf("blk: access [%d,+%d) outside %d-byte disk", off, len(p), o.size)
	}
	return nil
}

// readBase reads from the base, zero-filling past its end.
func (o *Overlay) readBase(p []byte, off int64) error {
	n, err := o.base.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		return nil
	}
	return err
}

// ReadAt implements Disk: runs of blocks come from the overlay or the base.
func (o *Overlay) ReadAt(p []byte, off int64) (int, error) {
	if err := o.check(p, off); err != nil {
		return 0, err
	}
	o.mu.RLock()
	defer o.mu.RUnlock()
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		blk := pos / o.bs
		inOv := o.has(blk)
		// Extend the run while blocks come from the same source.
		end := (blk + 1) * o.bs
		for end < off+int64(len(p)) && o.has(end/o.bs) == inOv {
			end += o.bs
		}
		end = min(end, off+int64(len(p)))
		chunk := p[done : done+int(end-pos)]
		var err error
		if inOv {
			_, err = o.ov.ReadAt(chunk, o.dataOff+pos)
		} else {
			err = o.readBase(chunk, pos)
		}
		if err != nil {
			return done, err
		}
		done += len(chunk)
	}
	return done, nil
}

// WriteAt implements Disk: writes go to the overlay only.
func (o *Overlay) WriteAt(p []byte, off int64) (int, error) {
	if err := o.check(p, off); err != nil {
		return 0, err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	var scratch []byte
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		blk := pos / o.bs
		bstart := blk * o.bs
		end := min(bstart+o.bs, off+int64(len(p)))
		if o.has(blk) || (pos == bstart && end == bstart+o.bs) {
			// In the overlay already, or covered whole: write through;
			// extend over following blocks that are either.
			for end < off+int64(len(p)) {
				nb := end / o.bs
				if !o.has(nb) && off+int64(len(p)) < (nb+1)*o.bs {
					break
				}
				end = min(end+o.bs, off+int64(len(p)))
			}
			if _, err := o.ov.WriteAt(p[done:done+int(end-pos)], o.dataOff+pos); err != nil {
				return done, err
			}
			for b := blk; b*o.bs < end; b++ {
				if !o.has(b) {
					o.set(b)
				}
			}
			done += int(end - pos)
			continue
		}
		// Partial first write of a block: copy it up from the base.
		if scratch == nil {
			scratch = make([]byte, o.bs)
		}
		bl := min(o.bs, o.size-bstart)
		if err := o.readBase(scratch[:bl], bstart); err != nil {
			return done, err
		}
		copy(scratch[pos-bstart:end-bstart], p[done:])
		if _, err := o.ov.WriteAt(scratch[:bl], o.dataOff+bstart); err != nil {
			return done, err
		}
		o.set(blk)
		done += int(end - pos)
	}
	return done, nil
}

// Flush implements Disk. When blocks were added to the overlay, their
// data is made durable before the map that points at them is written,
// so a crash can never leave the map naming a block whose data is not on
// disk (which would read as zeros instead of the base's content).
func (o *Overlay) Flush() error {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.dirty {
		if err := unix.Fdatasync(int(o.ov.Fd())); err != nil {
			return err
		}
		if _, err := o.ov.WriteAt(o.bitmap, o.mapOff); err != nil {
			return err
		}
		o.dirty = false
	}
	return unix.Fdatasync(int(o.ov.Fd()))
}

// Close flushes and closes both files.
func (o *Overlay) Close() error {
	err := o.Flush()
	o.ov.Close()
	o.base.Close()
	return err
}
