"""Tests of peft_geora.functional: order statistics, SVD solvers, the decomposition."""
