"""GeoRA's initialisation as plain torch functions (no PEFT needed).

For a weight ``W`` (out x in) and rank ``r``:

1. spectral prior ``M_spec = |W_k| <= tau_spec`` where ``W_k`` is the rank-k truncated SVD of ``W``
   (k = ``spectral_rank``, default ``r``) and ``tau_spec`` its rho-quantile of magnitudes;
2. Euclidean prior ``M_euc = |W| <= tau_euc`` with ``tau_euc`` the rho-quantile of ``|W|``;
3. ``W_geo = W * (M_spec | M_euc)``;
4. ``W_geo ~ U_r S_r V_r^T``; ``A0 = sqrt(S_r / c) V_r^T``, ``B0 = U_r sqrt(S_r / c)``, where ``c`` is 1 for the
   paper's convention and the LoRA scaling ``s`` for PiSSA's. With ``uniform_scale`` the factors are the orthonormal
   ``V_r^T`` and ``U_r`` times one constant, ``sqrt(mean(S_r) / c)``: the same Frobenius norms, with no direction
   weighted by its singular value.

The rho-quantile of ``n`` magnitudes is their k-th smallest value with ``k = ceil(rho * n)`` (at least 1), and a
mask keeps every entry ``<=`` it, so ties are all kept (:mod:`.selection`); the SVDs are :mod:`.svd`'s. Everything
is computed in float32 (float64 stays float64).

No work twice: ``|W|`` is computed once for its threshold and its mask; ``W_k`` is formed in the same buffer and only
its magnitudes are kept; the kept-entry indicator and ``W_geo`` reuse that buffer again. The workspace is one fp32
matrix, the two boolean masks and scratch of an eighth of it or less (:func:`.selection.chunk_size`), plus the fp32
copy of a half-precision weight, freed before the next layer. Everything is seeded by ``svd_seed`` through private
generators, so results do not depend on the global RNG state.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from .selection import chunks, kth_smallest, quantile_rank, scratch_like
from .svd import DEFAULT_NITER, DEFAULT_OVERSAMPLE, Components, Solver, truncated_svd

Priors = Literal["union", "spectral", "euclidean", "none"]
PRIORS: tuple[str, ...] = ("union", "spectral", "euclidean", "none")


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


def _factor_roots(singular_values: torch.Tensor, scale_divisor: float, uniform_scale: bool) -> torch.Tensor:
    """What multiplies each singular vector in the initial factors: ``sqrt(S / c)``, or ``sqrt(mean(S) / c)`` for all.

    ``singular_values`` is ``(r,)`` or ``(E, r)`` (one row per expert; the mean is taken per row); the result has its
    shape and dtype. ``uniform_scale`` gives orthonormal factors times one constant per matrix with the Frobenius norms
    of the singular-value-scaled ones (``sum_i sqrt(S_i/c)^2 = r mean(S)/c``).
    """
    if uniform_scale:
        singular_values = singular_values.mean(dim=-1, keepdim=True).expand_as(singular_values)
    return (singular_values / scale_divisor).sqrt()


def _work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def _work_copy(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the work dtype and contiguous (a copy only where needed). The passes below write masks and
    thresholds through flat views (:func:`chunks`): on a transposed weight (a ``Conv1D``'s, read as out x in) those
    views would be copies, and the writes would be lost."""
    return weight.contiguous().to(_work_dtype(weight))


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"GeoRA decomposes 2-D weights, got a tensor of shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"GeoRA needs a floating-point weight, got dtype {weight.dtype}")
    if weight.device.type == "meta":
        raise ValueError("GeoRA cannot decompose a weight on the meta device (it has no values)")


def _prior_indicators(
    w: torch.Tensor, rho: float, spectral_rank: int, priors: Priors | None, svd_kwargs: dict
) -> tuple[GeoRAMasks, torch.Tensor | None]:
    """Boolean priors of ``w`` and ``W_geo`` (a new buffer; ``None`` when ``priors`` is ``None``).

    One fp32 buffer ``a`` does the work: it holds ``|W|``, then ``|W_k|``, then the kept 0/1 indicator and finally
    ``W_geo``; besides it only the two boolean masks and chunk-sized scratch are allocated. Indicators are written
    as floats (into the scratch) because float comparisons and products vectorise on CPU where boolean ones do not.
    """
    k = quantile_rank(rho, w.numel())
    seed = svd_kwargs.get("seed", 0)
    a = torch.abs(w)
    tau_euc = float(kth_smallest(a, k, seed=seed))  # an fp32 value: compared exactly as a Python float
    euclidean = torch.empty_like(w, dtype=torch.bool)
    scratch = scratch_like(w)
    for mags, euc in chunks(a, euclidean):
        euc.copy_(torch.le(mags, tau_euc, out=scratch[: mags.numel()]))
    del scratch  # not held through the SVD and the second selection, where the peak is
    u, s, vh = truncated_svd(w, spectral_rank, **svd_kwargs)
    torch.matmul(u * s, vh, out=a).abs_()  # only |W_k| is needed
    tau_spec = kth_smallest(a, k, seed=seed + 1)
    keep = torch.le(a, tau_spec, out=a)
    masks = GeoRAMasks(spectral=keep.bool(), euclidean=euclidean)
    if priors is None:
        return masks, None
    if priors == "euclidean":
        keep.copy_(euclidean)
    elif priors == "union":  # recomputing the Euclidean indicator beats converting the bool mask
        scratch = scratch_like(w)
        for kept, weights in chunks(keep, w):
            part = scratch[: kept.numel()]
            torch.maximum(kept, torch.le(torch.abs(weights, out=part), tau_euc, out=part), out=kept)
    return masks, torch.mul(w, keep, out=a)


