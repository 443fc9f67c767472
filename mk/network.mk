# internal/network: sandbox network slots (netns, veth, tap, nftables via
# netlink). The tests and the service need no binary beyond the kernel
# (nftables and conntrack are listed for operators' debugging).
APT_PACKAGES += nftables conntrack iproute2

.PHONY: bench-net
# Slot acquire (pool vs cold) and HTTP into a slot via Dial vs loopback.
bench-net: build
	$(BIN)/cube bench net
