"""Workers and test-only helpers for tests/integration/test_distributed*.py (run in subprocesses, not collected)."""