def geora_masks(
    weight: torch.Tensor,
    rho: float = 0.2,
    spectral_rank: int = 16,
    *,
    svd_solver: Solver = "auto",
    svd_niter: int = DEFAULT_NITER,
    svd_oversample: int = DEFAULT_OVERSAMPLE,
    svd_seed: int = 0,
) -> GeoRAMasks:
    """Spectral and Euclidean priors of ``weight`` (out x in): boolean masks of its low-magnitude entries."""
    _check_matrix(weight)
    quantile_rank(rho, weight.numel())  # validates rho
    w = _work_copy(weight)
    svd_kwargs = dict(solver=svd_solver, niter=svd_niter, oversample=svd_oversample, seed=svd_seed)
    return _prior_indicators(w, rho, spectral_rank, None, svd_kwargs)[0]


def geora_decompose(
    weight: torch.Tensor,
    r: int = 16,
    *,
    rho: float = 0.2,
    spectral_rank: int | None = None,
    priors: Priors = "union",
    components: Components = "head",
    scale_divisor: float = 1.0,
    uniform_scale: bool = False,
    svd_solver: Solver = "auto",
    svd_niter: int = DEFAULT_NITER,
    svd_oversample: int = DEFAULT_OVERSAMPLE,
    svd_seed: int = 0,
) -> GeoRADecomposition:
    """Full GeoRA initialisation of one weight, with the masks and energies used for reporting.

    ``scale_divisor`` is ``c`` in ``A0 = sqrt(S/c) V^T``: 1 for the paper's convention, the LoRA scaling for PiSSA's.
    ``uniform_scale`` replaces ``sqrt(S/c)`` by ``sqrt(mean(S)/c)`` for every component (orthonormal factors times one
    constant). Raises ``ValueError`` for a weight that is not 2-D or on the meta device, a rank outside
    ``[1, min(out, in)]`` or a bad ``rho`` / ``priors`` / ``scale_divisor``, and ``TypeError`` for an integer weight.
    """
    _check_matrix(weight)
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")
    if not scale_divisor > 0:
        raise ValueError(f"scale_divisor must be positive, got {scale_divisor}")
    svd_kwargs = dict(solver=svd_solver, niter=svd_niter, oversample=svd_oversample, seed=svd_seed)
    w = _work_copy(weight)
    if priors == "none":
        masks = GeoRAMasks(torch.ones_like(w, dtype=torch.bool), torch.ones_like(w, dtype=torch.bool))
        w_geo = w
    else:
        quantile_rank(rho, w.numel())  # validates rho
        masks, w_geo = _prior_indicators(w, rho, spectral_rank or r, priors, svd_kwargs)
    u, s, vh = truncated_svd(w_geo, r, components=components, **svd_kwargs)
    root = _factor_roots(s, scale_divisor, uniform_scale)
    factors = GeoRAFactors(A=(root[:, None] * vh).contiguous(), B=(u * root[None, :]).contiguous())
    flat_w, flat_geo = w.reshape(-1), w_geo.reshape(-1)
    return GeoRADecomposition(
        factors=factors,
        masks=masks,
        singular_values=s,
        masked_energy=float(torch.dot(flat_geo, flat_geo)),
        weight_energy=float(torch.dot(flat_w, flat_w)),
    )


def geora_init_factors(weight: torch.Tensor, r: int = 16, **kwargs) -> GeoRAFactors:
    """Initial factors ``(A0, B0)`` of GeoRA for ``weight``; ``kwargs`` as in :func:`geora_decompose`."""
    return geora_decompose(weight, r, **kwargs).factors


