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

How it is made fast (chosen by measurement on SmolLM2-135M, one CPU core, see ``benchmarks/README.md``):

* Truncated SVDs, ``solver="auto"``: LAPACK for tail components; an exact eigensolve of the small Gram matrix when
  ``min(out, in) <= GRAM_LIMIT`` (256); otherwise :func:`krylov_svd`, a seeded randomized block Krylov method
  (block Lanczos with full re-orthogonalisation, Rayleigh-Ritz on the projected Gram, fp32) that stops when the
  captured top-r energy has converged (``KRYLOV_TOL``), with ``niter`` only a cap. ``W_geo`` has a flat spectrum
  (sigma_17 / sigma_16 ~ 0.99), and so has ``W`` near its 16th value: the former default (subspace iteration,
  q = r + 16, 4 power iterations) captured as little as 0.942 of the exact top-16 energy of ``W_geo``, and its
  spectral masks agreed with the exact ones on only 83% of the entries. Block Krylov with blocks of r/2 reaches
  >= 0.9998 on every SmolLM2 layer in 8 to 20 steps (median 15) and its spectral masks agree on 99.3% of the
  entries (the rest sit at the threshold of a W_k that is ill-conditioned where sigma_16 ~ sigma_17). Blocks of r
  took 1.9x longer for the same energy, blocks of 4-6 were slower again (narrow products), larger tolerances
  failed 0.999 on random 7B-shaped matrices, and warm-starting the ``W_geo`` solve from ``W``'s singular subspace
  did not help (the subspaces are unrelated). Reaching 0.999 on such flat spectra takes ~130 Krylov vectors per
  SVD, two SVDs per weight, where PiSSA's ``niter_4`` sketch uses 80 in one SVD at lower accuracy (0.90 to 0.93 of
  the top-16 energy of ``W_geo``): that bounds how close to PiSSA's speed an accurate GeoRA init can get.
* Thresholds (:func:`kth_smallest`): exact order statistics without sorting. A seeded sample of 8 sqrt(n) entries
  brackets the answer within 5 standard errors, one pass counts the entries below the bracket and gathers the ~4%
  inside, and ``kthvalue`` runs on those only: 2.8 ms instead of 12 ms for an 885k-entry MLP matrix on one core
  (a sort takes 100 ms). Indicators are written as floats: float comparisons vectorise on CPU, boolean ones do not.
  On CUDA the sample and the candidates are sorted instead: ``kthvalue`` there runs in one thread block (480 ms for
  the 68M entries of a 7B MLP matrix on an H100, where a sort of them takes 3.2 ms).
* On CUDA, Krylov steps never wait for the host and convergence checks are spaced geometrically
  (:data:`CHECK_GROWTH`): a step's products take 0.06-0.37 ms there, a check on the host 1-2 ms.
* No work twice: ``|W|`` is computed once for its threshold and its mask; ``W_k`` is formed in the same buffer and
  only its magnitudes are kept; the kept-entry indicator and ``W_geo`` reuse that buffer again. The workspace is
  one fp32 matrix, the two boolean masks and scratch of an eighth of it or less (:func:`chunk_size`), plus the fp32
  copy of a half-precision weight, freed before the next layer.

Everything is seeded by ``seed`` through private generators, so results do not depend on the global RNG state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal, NamedTuple

import torch

Priors = Literal["union", "spectral", "euclidean", "none"]
Components = Literal["head", "tail"]
Solver = Literal["auto", "exact", "randomized"]

PRIORS: tuple[str, ...] = ("union", "spectral", "euclidean", "none")
COMPONENTS: tuple[str, ...] = ("head", "tail")
SOLVERS: tuple[str, ...] = ("auto", "exact", "randomized")

# Default solver settings (GeoRAConfig's svd_niter / svd_oversample mirror these).
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
# Devices where order statistics are read off a sort: torch.kthvalue on CUDA selects within one thread block
# (480 ms for 68M entries on an H100, 7 ns per entry) where a sort of the same entries takes 3.2 ms.
SORT_SELECT_DEVICES: tuple[str, ...] = ("cuda",)

