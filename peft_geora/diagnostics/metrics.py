"""Where does a weight update go? Spectral diagnostics of an update ``dW`` to a frozen weight ``W`` (torch only).

``W`` and ``dW`` are (out x in), computed on in float32 (float64 stays float64).

* ``S_head(W, dW, k) = ||dW V_k||_F^2 / ||dW||_F^2``, ``V_k`` = the top-k right singular vectors of ``W``: the share
  of the update's energy (SQUARED norms) acting on W's k principal input directions. It lies in [0, 1]: 1 for an
  update inside that subspace, 0 for one orthogonal to it, about ``k / in`` for a random update, and it is defined as
  0 for ``dW = 0``. The spec writes the unsquared ratio; squaring makes the shares of orthogonal subspaces add up to
  one, so the value reads as a fraction (pass ``squared=False`` for the unsquared one).
* ``spectral_shift(W, dW) = ||sigma(W + dW) - sigma(W)||_2 / ||sigma(W)||_2`` (the paper's NSS), both spectra sorted.
* ``principal_angles(dW, W, k)``: angles between the RIGHT (input-side, as for ``S_head``) top-k singular subspaces
  of ``dW`` and ``W``; ``side="left"`` compares output-side subspaces instead.

Cheap paths for large layers: singular vectors come from the exact LAPACK SVD when ``min(out, in) <= exact_limit``,
else from :func:`peft_geora.functional.randomized_svd`. The spectral shift of a large layer uses only the top-q
singular values plus the exact Frobenius norms (see :func:`spectral_shift`). ``W`` is assumed frozen, so what the
diagnostics need of it is computed once by :func:`weight_spectrum` and can be passed back in (``spectrum=``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..functional import decomposition_report, geora_decompose, randomized_svd

EXACT_LIMIT = 1024  # exact SVDs up to this min(out, in); randomized / top-q paths above
DEFAULT_TOP_Q = 64  # singular values the cheap spectral shift compares
DEFAULT_TOP_K = 16  # W's directions for S_head and the angles: the paper's r, one k for every adapter compared

Side = Literal["left", "right"]


@dataclass(frozen=True)
class WeightSpectrum:
    """What the diagnostics need of a frozen weight, computed once: leading singular triplets and ``||W||_F^2``.

    ``s`` holds every singular value when ``complete`` (exact path), else only the leading ``rank`` ones.
    """

    u: torch.Tensor  # (out x rank) leading left singular vectors
    s: torch.Tensor  # singular values, descending
    vh: torch.Tensor  # (rank x in) leading right singular vectors
    frob2: float
    complete: bool

    @property
    def rank(self) -> int:
        return self.vh.shape[0]


def _as_float(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"diagnostics need 2-D matrices, got shape {tuple(x.shape)}")
    return x.detach().to(torch.float64 if x.dtype == torch.float64 else torch.float32)


def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD, run on the tall orientation (LAPACK is several times slower on wide matrices)."""
    if x.shape[0] >= x.shape[1]:
        return torch.linalg.svd(x, full_matrices=False)
    u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
    return vh.T, s, u.T


def _svdvals(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x if x.shape[0] >= x.shape[1] else x.T)  # tall orientation, as in _svd