def geora_decompose_experts(
    weights: torch.Tensor,
    r: int = 16,
    *,
    rho: float = 0.2,
    spectral_rank: int | None = None,
    priors: Priors = "union",
    components: Components = "head",
    scale_divisor: float = 1.0,
    uniform_scale: bool = False,
) -> tuple[GeoRAFactors, dict[str, float]]:
    """GeoRA's initialisation of a stack of expert weights ``(E, out, in)`` at once, each expert on its own.

    Per expert, exactly as :func:`geora_decompose` with ``svd_solver="exact"``: both priors with the rho-quantile of
    that expert's magnitudes (ties kept), ``W_geo`` on their union, its top-r (or tail) SVD. Batched over the experts
    (one batched LAPACK SVD per step, no Python loop over experts); float32 (float64 stays float64). Returns the
    factors ``A0`` (E x r x in) and ``B0`` (E x out x r), scaled as :func:`geora_decompose` says (``scale_divisor``,
    ``uniform_scale`` per expert), and a report: the mean share of entries in each mask, of their overlap and union,
    the captured share of ``||W_geo||_F^2`` (mean and minimum over experts) and the mean ``singular_spread``
    (:func:`decomposition_report`). Raises ``ValueError`` for a tensor that is not 3-D, a rank above
    ``min(out, in)`` or a bad ``rho`` / ``priors`` / ``scale_divisor``.
    """
    if weights.dim() != 3:
        raise ValueError(f"geora_decompose_experts takes (experts, out, in) weights, got shape {tuple(weights.shape)}")
    if not weights.is_floating_point() or weights.device.type == "meta":
        raise ValueError(f"GeoRA needs real floating-point expert weights, got {weights.dtype} on {weights.device}")
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {PRIORS}, got {priors!r}")
    if not scale_divisor > 0:
        raise ValueError(f"scale_divisor must be positive, got {scale_divisor}")
    experts, out_features, in_features = weights.shape
    if not 1 <= r <= min(out_features, in_features):
        raise ValueError(f"rank r={r} must lie in [1, min(out, in)={min(out_features, in_features)}]")
    w = weights.to(_work_dtype(weights))
    k = quantile_rank(rho, out_features * in_features)

    def below_quantile(values: torch.Tensor) -> torch.Tensor:
        magnitudes = values.abs()
        tau = magnitudes.reshape(experts, -1).kthvalue(k, dim=1).values
        return magnitudes <= tau[:, None, None]

    if priors == "none":
        spectral = euclidean = torch.ones_like(w, dtype=torch.bool)
        w_geo = w
    else:
        euclidean = below_quantile(w)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        kept = spectral_rank or r
        spectral = below_quantile((u[..., :kept] * s[:, None, :kept]) @ vh[:, :kept])
        keep = {"union": spectral | euclidean, "spectral": spectral, "euclidean": euclidean}[priors]
        w_geo = w * keep
    u, s, vh = torch.linalg.svd(w_geo, full_matrices=False)
    chosen = slice(0, r) if components == "head" else slice(s.shape[1] - r, s.shape[1])
    u, s, vh = u[..., chosen], s[:, chosen], vh[:, chosen]
    root = _factor_roots(s, scale_divisor, uniform_scale)
    factors = GeoRAFactors(A=(root[..., None] * vh).contiguous(), B=(u * root[:, None, :]).contiguous())
    energy = w_geo.square().sum(dim=(1, 2))
    captured = torch.where(energy > 0, s.square().sum(dim=1) / energy, torch.ones_like(energy))
    report = {
        "experts": float(experts),
        "spectral_fraction": float(spectral.float().mean()),
        "euclidean_fraction": float(euclidean.float().mean()),
        "union_fraction": float((spectral | euclidean).float().mean()),
        "overlap_fraction": float((spectral & euclidean).float().mean()),
        "captured_energy": float(captured.mean()),
        "captured_energy_min": float(captured.min()),
        "singular_spread": _spread(s),
    }
    return factors, report


def decomposition_report(dec: GeoRADecomposition) -> dict[str, float]:
    """What one GeoRA initialisation did: mask coverages, overlap (share of entries in both masks), Jaccard index,
    energy kept by the mask, the share of it the rank-r factors capture, and ``singular_spread``: the largest of the r
    selected singular values over their mean (1 when they are equal; then ``scale_convention="orthonormal"`` gives
    the default factors). Also the layers' ``geora_reports``."""
    spectral, euclidean = dec.masks
    n = spectral.numel()
    overlap = int(torch.count_nonzero(spectral & euclidean))
    spectral_count, euclidean_count = int(torch.count_nonzero(spectral)), int(torch.count_nonzero(euclidean))
    union = spectral_count + euclidean_count - overlap
    return {
        "spectral_coverage": spectral_count / n,
        "euclidean_coverage": euclidean_count / n,
        "union_coverage": union / n,
        "overlap": overlap / n,
        "jaccard": overlap / union if union else 0.0,
        "masked_energy": dec.masked_energy / dec.weight_energy if dec.weight_energy else 0.0,
        "captured_energy": float(dec.singular_values.square().sum()) / dec.masked_energy if dec.masked_energy else 0.0,
        "singular_spread": _spread(dec.singular_values),
    }


def _spread(singular_values: torch.Tensor) -> float:
    """``max(S) / mean(S)`` of the selected singular values (1.0 for an all-zero spectrum); for a batch (..., r), one
    per spectrum, averaged."""
    mean = singular_values.mean(dim=-1)
    ratio = singular_values.amax(dim=-1) / mean.clamp_min(torch.finfo(mean.dtype).tiny)
    return float(torch.where(mean > 0, ratio, torch.ones_like(ratio)).mean())