# Below this many entries, torch.kthvalue on the whole tensor is cheaper than bracketing.
_DIRECT_SELECT_LIMIT = 1 << 15
_SELECT_CHUNK = 1 << 24  # most entries per pass of the bracketing (a 64 MB fp32 scratch; exact fp32 counts to 2^24)
# The bracket: a sample of 8 sqrt(n) entries (within these bounds), +-5 standard errors around the quantile.
_SELECT_SAMPLE_MIN, _SELECT_SAMPLE_MAX = 1 << 13, 1 << 16
_SELECT_SIGMAS = 5.0


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


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def quantile_rank(rho: float, n: int) -> int:
    """1-based rank of the rho-quantile among ``n`` values: ``ceil(rho * n)``, clamped to ``[1, n]``."""
    if not 0.0 < rho < 1.0:
        raise ValueError(f"rho must lie in the open interval (0, 1), got {rho}")
    return min(n, max(1, math.ceil(rho * n)))


def chunk_size(n: int) -> int:
    """Entries per chunk of a pass over ``n`` entries that needs scratch: an eighth of them (at least 2^16), at most
    :data:`_SELECT_CHUNK`, so the scratch stays a small fraction of the matrix whatever its size."""
    return min(n, _SELECT_CHUNK, max(1 << 16, -(-n // 8)))


def chunks(*tensors: torch.Tensor, size: int | None = None) -> Iterator[list[torch.Tensor]]:
    """Matching flat chunks of ``size`` entries (default :func:`chunk_size`) of same-sized tensors, for passes with
    bounded scratch."""
    flats = [t.reshape(-1) for t in tensors]
    size = size or chunk_size(flats[0].numel())
    for start in range(0, flats[0].numel(), size):
        yield [f[start : start + size] for f in flats]


def _scratch(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised buffer for one chunk of a pass over ``like`` (its dtype and device)."""
    return torch.empty(chunk_size(like.numel()), dtype=like.dtype, device=like.device)


def _kth(values: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) of a flat tensor: ``kthvalue``, or a sort on :data:`SORT_SELECT_DEVICES`."""
    if values.device.type in SORT_SELECT_DEVICES:
        return values.sort().values[k - 1]
    return torch.kthvalue(values, k).values


def kth_smallest(values: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """Exact k-th smallest (1-based) entry of ``values``, without sorting all of them or ``torch.quantile``.

    Large inputs are bracketed with a seeded random sample so that ``kthvalue`` only runs on the few entries
    between two sample quantiles; the answer is exact whatever the sample (a missed bracket falls back to a full
    ``kthvalue``). Ties are handled like ``kthvalue``: the returned value is an entry of ``values``. The passes over
    ``values`` run in chunks (:func:`chunk_size`), so the scratch stays an eighth of ``values`` or less.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    if n <= _DIRECT_SELECT_LIMIT or not flat.is_floating_point():
        return _kth(flat, k)
    if flat.dtype not in (torch.float32, torch.float64):  # half types: select in fp32, which holds them exactly
        return kth_smallest(flat.float(), k, seed=seed).to(flat.dtype)
    size = min(_SELECT_SAMPLE_MAX, max(_SELECT_SAMPLE_MIN, int(8 * math.sqrt(n))))
    idx = torch.randint(n, (size,), generator=_generator(flat.device, seed), device=flat.device)
    sample = flat[idx]
    q = k / n
    margin = _SELECT_SIGMAS * math.sqrt(q * (1.0 - q) / size) + 2.0 / size
    lo_rank, hi_rank = math.floor((q - margin) * size), math.ceil((q + margin) * size)
    # Python floats, not 0-dim tensors: elementwise kernels with a scalar operand are several times faster
    lo = float(_kth(sample, lo_rank)) if lo_rank >= 1 else None
    hi = float(_kth(sample, hi_rank)) if hi_rank <= size else None
    if lo is None and hi is None:
        return _kth(flat, k)
    # 0/1 indicators are written as floats into a chunk-sized buffer: float comparisons vectorise, boolean ones do
    # not, and fp32 sums of at most 2^24 ones are exact
    work = _scratch(flat)
    below, pieces = 0, []
    for (part,) in chunks(flat):
        scratch = work[: part.numel()]
        if lo is not None:
            below += int(torch.lt(part, lo, out=scratch).sum())
        if lo is None:
            inside = torch.le(part, hi, out=scratch)
        elif hi is None:
            inside = torch.ge(part, lo, out=scratch)
        else:  # lo <= x <= hi  <=>  clamp(x, lo, hi) == x
            inside = torch.eq(torch.clamp(part, lo, hi, out=scratch), part, out=scratch)
        pieces.append(part[inside.bool()])
    candidates = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    rank = k - below
    if 1 <= rank <= candidates.numel():
        return _kth(candidates, rank)
    return _kth(flat, k)


def magnitude_threshold(x: torch.Tensor, rho: float, *, seed: int = 0) -> torch.Tensor:
    """The rho-quantile of ``|x|`` over all entries (see the module docstring for the exact definition)."""
    mags = x.abs()
    return kth_smallest(mags, quantile_rank(rho, mags.numel()), seed=seed)


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, niter: int = 4, oversample: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD by a seeded randomized range finder with ``niter`` QR-stabilised power iterations.

    Plain subspace iteration with a fixed cost, kept for callers that want it (the diagnostics);
    :func:`krylov_svd`, used by ``truncated_svd(solver="randomized")``, needs far fewer products on flat spectra.
    """
    m, n = matrix.shape
    q = min(rank + oversample, m, n)
    omega = torch.randn(n, q, generator=_generator(matrix.device, seed), device=matrix.device, dtype=matrix.dtype)
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
    start = torch.randn(small, block, generator=_generator(device, seed), dtype=dtype, device=device)
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
    scratch = _scratch(w)
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
        scratch = _scratch(w)
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
    svd_solver: Solver = "auto",
    svd_niter: int = DEFAULT_NITER,
    svd_oversample: int = DEFAULT_OVERSAMPLE,
    svd_seed: int = 0,
) -> GeoRADecomposition:
    """Full GeoRA initialisation of one weight, with the masks and energies used for reporting.

    ``scale_divisor`` is ``c`` in ``A0 = sqrt(S/c) V^T``: 1 for the paper's convention, the LoRA scaling for PiSSA's.
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
    root = (s / scale_divisor).sqrt()
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


def geora_decompose_experts(
    weights: torch.Tensor,
    r: int = 16,
    *,
    rho: float = 0.2,
    spectral_rank: int | None = None,
    priors: Priors = "union",
    components: Components = "head",
    scale_divisor: float = 1.0,
) -> tuple[GeoRAFactors, dict[str, float]]:
    """GeoRA's initialisation of a stack of expert weights ``(E, out, in)`` at once, each expert on its own.

    Per expert, exactly as :func:`geora_decompose` with ``svd_solver="exact"``: both priors with the rho-quantile of
    that expert's magnitudes (ties kept), ``W_geo`` on their union, its top-r (or tail) SVD. Batched over the experts
    (one batched LAPACK SVD per step, no Python loop over experts); float32 (float64 stays float64). Returns the
    factors ``A0`` (E x r x in) and ``B0`` (E x out x r) and a report: the mean share of entries in each mask, of
    their overlap and union, and the captured share of ``||W_geo||_F^2`` (mean and minimum over experts). Raises
    ``ValueError`` for a tensor that is not 3-D, a rank above ``min(out, in)`` or a bad ``rho`` / ``priors``.
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
    root = (s / scale_divisor).sqrt()
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
    }
    return factors, report
