"""Tests of the benchmark scripts (benchmarks/) and the RLVR benchmark's metrics."""
