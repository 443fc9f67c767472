# runsc (gVisor) for the gvisor runtime: built static from a pinned version of
# the gvisor.dev/gvisor module (a cgo build fails at sandbox start: the sandbox
# chroot has no ELF interpreter). Cached in $(CACHE)/bin with a version stamp.
RUNSC_VERSION := v0.0.0-20260905035102-160fafc42237
RUNSC         := $(CACHE)/bin/runsc
RUNSC_STAMP   := $(CACHE)/bin/.runsc-$(RUNSC_VERSION)

.PHONY: runsc
runsc: $(RUNSC_STAMP)

$(RUNSC_STAMP):
	@mkdir -p $(CACHE)/bin $(CACHE)/runsc-build
	@echo "runsc: building gvisor.dev/gvisor/runsc@$(RUNSC_VERSION) (static, takes a few minutes)"
	CGO_ENABLED=0 GOBIN=$(CACHE)/runsc-build $(GO) install gvisor.dev/gvisor/runsc@$(RUNSC_VERSION)
	install -m 0755 $(CACHE)/runsc-build/runsc $(RUNSC).tmp && mv -f $(RUNSC).tmp $(RUNSC)
	rm -f $(CACHE)/bin/.runsc-v* && touch $@

TEST_PREREQS += runsc
RUN_PREREQS  += runsc
