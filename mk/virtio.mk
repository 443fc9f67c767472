# virtio devices (internal/vmm/devices/virtio): a short fuzz run of every
# guest-facing parser. Budgets are execution counts, not durations: a
# duration-based -fuzztime can fail spuriously with "context deadline
# exceeded" on a loaded machine (golang/go#75804, unfixed in go1.26).
VIRTIO_PKG  := ./internal/vmm/devices/virtio
VIRTIO_FUZZ := $(VIRTIO_PKG):FuzzDescriptorChain:30000x \
               $(VIRTIO_PKG):FuzzMMIOWrites:30000x \
               $(VIRTIO_PKG)/blk:FuzzBlkRequest:20000x \
               $(VIRTIO_PKG)/vsock:FuzzVsockPacket:20000x \
               $(VIRTIO_PKG)/vsock:FuzzVsockSession:10000x

TEST_TARGETS += vmm-fuzz

.PHONY: vmm-fuzz vmm-bench
vmm-fuzz:
	@for spec in $(VIRTIO_FUZZ); do \
	  IFS=: read -r pkg fn n <<<"$$spec"; \
	  echo "-- fuzz $$fn ($$n execs)"; \
	  $(GO) test -run XXX -fuzz "^$$fn$$" -fuzztime "$$n" -parallel 2 "$$pkg" || exit 1; \
	done

# Benchmarks with their peers in the same run: blk 4K random I/O through
# device+overlay vs pread/pwrite on a file; vsock stream vs a unix socket pair.
vmm-bench:
	$(GO) test -run XXX -bench . -benchtime 2s $(VIRTIO_PKG)/blk $(VIRTIO_PKG)/vsock
