# The VMM-only executable (docs/vmm.md, "The pre-started VMM"): a jailed
# `cube vmm-restore` launcher executes bin/cube-vmm as the VMM when it sits
# beside bin/cube (else cube itself): ~2 MiB less private memory per sandbox.
TEST_PREREQS += build-vmm
RUN_PREREQS += build-vmm

.PHONY: build-vmm
build-vmm:
	$(GO) build -o $(BIN)/cube-vmm ./cmd/cube-vmm

bench-restore: build-vmm
