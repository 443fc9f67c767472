# Go VMM (issue 6): busybox-static gives `cube bench vmm` a static /bin/true
# for its crun peer; a short fuzz run of the VMM's input parsers.
APT_PACKAGES += busybox-static crun
TEST_TARGETS += fuzz-vmm

# Exec counts, not durations: -fuzztime with a duration fails at random with
# "context deadline exceeded" on go1.26 (golang/go#75804).
VMM_FUZZTIME ?= 20000x
# Each kernel-load exec maps guest memory: fewer of them.
VMM_FUZZTIME_BOOT ?= 1000x

.PHONY: fuzz-vmm bench-vmm
fuzz-vmm:
	$(GO) test -run '^$$' -fuzz '^FuzzBusDispatch$$' -fuzztime $(VMM_FUZZTIME) ./internal/vmm/vm
	$(GO) test -run '^$$' -fuzz '^FuzzLoadKernel$$' -fuzztime $(VMM_FUZZTIME_BOOT) ./internal/vmm/boot
	$(GO) test -run '^$$' -fuzz '^FuzzUART$$' -fuzztime $(VMM_FUZZTIME) ./internal/vmm/devices/serial
	$(GO) test -run '^$$' -fuzz '^FuzzI8042$$' -fuzztime $(VMM_FUZZTIME) ./internal/vmm/devices/i8042
	$(GO) test -run '^$$' -fuzz '^FuzzCMOS$$' -fuzztime $(VMM_FUZZTIME) ./internal/vmm/devices/legacy
	$(GO) test -run '^$$' -fuzz '^FuzzServer$$' -fuzztime $(VMM_FUZZTIME) ./internal/vmm/vmmapi
	$(GO) test -run '^$$' -fuzz '^FuzzParseDisk$$' -fuzztime $(VMM_FUZZTIME) ./internal/vmm/vmmapi

bench-vmm: build
	$(BIN)/cube bench vmm
