# issue 6: the guest kernel. `make kernel` builds a minimal kernel from
# Debian's linux-source-6.1 with kernel/guest.config on top of tinyconfig,
# cached in $(CACHE)/kernel/<hash of source version + config>/{bzImage,vmlinux}.
# `kernel/build.sh --dir` prints that directory without building.
KERNEL_APT := linux-source-6.1 build-essential flex bison bc libelf-dev
APT_PACKAGES += $(KERNEL_APT)

.PHONY: kernel
kernel:
	@scripts/deps.sh $(KERNEL_APT)
	@CACHE=$(CACHE) kernel/build.sh