def _pair(weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w, d = _as_float(weight), _as_float(delta)
    if w.shape != d.shape:
        raise ValueError(f"W {tuple(w.shape)} and dW {tuple(d.shape)} must have the same (out x in) shape")
    return w, d


def weight_spectrum(
    weight: torch.Tensor, k: int = DEFAULT_TOP_K, *, exact_limit: int = EXACT_LIMIT, niter: int = 8, seed: int = 0
) -> WeightSpectrum:
    """Leading ``k`` singular triplets of ``weight``: exact (all singular values kept) when small, else randomized.

    The randomized path sketches ``k + min(max(16, 3k), 64)`` directions with ``niter`` power iterations: computed
    once per frozen weight, and needed: on SmolLM2's flat MLP spectra, ``k + 16`` and 4 iterations put S_head (k=16)
    off by up to 60% (0.0129 vs 0.0074), these settings by under 3%."""
    w = _as_float(weight)
    k = max(1, min(k, min(w.shape)))
    if min(w.shape) <= exact_limit:
        u, s, vh = _svd(w)
        return WeightSpectrum(u[:, :k].clone(), s, vh[:k].clone(), float(w.square().sum()), True)
    u, s, vh = randomized_svd(w, k, niter=niter, oversample=min(max(16, 3 * k), 64), seed=seed)
    return WeightSpectrum(u, s, vh, float(w.square().sum()), False)


def _spectrum(w: torch.Tensor, k: int, spectrum: WeightSpectrum | None, limit: int, seed: int) -> WeightSpectrum:
    if spectrum is not None and spectrum.rank >= min(k, min(w.shape)):
        return spectrum
    return weight_spectrum(w, k, exact_limit=limit, seed=seed)


def s_head(
    weight: torch.Tensor,
    delta: torch.Tensor,
    k: int = DEFAULT_TOP_K,
    *,
    squared: bool = True,
    spectrum: WeightSpectrum | None = None,
    exact_limit: int = EXACT_LIMIT,
    seed: int = 0,
) -> float:
    """``||dW V_k||_F^2 / ||dW||_F^2``: share of ``delta``'s energy on ``weight``'s top-``k`` right singular
    directions (0 for a zero update; ``squared=False`` returns its square root, the spec's unsquared ratio)."""
    w, d = _pair(weight, delta)
    total = float(d.square().sum())
    if total == 0.0:
        return 0.0
    vh = _spectrum(w, k, spectrum, exact_limit, seed).vh[:k]
    share = min(1.0, float((d @ vh.to(d.dtype).T).square().sum()) / total)
    return share if squared else math.sqrt(share)


def top_singular_values(
    matrix: torch.Tensor,
    q: int,
    *,
    start: torch.Tensor | None = None,
    niter: int = 2,
    oversample: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Leading ``q`` singular values by subspace iteration, optionally warm-started from ``start`` (in x s).

    The result is the Ritz values of ``matrix`` on the iterated subspace: lower bounds that converge to the exact
    values; warm-starting with a nearby matrix's leading right singular vectors makes a few iterations enough.
    """
    m, n = matrix.shape
    q = min(q, m, n)
    p = min(q + oversample, m, n)
    blocks = [] if start is None else [start[:, :p].to(matrix.dtype)]
    extra = p - sum(b.shape[1] for b in blocks)
    if extra > 0:
        gen = torch.Generator(device=matrix.device).manual_seed(seed)
        omega = torch.randn(m, extra, generator=gen, device=matrix.device, dtype=matrix.dtype)
        blocks.append(matrix.T @ omega)
    basis = torch.linalg.qr(torch.cat(blocks, dim=1)).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.T @ (matrix @ basis)).Q
    return torch.linalg.svdvals(matrix @ basis)[:q]


def spectral_shift(
    weight: torch.Tensor,
    delta: torch.Tensor,
    *,
    top_q: int | None = None,
    spectrum: WeightSpectrum | None = None,
    exact_limit: int = EXACT_LIMIT,
    niter: int = 2,
    seed: int = 0,
) -> float:
    """Normalised spectral shift ``||sigma(W + dW) - sigma(W)||_2 / ||sigma(W)||_2`` (0 for a zero update).

    Exact (all singular values) when ``top_q`` is None and ``min(out, in) <= exact_limit``. Otherwise the cheap path
    compares the top ``q`` (``top_q`` or ``DEFAULT_TOP_Q``) singular values of ``W`` and ``W + dW``, both from
    :func:`top_singular_values` with the same start, and summarises the rest by the tail norms
    ``t(X) = sqrt(||X||_F^2 - sum_{i<=q} sigma_i(X)^2)`` (exact, since ``||sigma(X)||_2 = ||X||_F``)::

        NSS_q = sqrt(sum_{i<=q} (sigma_i(W+dW) - sigma_i(W))^2 + (t(W+dW) - t(W))^2) / ||W||_F

    This is exact when the update leaves the tail spectrum unchanged or rescales it uniformly; otherwise it is a
    lower bound (it misses changes that reshuffle the tail at constant tail norm, as updates confined to the
    tail can). ``||dW||_F / ||W||_F`` is always an upper bound (Mirsky).
    """
    w, d = _pair(weight, delta)
    if not bool(d.any()):
        return 0.0
    n = min(w.shape)
    if top_q is None and n <= exact_limit:
        s0 = spectrum.s if spectrum is not None and spectrum.complete else _svdvals(w)
        s1 = _svdvals(w + d)
        return float(torch.linalg.vector_norm(s1 - s0.to(s1.dtype)) / torch.linalg.vector_norm(s0))
    q = min(top_q or DEFAULT_TOP_Q, n)
    start = spectrum.vh.to(w.dtype).T if spectrum is not None else None
    moved = w + d
    s0 = top_singular_values(w, q, start=start, niter=niter, seed=seed)
    s1 = top_singular_values(moved, q, start=start, niter=niter, seed=seed)
    frob0 = spectrum.frob2 if spectrum is not None else float(w.square().sum())
    tail0 = math.sqrt(max(frob0 - float(s0.square().sum()), 0.0))
    tail1 = math.sqrt(max(float(moved.square().sum()) - float(s1.square().sum()), 0.0))
    head = float((s1 - s0).square().sum())
    return math.sqrt(head + (tail1 - tail0) ** 2) / math.sqrt(frob0)


def subspace_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spans of ``a`` (n x p) and ``b`` (n x q)."""
    qa = torch.linalg.qr(a.detach().double()).Q
    qb = torch.linalg.qr(b.detach().double()).Q
    return torch.arccos(torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0))


def leading_svd(
    matrix: torch.Tensor,
    k: int,
    *,
    rank_hint: int | None = None,
    exact_limit: int = EXACT_LIMIT,
    rtol: float = 1e-5,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` SVD of an update, exact and cheap when it is low-rank (as LoRA-family updates are).

    A random sketch of ``rank_hint + 8`` columns (default ``2k + 16``) is tried first: if it captures the range
    (residual below ``rtol`` in Frobenius norm), the SVD of the small projection is the exact SVD. Otherwise: the
    exact SVD up to ``exact_limit``, the randomized one above.
    """
    m, n = matrix.shape
    k = min(k, m, n)
    sketch = min((rank_hint + 8) if rank_hint else 2 * k + 16, m, n)
    if sketch < min(m, n):
        gen = torch.Generator(device=matrix.device).manual_seed(seed)
        omega = torch.randn(n, sketch, generator=gen, device=matrix.device, dtype=matrix.dtype)
        basis = torch.linalg.qr(matrix @ omega).Q
        proj = basis.T @ matrix
        if torch.linalg.matrix_norm(matrix - basis @ proj) <= rtol * torch.linalg.matrix_norm(matrix):
            u, s, vh = _svd(proj)
            return (basis @ u)[:, :k], s[:k], vh[:k]
    if min(m, n) <= exact_limit:
        u, s, vh = _svd(matrix)
        return u[:, :k], s[:k], vh[:k]
    return randomized_svd(matrix, k, seed=seed)


def principal_angles(
    delta: torch.Tensor,
    weight: torch.Tensor,
    k: int = DEFAULT_TOP_K,
    *,
    side: Side = "right",
    spectrum: WeightSpectrum | None = None,
    exact_limit: int = EXACT_LIMIT,
    delta_rank: int | None = None,
    rtol: float = 1e-6,
    seed: int = 0,
) -> torch.Tensor:
    """Principal angles between ``delta``'s and ``weight``'s top-``k`` singular subspaces (``side`` input or output).

    Only ``delta``'s directions with singular value above ``rtol`` times its largest count (a rank-4 update has 4
    directions, not ``k``), so the result holds ``min(k, rank(delta))`` angles in [0, pi/2]; empty for ``dW = 0``.
    ``delta_rank`` (an upper bound on ``rank(dW)``: r for LoRA, 2r for GeoRA) speeds up :func:`leading_svd`.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    w, d = _pair(weight, delta)
    k = max(1, min(k, min(w.shape)))
    if not bool(d.any()):
        return torch.empty(0, dtype=torch.float64)
    ud, sd, vhd = leading_svd(d, k, rank_hint=delta_rank, exact_limit=exact_limit, seed=seed)
    keep = sd > rtol * sd[0]
    ref = _spectrum(w, k, spectrum, exact_limit, seed)
    if side == "right":
        return subspace_angles(vhd[keep].T, ref.vh[:k].T)
    return subspace_angles(ud[:, keep], ref.u[:, :k])


def diagnostics_rank(shape: tuple[int, int], k: int, top_q: int | None = None, exact_limit: int = EXACT_LIMIT) -> int:
    """How many leading triplets of W :func:`update_diagnostics` uses: ``k``, or the cheap shift's ``q`` if larger."""
    cheap = top_q is not None or min(shape) > exact_limit
    return max(1, min(max(k, (top_q or DEFAULT_TOP_Q) if cheap else 0), min(shape)))


def update_diagnostics(
    weight: torch.Tensor,
    delta: torch.Tensor,
    k: int = DEFAULT_TOP_K,
    *,
    spectrum: WeightSpectrum | None = None,
    top_q: int | None = None,
    exact_limit: int = EXACT_LIMIT,
    delta_rank: int | None = None,
) -> dict[str, float]:
    """All per-layer numbers at once: ``s_head``, ``spectral_shift``, ``principal_angle`` (mean, radians; NaN for
    ``dW = 0``), ``delta_norm`` (``||dW||_F``) and ``relative_norm`` (``||dW||_F / ||W||_F``).

    ``spectrum`` (from :func:`weight_spectrum` with :func:`diagnostics_rank` triplets) skips W's decomposition."""
    w, d = _pair(weight, delta)
    k = max(1, min(k, min(w.shape)))
    spectrum = _spectrum(w, diagnostics_rank(tuple(w.shape), k, top_q, exact_limit), spectrum, exact_limit, 0)
    angles = principal_angles(d, w, k, spectrum=spectrum, exact_limit=exact_limit, delta_rank=delta_rank)
    delta_norm = float(torch.linalg.matrix_norm(d))
    return {
        "s_head": s_head(w, d, k, spectrum=spectrum),
        "spectral_shift": spectral_shift(w, d, top_q=top_q, spectrum=spectrum, exact_limit=exact_limit),
        "principal_angle": float(angles.mean()) if angles.numel() else float("nan"),
        "delta_norm": delta_norm,
        "relative_norm": delta_norm / math.sqrt(spectrum.frob2) if spectrum.frob2 > 0 else float("nan"),
    }


def mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    """Per key, the mean over ``rows`` of :func:`update_diagnostics` (the experts of one parameter, the layers of one
    type), NaN values left out (the angle of a zero update); NaN where every row has NaN."""
    out = {}
    for key in rows[0]:
        values = [row[key] for row in rows if not math.isnan(row[key])]
        out[key] = sum(values) / len(values) if values else float("nan")
    return out


def geora_init_report(
    weight: torch.Tensor, r: int = 16, *, rho: float = 0.2, spectral_rank: int | None = None, **kwargs
) -> dict[str, float]:
    """What GeoRA's initialisation does to ``weight`` (:func:`decomposition_report`), plus ``init_s_head``: the share
    of the anchor product ``B0 A0`` along W's top-r directions. ``kwargs`` go to :func:`geora_decompose`."""
    dec = geora_decompose(weight, r, rho=rho, spectral_rank=spectral_rank, priors="union", **kwargs)
    return {**decomposition_report(dec), "init_s_head": s_head(weight, dec.factors.B @ dec.factors.A, r)}
