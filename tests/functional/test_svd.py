"""The fast initialisation path: it matches the exact path, selects exact thresholds, and is reproducible."""

from __future__ import annotations

import math

import pytest
import torch

import peft_geora.functional as F
import peft_geora.functional.selection as selection
import peft_geora.functional.svd as svd
from peft_geora.functional import (
    geora_decompose,
    geora_masks,
    gram_svd,
    krylov_svd,
    kth_smallest,
    magnitude_threshold,
    quantile_rank,
    truncated_svd,
)

QUALITY = 0.999  # captured energy of the fast top-r against the exact top-r of the same matrix


def student_t(shape: tuple[int, int], gen: torch.Generator, df: int = 3) -> torch.Tensor:
    """Heavy-tailed noise from a private generator: normal / sqrt(chi2_df / df)."""
    chi2 = torch.randn(df, *shape, generator=gen).square().sum(0)
    return torch.randn(shape, generator=gen) / (chi2 / df).sqrt()


def trained_like(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Low rank with a decaying spectrum plus heavy-tailed (Student-t) noise, like a trained weight."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = shape
    scales = torch.logspace(0, -1.5, 24)
    low = (torch.randn(out, 24, generator=gen) * scales) @ torch.randn(24, inp, generator=gen)
    return low / math.sqrt(inp) + student_t(shape, gen) * 0.015


def exact_top_energy(matrix: torch.Tensor, r: int) -> float:
    return float(torch.linalg.svdvals(matrix.double())[:r].square().sum())


def captured(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, matrix: torch.Tensor, r: int) -> float:
    """``||U S V^T||_F^2`` over the exact top-r energy of ``matrix``."""
    return float(((u.double() * s.double()) @ vh.double()).square().sum()) / exact_top_energy(matrix, r)


# min(shape) above GRAM_LIMIT, so 'auto' runs the Krylov solver; both orientations and a square one
SHAPES = [(640, 288), (288, 640), (320, 320)]


@pytest.mark.parametrize("shape", SHAPES)
def test_fast_path_factors_capture_the_exact_top_r_of_w_geo(shape):
    torch.manual_seed(0)
    w = trained_like(shape, seed=sum(shape))
    assert min(shape) > F.GRAM_LIMIT
    dec = geora_decompose(w, 16)  # the defaults: solver 'auto' -> Krylov
    w_geo = w * (dec.masks.spectral | dec.masks.euclidean)
    b0a0 = dec.factors.B.double() @ dec.factors.A.double()  # paper convention: U S V^T
    assert float(b0a0.square().sum()) / exact_top_energy(w_geo, 16) >= QUALITY
    # and the exact path on the same matrix gives the same product up to the (tiny) missing energy
    exact = geora_decompose(w, 16, svd_solver="exact")
    assert torch.equal(exact.masks.euclidean, dec.masks.euclidean)  # thresholds are exact in both


@pytest.mark.parametrize("shape", SHAPES)
def test_krylov_solver_on_a_flat_masked_spectrum(shape):
    """A masked random matrix has a flat top spectrum (sigma_17 ~ sigma_16), where plain subspace iteration stalls."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=gen)
    masked = w * (w.abs() <= magnitude_threshold(w, 0.35))
    s = torch.linalg.svdvals(masked)
    assert s[16] / s[15] > 0.98  # flat: the hard case
    u, sv, vh = krylov_svd(masked, 16)
    assert captured(u, sv, vh, masked, 16) >= QUALITY
    # orthonormal factors, singular values sorted and consistent with the factors
    eye = torch.eye(16, dtype=torch.float64)
    torch.testing.assert_close(u.double().T @ u.double(), eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(vh.double() @ vh.double().T, eye, atol=1e-4, rtol=0)
    assert torch.all(sv[:-1] >= sv[1:])
    torch.testing.assert_close(sv, s[:16], rtol=2e-3, atol=0)
    # the former default (subspace iteration, q = r + 16, 4 power iterations) is measurably worse here
    u4, s4, vh4 = F.randomized_svd(masked, 16, niter=4, oversample=16)
    assert captured(u4, s4, vh4, masked, 16) < captured(u, sv, vh, masked, 16)


def test_krylov_budget_knobs(monkeypatch):
    """``niter`` caps the steps (more steps, more energy), ``tol=0`` runs them all, tiny budgets still give rank r,
    ``block`` sets the block size."""
    w = trained_like((500, 300), seed=11)
    masked = w * (w.abs() <= magnitude_threshold(w, 0.4))
    assert F.krylov_block(16) == 8 and F.krylov_block(64) == 32 and F.krylov_block(4) == 8
    assert F.krylov_block(16, oversample=4) == 12
    energies = [captured(*krylov_svd(masked, 16, niter=niter, tol=0.0), masked, 16) for niter in (0, 4, 12, 30)]
    assert all(a <= b + 1e-6 for a, b in zip(energies, energies[1:]))
    assert energies[-1] >= QUALITY
    u, s, vh = krylov_svd(masked, 16, niter=0)  # at least enough steps for r vectors
    assert u.shape == (500, 16) and vh.shape == (16, 300) and torch.isfinite(s).all()
    # ``block`` overrides krylov_block: the Krylov space has (niter + 1) blocks of that many vectors
    sizes = []
    real_eigh = svd._small_eigh
    monkeypatch.setattr(
        svd, "_small_eigh", lambda matrix, vectors: sizes.append(len(matrix)) or real_eigh(matrix, vectors)
    )
    for block in (1, 4, None):
        krylov_svd(masked, 16, block=block, niter=20, tol=0.0)
    assert sizes == [21 * 1, 21 * 4, 21 * 8]
    for block in (1, 4):
        assert captured(*krylov_svd(masked, 16, block=block), masked, 16) >= QUALITY
    with pytest.raises(ValueError, match="block must be a positive number of vectors, got 0"):
        krylov_svd(masked, 16, block=0)


def test_spaced_checks_of_the_gpu_path_keep_the_quality(monkeypatch):
    """The GPU's geometric check spacing (``CHECK_GROWTH``), run here on the CPU: fewer checks, same quality."""
    w = torch.randn(640, 320, generator=torch.Generator().manual_seed(3))
    masked = w * (w.abs() <= magnitude_threshold(w, 0.35))
    checks = []
    real_eigh = svd._small_eigh

    def counting(matrix, vectors):
        checks.append((matrix.shape[0], vectors))
        return real_eigh(matrix, vectors)

    monkeypatch.setattr(svd, "_small_eigh", counting)
    every = krylov_svd(masked, 16)
    every_checks, checks[:] = len(checks), []
    monkeypatch.setitem(svd.CHECK_GROWTH, "cpu", 1.25)
    spaced = krylov_svd(masked, 16)
    sizes = [n for n, vectors in checks if not vectors]
    assert len(checks) < every_checks
    assert all(b >= 1.25 * a for a, b in zip(sizes, sizes[1:]))
    assert captured(*spaced, masked, 16) >= QUALITY and captured(*every, masked, 16) >= QUALITY


@pytest.mark.parametrize("growth", [1.0, 1.25])
@pytest.mark.parametrize("rank", [3, 12])
def test_a_partly_invariant_krylov_space_hands_over_to_lapack(monkeypatch, growth, rank):
    """Exactly low rank: a Krylov block loses directions (detected without a per-step sync); the answer stays exact.

    Rank 12 with blocks of 8 used to stop at a 16-vector space holding only part of the range (10% error).
    """
    monkeypatch.setitem(svd.CHECK_GROWTH, "cpu", growth)
    gen = torch.Generator().manual_seed(5)
    low = torch.randn(500, rank, generator=gen) @ torch.randn(rank, 400, generator=gen)
    u, s, vh = krylov_svd(low, 8)
    ue, se, vhe = torch.linalg.svd(low, full_matrices=False)
    assert torch.equal(s, se[:8]) and torch.equal(u, ue[:, :8]) and torch.equal(vh, vhe[:8])


@pytest.mark.parametrize("shape", [(200, 120), (120, 200), (256, 300)])
def test_gram_path_is_exact(shape):
    w = trained_like(shape, seed=5)
    u, s, vh = gram_svd(w, 12)
    ue, se, vhe = torch.linalg.svd(w.double(), full_matrices=False)
    torch.testing.assert_close(s.double(), se[:12], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close((u * s) @ vh, ((ue[:, :12] * se[:12]) @ vhe[:12]).float(), rtol=1e-3, atol=1e-4)
    # 'auto' takes this path for short sides up to GRAM_LIMIT
    for a, b in zip(truncated_svd(w, 12), (u, s, vh)):
        assert torch.equal(a, b)


def test_rank_deficient_and_zero_matrices_fall_back_to_lapack():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(400, 3, generator=gen) @ torch.randn(3, 300, generator=gen)  # rank 3 < r = 8
    for matrix in (low, torch.zeros(400, 300)):
        for solver in ("auto", "randomized"):
            u, s, vh = truncated_svd(matrix, 8, solver=solver)
            assert u.shape == (400, 8) and s.shape == (8,) and vh.shape == (8, 300)
            assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()
            torch.testing.assert_close((u * s) @ vh, matrix, atol=1e-4, rtol=1e-4)


def test_exact_solver_is_still_available_and_matches_lapack():
    w = trained_like((300, 280), seed=9)
    u, s, vh = truncated_svd(w, 10, solver="exact")
    ue, se, vhe = torch.linalg.svd(w, full_matrices=False)
    assert torch.equal(s, se[:10]) and torch.equal(u, ue[:, :10]) and torch.equal(vh, vhe[:10])
    tail = truncated_svd(w, 4, components="tail")  # 'auto' keeps LAPACK for the tail
    assert torch.equal(tail[1], se[-4:])


# ---------------------------------------------------------------- selection


def sorted_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.reshape(-1).sort().values[k - 1]


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


def test_masks_equal_a_sort_based_reference_on_a_large_matrix():
    w = trained_like((1100, 1000), seed=4)  # 1.1M entries
    masks = geora_masks(w, rho=0.2, spectral_rank=16, svd_solver="exact")
    mags = w.abs()
    k = quantile_rank(0.2, w.numel())
    assert torch.equal(masks.euclidean, mags <= sorted_kth(mags, k))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_k = ((u[:, :16] * s[:16]) @ vh[:16]).abs()
    assert torch.equal(masks.spectral, w_k <= sorted_kth(w_k, k))


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_the_cpu_thresholds_and_meets_the_quality_target():
    w = trained_like((1100, 700), seed=8)
    k = quantile_rank(0.2, w.numel())
    assert kth_smallest(w.abs().cuda(), k).item() == sorted_kth(w.abs(), k).item()
    dec = geora_decompose(w.cuda(), 16)
    assert torch.equal(dec.masks.euclidean.cpu(), geora_decompose(w, 16).masks.euclidean)
    w_geo = w * (dec.masks.spectral | dec.masks.euclidean).cpu()
    energy = float((dec.factors.B.double() @ dec.factors.A.double()).square().sum())
    assert energy >= QUALITY * exact_top_energy(w_geo, 16)
    again = geora_decompose(w.cuda(), 16)  # reproducible on the device too
    assert torch.equal(again.factors.A, dec.factors.A) and torch.equal(again.factors.B, dec.factors.B)


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


def test_masks_and_w_geo_do_not_depend_on_the_chunking(monkeypatch):
    w = trained_like((640, 288), seed=12)
    whole = {p: geora_decompose(w, 16, priors=p) for p in ("union", "spectral", "euclidean")}
    monkeypatch.setattr(selection, "_SELECT_CHUNK", 10_000)
    for priors, expected in whole.items():
        chunked = geora_decompose(w, 16, priors=priors)
        assert torch.equal(chunked.masks.spectral, expected.masks.spectral)
        assert torch.equal(chunked.masks.euclidean, expected.masks.euclidean)
        assert torch.equal(chunked.factors.A, expected.factors.A)
        assert torch.equal(chunked.factors.B, expected.factors.B)


# ---------------------------------------------------------------- reproducibility


def test_same_seed_gives_bitwise_the_same_factors_whatever_the_global_rng():
    w = trained_like((640, 288), seed=21)
    torch.manual_seed(0)
    first = geora_decompose(w, 16, svd_seed=7)
    torch.manual_seed(12345)
    torch.rand(1000)  # move the global generator
    second = geora_decompose(w, 16, svd_seed=7)
    assert torch.equal(first.factors.A, second.factors.A) and torch.equal(first.factors.B, second.factors.B)
    assert torch.equal(first.masks.spectral, second.masks.spectral)
    assert torch.equal(first.masks.euclidean, second.masks.euclidean)
    other = geora_decompose(w, 16, svd_seed=8)
    assert not torch.equal(other.factors.A, first.factors.A)
    w_geo = w * (other.masks.spectral | other.masks.euclidean)
    assert float((other.factors.B.double() @ other.factors.A.double()).square().sum()) >= QUALITY * exact_top_energy(
        w_geo, 16
    )


def test_global_rng_is_not_consumed():
    w = trained_like((640, 288), seed=22)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    geora_decompose(w, 16)
    kth_smallest(torch.rand(300_000, generator=torch.Generator().manual_seed(0)), 1000)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_smollm2_layers_meet_the_quality_target(smollm2_path):
    """The real target: on SmolLM2, every projection type of the first and last layer captures >= 0.999."""
    from safetensors.torch import load_file

    weights = load_file(str(smollm2_path / "model.safetensors"))
    names = [k for k in weights if k.endswith("proj.weight") and (".layers.0." in k or ".layers.29." in k)]
    assert len(names) == 14
    for name in names:
        w = weights[name].float()
        dec = geora_decompose(w, 16)
        w_geo = w * (dec.masks.spectral | dec.masks.euclidean)
        energy = float((dec.factors.B.double() @ dec.factors.A.double()).square().sum())
        assert energy >= QUALITY * exact_top_energy(w_geo, 16), name


def test_config_defaults_are_the_fast_path():
    from peft_geora import GeoRAConfig

    config = GeoRAConfig()
    assert config.svd_solver == "auto"
    assert (config.svd_niter, config.svd_oversample) == (F.DEFAULT_NITER, F.DEFAULT_OVERSAMPLE)
