"""Workers and test-only helpers for tests/test_distributed.py (launched in subprocesses, not collected)."""
