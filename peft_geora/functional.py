"""GeoRA's initialisation as plain torch functions (no PEFT needed).

For a weight ``W`` (out x in) and rank ``r``:

1. spectral prior ``M_spec = |W_k| <= tau_spec`` where ``W_k`` is the rank-k truncated SVD of ``W``
   (k = ``spectral_rank``, default ``r``) and ``tau_spec`` its rho-quantile of magnitudes;
2. Euclidean prior ``M_euc = |W| <= tau_euc`` with ``tau_euc`` the rho-quantile of ``|W|``;
3. ``W_geo = W * (M_spec | M_euc)``;
4. ``W_geo ~ U_r S_r V_r^T``; ``A0 = sqrt(S_r / c) V_r^T``, ``B0 = U_r sqrt(S_r / c)``, where ``c`` is 1 for the
   paper's convention and the LoRA scaling ``s`` for PiSSA's.

The rho-quantile of ``n`` magnitudes is their k-th smallest value with ``k = ceil(rho * n)`` (at least 1), and a
mask keeps every entry ``<=`` it, so ties are all kept. Everything is computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch

Priors = Literal["union", "spectral", "euclidean", "none"]
Components = Literal["head", "tail"]
Solver = Literal["auto", "exact", "randomized"]

PRIORS: tuple[str, ...] = ("union", "spectral", "euclidean", "none")
COMPONENTS: tuple[str, ...] = ("head", "tail")
SOLVERS: tuple[str, ...] = ("auto", "exact", "randomized")

# Below this many entries, torch.kthvalue on the whole tensor is cheaper than bracketing.
_DIRECT_SELECT_LIMIT = 1 << 20
_SELECT_SAMPLE = 1 << 16


class GeoRAMasks(NamedTuple):
    """The two boolean priors of one weight, shaped like the (out x in) weight."""

    spectral: torch.Tensor
    euclidean: torch.Tensor


class GeoRAFactors(NamedTuple):
    """Initial LoRA factors: ``A`` is (r x in), ``B`` is (out x r)."""

    A: torch.Tensor
    B: torch.Tensor


class GeoRADecomposition(NamedTuple):
    """Everything the initialisation computed for one weight (factors, masks, spectrum, energies)."""

    factors: GeoRAFactors
    masks: GeoRAMasks
    singular_values: torch.Tensor  # the r selected singular values of W_geo, unscaled
    masked_energy: float  # ||W_geo||_F^2
    weight_energy: float  # ||W||_F^2


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"GeoRA decomposes 2-D weights, got a tensor of shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"GeoRA needs a floating-point weight, got dtype {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError("GeoRA cannot decompose a weight on the meta device (it has no values)")


def quantile_rank(rho: float, n: int) -> int:
    """1-based rank of the rho-quantile among ``n`` values: ``ceil(rho * n)``, clamped to ``[1, n]``."""
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must lie in the open interval (0, 1), got {rho}")
    return min(n, max(1, math.ceil(rho * n)))


def kth_smallest(values: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Exact k-th smallest (1-based) entry of ``values``, without sorting or ``torch.quantile``.

    Large inputs are bracketed with a seeded random sample so that ``kthvalue`` only runs on the few entries
    between two sample quantiles; the answer is exact whatever the sample (a missed bracket falls back to a full
    ``kthvalue``).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if n <= _DIRECT_SELECT_LIMIT:
        return torch.kthvalue(flat, k).values
    gen = torch.Generator(device=flat.device).manual_seed(seed)
    idx = torch.randint(n, (_SELECT_SAMPLE,), generator=gen, device=flat.device)
    sample = flat[idx].sort().values
    q = k / n
    margin = 6.0 * math.sqrt(q * (1.0 - q) / _SELECT_SAMPLE) + 2.0 / _SELECT_SAMPLE
    lo_pos, hi_pos = math.floor((q - margin) * _SELECT_SAMPLE), math.ceil((q + margin) * _SELECT_SAMPLE)
    below = torch.zeros((), dtype=torch.long, device=flat.device)
    in_bracket = torch.ones_like(flat, dtype=torch.bool)
    if lo_pos > 0:
        lo = sample[lo_pos]
        below = (flat < lo).sum()
        in_bracket &= flat >= lo
    if hi_pos < _SELECT_SAMPLE - 1:
        in_bracket &= flat <= sample[hi_pos]
    candidates = flat[in_bracket]
    rank = k - int(below)
    if 1 <= rank <= candidates.numel():
        return torch.kthvalue(candidates, rank).values
    return torch.kthvalue(flat, k).values


def magnitude_threshold(x: torch.Tensor, rho: float) -> torch.Tensor:
    """The rho-quantile of ``|x|`` over all entries (see the module docstring for the exact definition)."""
    mags = x.abs()
    return kth_smallest(mags, quantile_rank(rho, mags.numel()))


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, niter: int = 4, oversample: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD by a seeded randomized range finder with ``niter`` QR-stabilised power iterations."""
    m, n = matrix.shape
    q = min(rank + oversample, m, n)
    gen = torch.Generator(device=matrix.device).manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=matrix.device, dtype=matrix.dtype)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.T @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def truncated_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    components: Components = "head",
    solver: Solver = "auto",
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rank`` singular triplets of ``matrix``: the largest (``head``) or the smallest (``tail``).

    ``solver="auto"`` uses the exact LAPACK SVD for tail components and for small matrices (where it is cheaper),
    the randomized one otherwise. Randomized methods cannot find the tail, so that combination is refused.
    """
    if components not in COMPONENTS:
        raise ValueError(f"components must be one of {COMPONENTS}, got {components!r}")
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if not 1 <= rank <= min(matrix.shape):
        raise ValueError(f"rank must lie in [1, {min(matrix.shape)}] for a {tuple(matrix.shape)} matrix, got {rank}")
    if solver == "randomized" and components == "tail":
        raise ValueError("the randomized solver finds leading components only; use solver='exact' for the tail")
    if solver == "auto":
        small = min(matrix.shape) <= 4 * (rank + oversample)
        solver = "exact" if (components == "tail" or small) else "randomized"
    if solver == "randomized":
        return randomized_svd(matrix, rank, niter=niter, oversample=oversample, seed=seed)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    if components == "head":
        return u[:, :rank], s[:rank], vh[:rank]
    return u[:, -rank:], s[-rank:], vh[-rank:]


def geora_masks(
    weight: torch.Tensor,
    rho: float = 0.2,
    spectral_rank: int = 16,
    *,
    solver: Solver = "auto",
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
) -> GeoRAMasks:
    """Spectral and Euclidean priors of ``weight`` (out x in): boolean masks of its low-magnitude entries."""
    _check_matrix(weight)
    quantile_rank(rho, weight.numel())  # validates rho
    w = weight.to(_work_dtype(weight))
    u, s, vh = truncated_svd(w, spectral_rank, solver=solver, niter=niter, oversample=oversample, seed=seed)
    w_k = (u * s) @ vh
    spectral = w_k.abs() <= magnitude_threshold(w_k, rho)
    del w_k
    euclidean = w.abs() <= magnitude_threshold(w, rho)
    return GeoRAMasks(spectral=spectral, euclidean=euclidean)


def select_entries(masks: GeoRAMasks, priors: Priors) -> torch.Tensor | None:
    """The mask GeoRA keeps for a choice of priors (``None`` means the whole weight)."""
    if priors == "union":
        return masks.spectral | masks.euclidean
    if priors == "spectral":
        return masks.spectral
    if priors == "euclidean":
        return masks.euclidean
    if priors == "none":
        return None
    raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")


def geora_decompose(
    weight: torch.Tensor,
    r: int = 16,
    *,
    rho: float = 0.2,
    spectral_rank: int | None = None,
    priors: Priors = "union",
    components: Components = "head",
    scale_divisor: float = 1.0,
    solver: Solver = "auto",
    niter: int = 4,
    oversample: int = 16,
    seed: int = 0,
) -> GeoRADecomposition:
    """Full GeoRA initialisation of one weight, with the masks and energies used for reporting.

    ``scale_divisor`` is ``c`` in ``A0 = sqrt(S/c) V^T``: 1 for the paper's convention, the LoRA scaling for PiSSA's.
    """
    _check_matrix(weight)
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")
    if not scale_divisor > 0:
        raise ValueError(f"scale_divisor must be positive, got {scale_divisor}")
    svd_kwargs = dict(solver=solver, niter=niter, oversample=oversample, seed=seed)
    w = weight.to(_work_dtype(weight))
    if priors == "none":
        masks = GeoRAMasks(torch.ones_like(w, dtype=torch.bool), torch.ones_like(w, dtype=torch.bool))
        w_geo = w
    else:
        masks = geora_masks(w, rho, spectral_rank or r, **svd_kwargs)
        w_geo = w * select_entries(masks, priors)
    u, s, vh = truncated_svd(w_geo, r, components=components, **svd_kwargs)
    root = (s / scale_divisor).sqrt()
    factors = GeoRAFactors(A=root[:, None] * vh, B=u * root[None, :])
    return GeoRADecomposition(
        factors=factors,
        masks=masks,
        singular_values=s,
        masked_energy=float(w_geo.square().sum()),
        weight_energy=float(w.square().sum()),
    )


def geora_init_factors(weight: torch.Tensor, r: int = 16, **kwargs) -> GeoRAFactors:
    """Initial factors ``(A0, B0)`` of GeoRA for ``weight``; ``kwargs`` as in :func:`geora_decompose`."""
    return geora_decompose(weight, r, **kwargs).factors
