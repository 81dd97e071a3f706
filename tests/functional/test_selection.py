"""Exact order statistics (``kth_smallest``, the rho-quantile thresholds) on every path: direct, bracketing in
chunks, the bracket's fallback, and the GPU's sort-based selection, against a full sort."""

from __future__ import annotations

import pytest
import torch

import peft_geora.functional.selection as selection
from peft_geora.functional import kth_smallest, magnitude_threshold, quantile_rank

from .matrices import sorted_kth, student_t


def test_kth_smallest_matches_sort_above_one_million_entries_with_ties():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1200, 1000, generator=gen)  # 1.2M entries: the bracketing path
    x[::3, ::5] = 0.25  # many ties, some right at quantiles
    x[5, :] = -0.0
    x[7, :] = 0.0
    n = x.numel()
    assert n > selection._DIRECT_SELECT_LIMIT
    for k in (1, 2, 1000, quantile_rank(0.2, n), n // 2, quantile_rank(0.8, n), n - 1, n):
        assert kth_smallest(x, k).item() == sorted_kth(x, k).item(), k


def test_kth_smallest_on_magnitudes_gives_sort_based_masks():
    w = student_t((1100, 1000), torch.Generator().manual_seed(2)) * 0.02
    w[::11] = 0.01  # ties at many magnitudes
    mags = w.abs()
    for rho in (0.2, 0.05, 0.5):
        k = quantile_rank(rho, mags.numel())
        tau = magnitude_threshold(w, rho)
        assert tau.item() == sorted_kth(mags, k).item()
        assert torch.equal(mags <= tau, mags <= sorted_kth(mags, k))
        assert int((mags <= tau).sum()) >= k > int((mags < tau).sum())


def test_kth_smallest_exact_when_the_bracket_misses(monkeypatch):
    """A zero-width bracket almost always misses: the fallback must still be exact."""
    monkeypatch.setattr(selection, "_SELECT_SIGMAS", 0.0)
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(300_000, generator=gen)
    for k in (17, 60_000, 150_001, 299_990):
        for seed in range(3):
            assert kth_smallest(x, k, seed=seed).item() == sorted_kth(x, k).item()


def test_sort_based_selection_of_the_gpu_path_is_exact(monkeypatch):
    """The GPU reads order statistics off a sort (``SORT_SELECT_DEVICES``); run here on the CPU, it must agree."""
    monkeypatch.setattr(selection, "SORT_SELECT_DEVICES", ("cpu",))
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(1200, 1000, generator=gen).abs()
    x[::3, ::5] = 0.25  # ties
    n = x.numel()
    for k in (1, 1000, quantile_rank(0.2, n), n // 2, n):
        assert kth_smallest(x, k).item() == sorted_kth(x, k).item(), k
    small = torch.rand(1000, generator=gen)
    assert kth_smallest(small, 17).item() == sorted_kth(small, 17).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int32])
def test_kth_smallest_other_dtypes(dtype):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(200_000, generator=gen) * 100).to(dtype)
    for k in (1, 40_000, 123_457, 200_000):
        assert kth_smallest(x, k).item() == sorted_kth(x, k).item()


def test_kth_smallest_in_chunks_is_exact_and_leaves_the_input_alone(monkeypatch):
    """The bracketing passes run in chunks (bounded scratch); several chunks must give the same exact answer."""
    monkeypatch.setattr(selection, "_SELECT_CHUNK", 50_000)
    x = torch.rand(500, 400, generator=torch.Generator().manual_seed(7))
    x[::7] = 0.5  # ties
    before = x.clone()
    for k in (1, 17, quantile_rank(0.2, x.numel()), 100_000, x.numel()):
        assert kth_smallest(x, k).item() == sorted_kth(x, k).item(), k
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="k must lie"):
        kth_smallest(x, 0)


def test_kth_smallest_matches_sort_on_a_large_tensor():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1_300_000, generator=gen).abs()
    x[::7] = 0.5  # many ties
    ordered = x.sort().values
    for k in (1, 1000, 260_000, 650_000, 1_299_999, 1_300_000):
        assert kth_smallest(x, k).item() == ordered[k - 1].item()
