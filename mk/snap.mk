# Snapshots and the microVM runtime (issue 7): `cube bench restore` measures
# crun as its peer (crun + a busybox-static rootfs).
APT_PACKAGES += crun busybox-static

.PHONY: bench-restore
bench-restore: build
	$(BIN)/cube bench restore -n 100 -c 1,10
