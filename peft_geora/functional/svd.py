"""Truncated SVD solvers (torch only): exact, Gram-matrix, and a seeded randomized block Krylov method.

``truncated_svd(solver="auto")`` uses LAPACK for tail components; an exact eigensolve of the small Gram matrix when
``min(out, in) <= GRAM_LIMIT`` (256); otherwise :func:`krylov_svd`, a seeded randomized block Krylov method (block
Lanczos with full re-orthogonalisation, Rayleigh-Ritz on the projected Gram, fp32) that stops when the captured top-r
energy has converged (``KRYLOV_TOL``), with ``niter`` only a cap.

Chosen by measurement on SmolLM2-135M, one CPU core (``benchmarks/krylov_convergence.py``, ``benchmarks/README.md``):
GeoRA's masked matrix ``W_geo`` has a flat spectrum (sigma_17 / sigma_16 ~ 0.99), and so has ``W`` near its 16th
value. Subspace iteration (q = r + 16, 4 power iterations) captured as little as 0.942 of the exact top-16 energy of
``W_geo``, and its spectral masks agreed with the exact ones on only 83% of the entries. Block Krylov with blocks of
r/2 reaches >= 0.9998 on every SmolLM2 layer in 8 to 20 steps (median 15), and its spectral masks agree on 99.3% of
the entries (the rest sit at the threshold of a W_k that is ill-conditioned where sigma_16 ~ sigma_17). Blocks of r
took 1.9x longer for the same energy, blocks of 4-6 were slower again (narrow products), larger tolerances failed
0.999 on random 7B-shaped matrices, and warm-starting the ``W_geo`` solve from ``W``'s singular subspace did not help
(the subspaces are unrelated). Reaching 0.999 on such flat spectra takes ~130 Krylov vectors per SVD, two SVDs per
weight, where PiSSA's ``niter_4`` sketch uses 80 in one SVD at lower accuracy (0.90 to 0.93 of the top-16 energy of
``W_geo``): that bounds how close to PiSSA's speed an accurate GeoRA init can get.

On CUDA, Krylov steps never wait for the host and convergence checks are spaced geometrically (:data:`CHECK_GROWTH`):
a step's products take 0.06-0.37 ms there, a check on the host 1-2 ms. Everything is seeded through private
generators.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .selection import seeded_generator

Components = Literal["head", "tail"]
Solver = Literal["auto", "exact", "randomized"]

COMPONENTS: tuple[str, ...] = ("head", "tail")
SOLVERS: tuple[str, ...] = ("auto", "exact", "randomized")

# Default solver settings (GeoRAConfig's svd_niter / svd_oversample defaults).
DEFAULT_NITER = 64  # at most this many Krylov steps; the tolerance stops far earlier (8 to 20 on SmolLM2)
DEFAULT_OVERSAMPLE = 0  # extra vectors per Krylov block, see krylov_block
KRYLOV_TOL = 2e-4  # stop when r new Krylov vectors raise the top-r Ritz energy by less than this fraction
GRAM_LIMIT = 256  # 'auto' solves matrices with min(out, in) <= this exactly through their Gram matrix
# Cost of a convergence check (a dense eigensolve of size n on the host) as CHECK_COST * n^3 flops of the solver's
# matrix products on the matrix's device: the solver checks once the products since the last check cost as much.
CHECK_COST: dict[str, float] = {"cpu": 10.0}
# ... and, per device type, only once the basis has grown by this factor since the last check. On an H100 a Krylov
# step's products take 0.06-0.37 ms on 7B-shaped matrices and a check (host eigensolve) 1-2 ms; spacing the checks
# by 1.25 made the solves 1.0-1.9x faster there (benchmarks/decompose_stages.py), on the CPU it made them slower.
CHECK_GROWTH: dict[str, float] = {"cpu": 1.0, "cuda": 1.25}


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, niter: int = 4, oversample: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD by a seeded randomized range finder with ``niter`` QR-stabilised power iterations.

    Plain subspace iteration with a fixed cost, kept for callers that want it (the diagnostics);
    :func:`krylov_svd`, used by ``truncated_svd(solver="randomized")``, needs far fewer products on flat spectra.
    """
    m, n = matrix.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(
        n, q, generator=seeded_generator(matrix.device, seed), device=matrix.device, dtype=matrix.dtype
    )
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def _exact_svd(
    matrix: torch.Tensor, rank: int, components: Components = "head"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if components == "head":
        return u[:, :rank], s[:rank], vh[:rank]
    return u[:, -rank:], s[-rank:], vh[-rank:]


def _from_ritz(
    short: torch.Tensor, images: torch.Tensor, tall: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Singular triplets from Ritz vectors: ``short`` (r x small) orthonormal rows on the short side of ``A`` and
    ``images`` (r x long) their images under ``A`` (sigma_i u_i up to rounding), obtained without another product.

    Returns ``None`` when a selected singular value is negligible (rank-deficient input); callers fall back to LAPACK.
    """
    s = torch.linalg.vector_norm(images, dim=1)
    s, order = s.sort(descending=True)
    if not bool(s[-1] > s[0] * 1e-4):
        return None
    short, long = short[order], images[order] / s[:, None]
    if tall:
        return long.T, s, short
    return short.T, s, long


def gram_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD from the eigendecomposition of the Gram matrix of the short side (exact, cheap when short).

    Squaring halves the relative precision of small singular values only; the leading ones, which GeoRA uses,
    are accurate to working precision. Rank-deficient inputs fall back to LAPACK.
    """
    m, n = matrix.shape
    tall = m >= n
    rows = matrix.T if tall else matrix  # the short side's unit vectors mapped through A, as rows
    _, vecs = _small_eigh(rows @ rows.T, vectors=True)
    coeffs = vecs[:, -rank:].flip(-1).T  # (r x small)
    out = _from_ritz(coeffs, coeffs @ rows, tall)
    return out if out is not None else _exact_svd(matrix, rank)


def _small_eigh(matrix: torch.Tensor, vectors: bool) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of a small symmetric matrix, on the CPU (GPU solvers are slow at these sizes)."""
    host = matrix.cpu()
    if not vectors:
        return torch.linalg.eigvalsh(host)
    values, vecs = torch.linalg.eigh(host)
    return values.to(matrix.device), vecs.to(matrix.device)


def krylov_block(rank: int, oversample: int = DEFAULT_OVERSAMPLE) -> int:
    """Block size of :func:`krylov_svd`: ``max(8, ceil(rank / 2)) + oversample``.

    Measured on SmolLM2 (r=16): blocks of r/2 reach 0.999 of the top-r energy with fewer products and a smaller
    projected problem than blocks of r (1.9x faster for W_geo); blocks of 4-6 need more, slower narrow products.
    """
    return max(8, math.ceil(rank / 2)) + oversample


def krylov_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    niter: int = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
    tol: float = KRYLOV_TOL,
    block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD by a seeded randomized block Krylov method (block Lanczos on the short side's Gram).

    Builds an orthonormal basis ``K`` of ``span{X, G X, ..., G^d X}`` with ``G = A^T A`` on the short side, a
    random block ``X`` of ``block`` vectors (default :func:`krylov_block`; other sizes are for measurements) and
    full re-orthogonalisation, and takes Ritz vectors from the projected Gram ``K G K^T``, whose entries come for
    free from the re-orthogonalisation. It stops once the
    last ``rank`` basis vectors raised the sum of the top-``rank`` Ritz values (the captured energy, a lower bound
    of the exact one) by less than ``tol`` of it, or after ``niter`` steps (``tol=0`` runs them all; at least enough
    steps for ``rank`` vectors are taken). Convergence is checked only as often as the check (a small eigenvalue
    problem on the host) costs less than the products since the last one (:data:`CHECK_COST`), and on a GPU only
    after the basis grew by :data:`CHECK_GROWTH`. Each step costs two products of ``A`` with one block. A new block
    with a negligible direction (rank-deficient input: the Krylov space has become partly or wholly invariant)
    hands the matrix to LAPACK, which is exact there; that is recorded on the device and read at the checks and at
    the end, so that steps never wait for the host.
    """
    m, n = matrix.shape
    tall = m >= n
    small = min(m, n)
    # the basis lives on the short side, as rows: y = x A^T (long side), z = y A = x A^T A (short side)
    fwd, back = (matrix.T, matrix) if tall else (matrix, matrix.T)
    if block is not None and block < 1:
        raise ValueError(f"block must be a positive number of vectors, got {block}")
    block = min(block or krylov_block(rank, oversample), small)
    steps = max(0, min(max(niter, math.ceil(rank / block)), small // block - 1))
    dim = (steps + 1) * block
    dtype, device = matrix.dtype, matrix.device
    basis = torch.empty(dim, small, dtype=dtype, device=device)
    images = torch.empty(dim, max(m, n), dtype=dtype, device=device)
    proj = torch.zeros(dim, dim, dtype=dtype, device=device)
    degenerate = torch.zeros(steps + 1, dtype=torch.bool, device=device)  # step i's new block lost a direction
    start = torch.randn(small, block, generator=seeded_generator(device, seed), dtype=dtype, device=device)
    basis[:block] = torch.linalg.qr(start).Q.T
    step_work, pending_work = 4.0 * block * m * n, 0.0  # flops of one step's products, and since the last check
    used, previous, previous_step, checked = block, None, 0, 0
    eps = torch.finfo(dtype).eps
    check_cost = CHECK_COST.get(device.type, CHECK_COST["cpu"])
    growth = CHECK_GROWTH.get(device.type, 1.0)
    for step in range(steps + 1):
        lo, hi = step * block, (step + 1) * block
        y = torch.matmul(basis[lo:hi], fwd, out=images[lo:hi])
        z = y @ back
        h = z @ basis[:hi].T
        proj[lo:hi, :hi] = h
        proj[:hi, lo:hi] = h.T
        used = hi
        if step == steps:
            break
        pending_work += step_work
        if tol > 0 and hi >= 2 * rank and pending_work >= check_cost * hi**3 and hi >= growth * checked:
            if bool(degenerate[:step].any()):
                break  # LAPACK, below
            energy = float(_small_eigh(proj[:hi, :hi], vectors=False)[-rank:].sum())
            gain = (energy - previous) / (step - previous_step) * rank / block if previous is not None else None
            if gain is not None and gain <= tol * energy:
                break
            previous, previous_step, pending_work, checked = energy, step, 0.0, hi
        w = z - h @ basis[:hi]
        w -= (w @ basis[:hi].T) @ basis[:hi]
        q, r = torch.linalg.qr(w.T)
        degenerate[step] = ~(r.diagonal().abs().min() > 100 * eps * torch.linalg.matrix_norm(z))
        basis[hi : hi + block] = q.T
    if used < rank or bool(degenerate[: used // block - 1].any()):  # the steps whose new block is in the basis
        return _exact_svd(matrix, rank)
    _, vecs = _small_eigh(proj[:used, :used], vectors=True)
    coeffs = vecs[:, -rank:].flip(-1).T  # (r x used)
    out = _from_ritz(coeffs @ basis[:used], coeffs @ images[:used], tall)
    return out if out is not None else _exact_svd(matrix, rank)


def _auto_solver(shape: torch.Size, components: Components) -> str:
    if components == "tail":
        return "exact"
    return "gram" if min(shape) <= GRAM_LIMIT else "randomized"


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    components: Components = "head",
    solver: Solver = "auto",
    niter: int = DEFAULT_NITER,
    oversample: int = DEFAULT_OVERSAMPLE,
    seed: int = 0,
    tol: float = KRYLOV_TOL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rank`` singular triplets of ``matrix``: the largest (``head``) or the smallest (``tail``).

    ``solver="exact"`` is LAPACK's SVD, ``"randomized"`` is :func:`krylov_svd` (``niter``, ``oversample``, ``seed``,
    ``tol``). ``"auto"`` uses LAPACK for tail components, :func:`gram_svd` (exact) when ``min(shape) <=
    GRAM_LIMIT`` and the Krylov solver otherwise. Randomized methods cannot find the tail, so that is refused.
    """
    if components not in COMPONENTS:
        raise ValueError(f"components must be one of {COMPONENTS}, got {components!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must lie in [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix, got {rank}")
    if solver == "randomized" and components == "tail":
        raise ValueError("the randomized solver finds leading components only; use solver='exact' for the tail")
    method = _auto_solver(matrix.shape, components) if solver == "auto" else solver
    if method == "randomized":
        return krylov_svd(matrix, rank, niter=niter, oversample=oversample, seed=seed, tol=tol)
    if method == "gram":
        return gram_svd(matrix, rank)
    return _exact_svd(matrix, rank, components)


def truncate_product(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``k`` approximation of ``b @ a`` as factors, without forming the (out x in) product.

    ``b`` is (out x q), ``a`` is (q x in). QR of ``b`` and of ``a^T`` reduce the product to a (q x q) core whose SVD
    gives the Eckart-Young optimum in the Frobenius norm: returns ``(B_k, A_k, rel_err)`` with ``B_k`` (out x k'),
    ``A_k`` (k' x in), ``k' = min(k, q)``, the singular values split as ``sqrt(S)`` on both sides, and
    ``rel_err = ||b a - B_k A_k||_F / ||b a||_F`` (0.0 for a zero product). Computed in float64, returned in
    ``b``'s dtype. Raises ``ValueError`` for ``k < 1`` or factors whose inner dimensions differ.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"truncate_product: rank k must be a positive int, got {k!r}")
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"truncate_product: factors {tuple(b.shape)} and {tuple(a.shape)} do not multiply")
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().T)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    k = min(k, s.numel())
    root = s[:k].sqrt()
    total = float(s.square().sum())
    rel_err = math.sqrt(max(total - float(s[:k].square().sum()), 0.0) / total) if total > 0 else 0.0
    b_k = (q_b @ u[:, :k]) * root
    a_k = root[:, None] * (vh[:k] @ q_a.T)
    return b_k.to(b.dtype), a_k.to(b.dtype), rel_err
