# Cube: two commands do all set-up on a fresh Debian 12 machine.
#   make run   build, prepare what is needed, start `cube server` on :3000
#   make test  the whole suite (what .ci/run runs)
# Component fragments live in mk/*.mk and append to APT_PACKAGES,
# TEST_PREREQS, TEST_TARGETS and RUN_PREREQS.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := build

GO        ?= go
# Heavy artifacts (runsc, kernels, template images, npm packages) are cached
# here, outside the repository, keyed by their inputs.
CACHE     ?= /var/cache/cube
DATA_DIR  ?= /var/lib/cube
BIN       := $(CURDIR)/bin
GOTESTFLAGS ?= -p 2 -count=1 -timeout 25m
export CUBE_CACHE_DIR := $(CACHE)
export PATH := $(CACHE)/bin:$(PATH)

APT_PACKAGES := e2fsprogs iproute2 nftables conntrack debootstrap crun cpio xz-utils
TEST_PREREQS :=
TEST_TARGETS :=
RUN_PREREQS  :=

include $(sort $(wildcard mk/*.mk))

.PHONY: build deps run test unit vet clean

deps:
	@scripts/deps.sh $(sort $(APT_PACKAGES))

build:
	$(GO) build -o $(BIN)/cube ./cmd/cube
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/cube-agent ./cmd/cube-agent

vet:
	$(GO) vet ./...

unit: build $(TEST_PREREQS)
	CUBE_BIN=$(BIN) $(GO) test $(GOTESTFLAGS) ./...

test: deps build vet $(TEST_PREREQS)
	CUBE_BIN=$(BIN) $(GO) test $(GOTESTFLAGS) ./...
	@for t in $(TEST_TARGETS); do echo "== make $$t"; $(MAKE) --no-print-directory $$t; done

run: deps build $(RUN_PREREQS)
	$(BIN)/cube doctor
	exec $(BIN)/cube server --data-dir $(DATA_DIR)

clean:
	rm -rf $(BIN)
