"""The end-to-end tests' session fixtures (vLLM, the tiny model, a token issuer) live in
tests/conftest.py, shared with tests/proxy and tests/client so that each server starts once."""
