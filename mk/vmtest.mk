# issue 6: `make vmtest`, real-KVM tests inside a QEMU-TCG-emulated AMD
# machine (see docs/vmtest.md). Knobs: VMTEST_RUN=<-test.run pattern>,
# VMTEST_TIMEOUT=<go duration>, VMTEST_VERBOSE=1.
VMTEST_APT := qemu-system-x86 busybox-static cpio e2fsprogs binutils
APT_PACKAGES += $(VMTEST_APT)
TEST_TARGETS += vmtest

.PHONY: vmtest
vmtest: kernel
	@scripts/deps.sh $(VMTEST_APT)
	@CACHE=$(CACHE) GO=$(GO) VMTEST_RUN='$(VMTEST_RUN)' VMTEST_TIMEOUT='$(VMTEST_TIMEOUT)' \
	  VMTEST_VERBOSE='$(VMTEST_VERBOSE)' test/vmtest/run.sh
