# Control plane (issue 4): `cube server` (API + proxy + node).
# - PostgreSQL: internal/store's tests start a throwaway server from Debian's
#   binaries (initdb + pg_ctl as the postgres user, unix socket only).
# - The stock E2B SDKs for the end-to-end suite in test/e2e, installed into
#   $(CACHE)/npm keyed by their versions (e2b 2.45.0 under the alias e2b-245:
#   it still uses the v1 create/connect routes).
APT_PACKAGES += postgresql

API_NPM_PKGS := e2b@2.51.0 @e2b/code-interpreter@2.8.0 e2b-245@npm:e2b@2.45.0
API_NPM_KEY  := $(shell echo '$(API_NPM_PKGS)' | sha256sum | cut -c1-12)
API_NPM_DIR  := $(CACHE)/npm/api-$(API_NPM_KEY)

TEST_TARGETS += test-api-e2e

.PHONY: api-npm test-api-e2e bench-api

api-npm:
	@command -v npm >/dev/null || scripts/deps.sh nodejs npm
	@test -f $(API_NPM_DIR)/.done || { \
	  rm -rf $(API_NPM_DIR) && mkdir -p $(API_NPM_DIR) && cd $(API_NPM_DIR) && \
	  echo '{"name":"cube-api-e2e","private":true}' > package.json && \
	  npm install --no-audit --no-fund --silent $(API_NPM_PKGS) && touch .done; }

# Starts a real `cube server` (gVisor runtime, built-in templates) on a free
# port with a temporary data dir and runs the stock SDKs against it.
test-api-e2e: build runsc api-npm
	NODE_PATH=$(API_NPM_DIR)/node_modules CUBE_BIN=$(BIN) CUBE_CACHE_DIR=$(CACHE) \
	  node --test --test-concurrency=1 --test-timeout=900000 test/e2e/

# End-to-end create latency through the API, then through the stock SDK.
bench-api: build runsc api-npm
	NODE_PATH=$(API_NPM_DIR)/node_modules $(BIN)/cube bench api -c 1,10,50 --template base \
	  --sdk-script test/e2e/bench-sdk.mjs
