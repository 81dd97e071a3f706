"""Order statistics without sorting, and the chunked passes that keep their scratch small (torch only).

The rho-quantile of ``n`` magnitudes is their k-th smallest value with ``k = ceil(rho * n)`` (at least 1)
(:func:`quantile_rank`); a mask built from it keeps every entry ``<=`` it, so ties are all kept.

:func:`kth_smallest` is exact and never sorts all entries. A seeded sample of 8 sqrt(n) entries brackets the answer
within 5 standard errors, one pass counts the entries below the bracket and gathers the ~4% inside, and ``kthvalue``
runs on those only: 2.8 ms instead of 12 ms for an 885k-entry MLP matrix on one CPU core (a sort takes 100 ms).
Indicators are written as floats: float comparisons vectorise on CPU, boolean ones do not. On CUDA the sample and the
candidates are sorted instead: ``kthvalue`` there runs in one thread block (480 ms for the 68M entries of a 7B MLP
matrix on an H100, where a sort of them takes 3.2 ms). Measured with ``benchmarks/decompose_stages.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

# Devices where order statistics are read off a sort: torch.kthvalue on CUDA selects within one thread block
# (480 ms for 68M entries on an H100, 7 ns per entry) where a sort of the same entries takes 3.2 ms.
SORT_SELECT_DEVICES: tuple[str, ...] = ("cuda",)

# Below this many entries, torch.kthvalue on the whole tensor is cheaper than bracketing.
_DIRECT_SELECT_LIMIT = 1 << 15
_SELECT_CHUNK = 1 << 24  # most entries per pass of the bracketing (a 64 MB fp32 scratch; exact fp32 counts to 2^24)
# The bracket: a sample of 8 sqrt(n) entries (within these bounds), +-5 standard errors around the quantile.
_SELECT_SAMPLE_MIN, _SELECT_SAMPLE_MAX = 1 << 13, 1 << 16
_SELECT_SIGMAS = 5.0


def seeded_generator(device: torch.device, seed: int) -> torch.Generator:
    """A private generator on ``device`` seeded with ``seed``: results never depend on the global RNG state."""
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


def scratch_like(like: torch.Tensor) -> torch.Tensor:
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
    idx = torch.randint(n, (size,), generator=seeded_generator(flat.device, seed), device=flat.device)
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
    work = scratch_like(flat)
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
