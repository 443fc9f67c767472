//go:build linux && vmtest

// The guest-side tests: built with `go test -c -tags vmtest` into the L1
// image by `make vmtest` and run by the L1 /init against the real /dev/kvm
// that kvm_amd provides inside the emulated machine.

package vmtest

import (
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// KVM ioctl numbers (linux/kvm.h) and kvm_run layout, used raw here so that
// the smoke test proves the harness independently of internal/vmm/kvm.
const (
	kvmGetAPIVersion       = 0xAE00
	kvmCreateVM            = 0xAE01
	kvmCheckExtension      = 0xAE03
	kvmGetVCPUMmapSize     = 0xAE04
	kvmCreateVCPU          = 0xAE41
	kvmSetUserMemoryRegion = 0x4020AE46
	kvmRun                 = 0xAE80
	kvmSetRegs             = 0x4090AE82
	kvmGetSregs            = 0x8138AE83
	kvmSetSregs            = 0x4138AE84

	kvmExitIO  = 2
	kvmExitHLT = 5

	kvmCapIRQChip   = 0
	kvmCapUserMem   = 3
	kvmCapIRQFD     = 32
	kvmCapIOEventFD = 36
)

func ioctl(fd int, req, arg uintptr) (uintptr, error) {
	r, _, e := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), req, arg)
	if e != 0 {
		return r, e
	}
	return r, nil
}

type userMemoryRegion struct {
	Slot, Flags                         uint32
	GuestPhysAddr, MemorySize, UserAddr uint64
}

// TestKVMSmoke runs a real-mode guest (mov al,0x42; out 0x10,al; inc al;
// out 0x10,al; hlt) on /dev/kvm and checks both port writes and the halt.
func TestKVMSmoke(t *testing.T) {
	if b, err := os.ReadFile("/sys/module/kvm_amd/parameters/nested"); err == nil {
		t.Logf("kvm_amd nested=%s", b[:len(b)-1])
	}
	kvm, err := syscall.Open("/dev/kvm", syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("open /dev/kvm: %v", err)
	}
	defer syscall.Close(kvm)
	v, err := ioctl(kvm, kvmGetAPIVersion, 0)
	if err != nil || v != 12 {
		t.Fatalf("KVM_GET_API_VERSION = %d, %v; want 12", v, err)
	}
	for name, c := range map[string]uintptr{"IRQCHIP": kvmCapIRQChip, "USER_MEMORY": kvmCapUserMem, "IRQFD": kvmCapIRQFD, "IOEVENTFD": kvmCapIOEventFD} {
		r, err := ioctl(kvm, kvmCheckExtension, c)
		if err != nil || r == 0 {
			t.Errorf("KVM_CAP_%s missing (%d, %v)", name, r, err)
		}
	}
	start := time.Now()
	vmfd, err := ioctl(kvm, kvmCreateVM, 0)
	if err != nil {
		t.Fatalf("KVM_CREATE_VM: %v", err)
	}
	vm := int(vmfd)
	defer syscall.Close(vm)

	mem, err := syscall.Mmap(-1, 0, 0x10000, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_PRIVATE|syscall.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(mem)
	copy(mem[0x1000:], []byte{0xb0, 0x42, 0xe6, 0x10, 0xfe, 0xc0, 0xe6, 0x10, 0xf4})
	region := userMemoryRegion{MemorySize: uint64(len(mem)), UserAddr: uint64(uintptr(unsafe.Pointer(&mem[0])))}
	if _, err := ioctl(vm, kvmSetUserMemoryRegion, uintptr(unsafe.Pointer(&region))); err != nil {
		t.Fatalf("KVM_SET_USER_MEMORY_REGION: %v", err)
	}

	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cpufd, err := ioctl(vm, kvmCreateVCPU, 0)
	if err != nil {
		t.Fatalf("KVM_CREATE_VCPU: %v", err)
	}
	cpu := int(cpufd)
	defer syscall.Close(cpu)
	size, err := ioctl(kvm, kvmGetVCPUMmapSize, 0)
	if err != nil {
		t.Fatalf("KVM_GET_VCPU_MMAP_SIZE: %v", err)
	}
	run, err := syscall.Mmap(cpu, 0, int(size), syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap kvm_run: %v", err)
	}
	defer syscall.Munmap(run)

	var sregs [312]byte // struct kvm_sregs; cs is the first kvm_segment
	if _, err := ioctl(cpu, kvmGetSregs, uintptr(unsafe.Pointer(&sregs))); err != nil {
		t.Fatalf("KVM_GET_SREGS: %v", err)
	}
	*(*uint64)(unsafe.Pointer(&sregs[0])) = 0  // cs.base
	*(*uint16)(unsafe.Pointer(&sregs[12])) = 0 // cs.selector
	if _, err := ioctl(cpu, kvmSetSregs, uintptr(unsafe.Pointer(&sregs))); err != nil {
		t.Fatalf("KVM_SET_SREGS: %v", err)
	}
	var regs [18]uint64 // struct kvm_regs: ..., rip, rflags
	regs[16], regs[17] = 0x1000, 2
	if _, err := ioctl(cpu, kvmSetRegs, uintptr(unsafe.Pointer(&regs))); err != nil {
		t.Fatalf("KVM_SET_REGS: %v", err)
	}

	var outs []byte
	for i := 0; i < 16; i++ {
		if _, err := ioctl(cpu, kvmRun, 0); err != nil {
			if err == syscall.EINTR {
				continue
			}
			t.Fatalf("KVM_RUN: %v", err)
		}
		switch reason := *(*uint32)(unsafe.Pointer(&run[8])); reason {
		case kvmExitIO:
			dir, sz := run[32], run[33]
			port := *(*uint16)(unsafe.Pointer(&run[34]))
			off := *(*uint64)(unsafe.Pointer(&run[40]))
			if dir != 1 || sz != 1 || port != 0x10 {
				t.Fatalf("unexpected IO exit dir=%d size=%d port=%#x", dir, sz, port)
			}
			outs = append(outs, run[off])
		case kvmExitHLT:
			if string(outs) != "\x42\x43" {
				t.Fatalf("port 0x10 got % x, want 42 43", outs)
			}
			t.Logf("real-mode guest: OUT 0x42, OUT 0x43, HLT; create VM to halt %v", time.Since(start))
			return
		default:
			t.Fatalf("unexpected exit reason %d after outs % x", reason, outs)
		}
	}
	t.Fatalf("no HLT after 16 exits (outs % x)", outs)
}
