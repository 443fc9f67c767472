# cube-agent (issue 2): protobuf generation, the Debian packages the code
# interpreter needs (a real ipykernel), and the end-to-end test against the
# stock npm SDKs (installed into $(CACHE)/npm, keyed by their versions).
APT_PACKAGES += protobuf-compiler libprotobuf-dev python3-ipykernel python3-matplotlib python3-pandas python3-numpy nodejs
TEST_TARGETS += test-agent-e2e

AGENT_PROTOC_GEN_GO_VERSION      := v1.36.12
AGENT_PROTOC_GEN_CONNECT_VERSION := v1.21.1
AGENT_NPM_PKGS := e2b@2.51.0 @e2b/code-interpreter@2.8.0
AGENT_NPM_KEY  := $(shell echo '$(AGENT_NPM_PKGS)' | sha256sum | cut -c1-12)
AGENT_NPM_DIR  := $(CACHE)/npm/agent-$(AGENT_NPM_KEY)

.PHONY: proto agent-protoc-plugins agent-npm test-agent-e2e bench-agent

agent-protoc-plugins:
	@mkdir -p $(CACHE)/bin
	@test -f $(CACHE)/bin/protoc-gen-go-$(AGENT_PROTOC_GEN_GO_VERSION) || { \
	  GOBIN=$(CACHE)/bin $(GO) install google.golang.org/protobuf/cmd/protoc-gen-go@$(AGENT_PROTOC_GEN_GO_VERSION) && \
	  touch $(CACHE)/bin/protoc-gen-go-$(AGENT_PROTOC_GEN_GO_VERSION); }
	@test -f $(CACHE)/bin/protoc-gen-connect-go-$(AGENT_PROTOC_GEN_CONNECT_VERSION) || { \
	  GOBIN=$(CACHE)/bin $(GO) install connectrpc.com/connect/cmd/protoc-gen-connect-go@$(AGENT_PROTOC_GEN_CONNECT_VERSION) && \
	  touch $(CACHE)/bin/protoc-gen-connect-go-$(AGENT_PROTOC_GEN_CONNECT_VERSION); }

# Regenerates proto/**/*.pb.go and *.connect.go (committed).
proto: agent-protoc-plugins
	cd proto && protoc -I . -I /usr/include \
	  --plugin=protoc-gen-go=$(CACHE)/bin/protoc-gen-go \
	  --plugin=protoc-gen-connect-go=$(CACHE)/bin/protoc-gen-connect-go \
	  --go_out=. --go_opt=paths=source_relative \
	  --connect-go_out=. --connect-go_opt=paths=source_relative \
	  process/process.proto filesystem/filesystem.proto

agent-npm:
	@command -v npm >/dev/null || scripts/deps.sh npm
	@test -f $(AGENT_NPM_DIR)/.done || { \
	  mkdir -p $(AGENT_NPM_DIR) && cd $(AGENT_NPM_DIR) && \
	  echo '{"name":"cube-agent-e2e","private":true}' > package.json && \
	  npm install --no-audit --no-fund --silent $(AGENT_NPM_PKGS) && touch .done; }

# Starts cube-agent on loopback and drives it with the stock SDKs (which
# need node >= 20.18.1; the Go tests of internal/agent cover the same
# surface without node).
test-agent-e2e: build
	@if ! node -e 'const [a,b]=process.versions.node.split(".").map(Number); process.exit(a>20||(a===20&&b>=18)?0:1)' 2>/dev/null; then \
	  echo "test-agent-e2e: SKIP: the e2b SDK needs node >= 20.18.1, found $$(node --version 2>/dev/null || echo none)"; exit 0; fi; \
	$(MAKE) --no-print-directory agent-npm && \
	NODE_PATH=$(AGENT_NPM_DIR)/node_modules CUBE_AGENT_BIN=$(BIN)/cube-agent \
	  node --test --test-concurrency=1 test/e2e-agent/
