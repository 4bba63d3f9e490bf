# Every target sets up what it needs (scripts/bootstrap is idempotent).
VENV   := .venv
BIN    := $(VENV)/bin
TYPED  := attestation agent cube

.PHONY: setup lint test test-fast bench demo clean

setup:
	@scripts/bootstrap

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict $(TYPED)

# The README's test command: lint, types, and every test including the slow end-to-end ones.
test: lint
	$(BIN)/pytest -q

# Fast tests only (no real processes, no VM).
test-fast: setup
	$(BIN)/pytest -q -m "not slow"

bench: setup
	$(BIN)/python scripts/bench-attestation

demo: setup
	@scripts/demo

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build *.egg-info
