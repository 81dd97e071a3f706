"""The SVD solvers (LAPACK, Gram matrix, seeded block Krylov) and ``truncate_product``: the fast solvers capture the
exact top-r, fall back to LAPACK where they must, and the truncation of a product is the dense SVD's."""

from __future__ import annotations

import pytest
import torch

import peft_geora.functional as F
import peft_geora.functional.svd as svd
from peft_geora.functional import gram_svd, krylov_svd, magnitude_threshold, truncate_product, truncated_svd

from .matrices import KRYLOV_SHAPES, QUALITY, captured, trained_like


@pytest.mark.parametrize("shape", KRYLOV_SHAPES)
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


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_truncate_product_is_the_dense_svd_truncation(k):
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(50, 6, generator=gen), torch.randn(6, 40, generator=gen)
    b_k, a_k, rel_err = truncate_product(b, a, k)
    dense = b.double() @ a.double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    kept = min(k, 6)
    best = (u[:, :kept] * s[:kept]) @ vh[:kept]
    assert b_k.shape == (50, kept) and a_k.shape == (kept, 40) and b_k.dtype == torch.float32
    torch.testing.assert_close((b_k @ a_k).double(), best, rtol=1e-5, atol=1e-5)
    expected = float(s[kept:].square().sum().sqrt() / s.square().sum().sqrt())
    assert abs(rel_err - expected) <= 1e-9 + 1e-6 * expected
    torch.testing.assert_close(b_k.norm(dim=0), a_k.norm(dim=1))  # sqrt(S) on both sides


def test_truncate_product_edge_cases():
    zero_b, zero_a, err = truncate_product(torch.zeros(5, 2), torch.zeros(2, 4), 1)
    assert err == 0.0 and not (zero_b @ zero_a).any()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank k must be a positive int"):
            truncate_product(torch.ones(5, 2), torch.ones(2, 4), bad)
    with pytest.raises(ValueError, match="do not multiply"):
        truncate_product(torch.ones(5, 2), torch.ones(3, 4), 1)
