# Every target sets up what it needs (scripts/bootstrap is idempotent).
VENV   := .venv
BIN    := $(VENV)/bin
TYPED  := attestation agent proxy cube cube_client
# vLLM (CPU build) and the tiny model for the end-to-end tests live outside the checkout;
# scripts/setup-vllm and scripts/make-tiny-model are idempotent (well under a second when cached).
export CUBE_CACHE ?= $(HOME)/.cache/cube
TINY_MODEL := $(CUBE_CACHE)/models/cube-tiny

.PHONY: setup vllm lint test test-fast bench bench-agent demo demo-stop clean

setup:
	@scripts/bootstrap

# The vLLM venv (first time ~4 min, 2.5 GB) and the tiny model; test-fast does not need them.
vllm:
	@scripts/setup-vllm >/dev/null
	@scripts/make-tiny-model $(TINY_MODEL) >/dev/null

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(TYPED)

# The README's test command: lint, types, and every test including the slow end-to-end ones.
test: lint vllm
	$(BIN)/pytest -q --durations=12

# Fast tests only (no real processes, no VM).
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

bench: setup
	$(BIN)/python scripts/bench-attestation

# vLLM directly vs. through cube-agent, same run (docs/benchmarks.md).
bench-agent: setup vllm
	$(BIN)/python scripts/bench-agent

demo: setup
	@scripts/demo

# Stop what `make demo` left running.
demo-stop:
	@scripts/demo stop

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
