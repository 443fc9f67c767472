# Repository hygiene run by `make test`.
.PHONY: check-size
check-size:
	@scripts/check-size.sh
TEST_TARGETS += check-size
