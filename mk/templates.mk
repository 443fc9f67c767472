# Built-in templates (base, code-interpreter). Their debootstrap root
# filesystems are cached in $(CACHE)/rootfs by recipe hash (about 1 min for
# base, 10 for code-interpreter on first build; instant afterwards).
#   templates-rootfs  the cached root filesystems (what the tests use)
#   templates         full templates in $(DATA_DIR): agent injected, ext4
#                     image, baked by the gVisor runtime (for `make run`)
.PHONY: templates-rootfs templates

templates-rootfs: build
	$(BIN)/cube tpl create-builtin --rootfs-only base code-interpreter

templates: build runsc templates-rootfs
	$(BIN)/cube --data-dir $(DATA_DIR) tpl create-builtin base
	@# code-interpreter's bake probes the agent's :49999 server; until the
	@# agent serves it, the template ends FAILED (with the reason) and `make
	@# run` goes on with base.
	$(BIN)/cube --data-dir $(DATA_DIR) tpl create-builtin code-interpreter || \
	  echo "templates: code-interpreter not ready (see: cube tpl info code-interpreter)"

TEST_PREREQS += templates-rootfs
RUN_PREREQS  += templates
