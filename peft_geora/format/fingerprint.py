"""Base-weight fingerprints: notice when an adapter is loaded onto a base it was not initialised on.

A GeoRA adapter's anchors are a decomposition of one specific ``W``; on another checkpoint (or revision) the model is
no longer exact at the adapter's start and its update means something else. Each target's fingerprint (the sums
of ``|W|`` and ``W^2`` and four fixed entries) is stored in the adapter config at initialisation and compared after
every load, at the precision of the coarser of the two dtypes (a bf16 copy of the same base passes). Layers read
their weight through :func:`peft_geora.tuner.distributed.gathered`: a ZeRO-3 partition or an FSDP2 /
tensor-parallel DTensor shard is fingerprinted as the whole weight (a collective; the load hook runs on every rank).

The policy is ``"warn"`` by default; ``"raise"`` or ``"off"`` via :func:`base_check` or ``PEFT_GEORA_BASE_CHECK``.
This module holds the fingerprint and the policy; the check that runs after a load is
:mod:`peft_geora.tuner.load_check`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from ..functional.selection import chunk_size, chunks

POLICIES = ("warn", "raise", "off")
_policy: list[str] = []

# Comparing a quantized base with another precision of it. Measured on SmolLM2-135M's 210 projections, nf4 / fp4 /
# int8 against bf16: the sums of |W| and W^2 moved by at most 0.9% / 2.3% / 0.03%, a probe by at most 0.147 / 0.167 /
# 0.0039 times its block's scale (half the widest gap of the code book: 0.152 / 0.167 / 0.0039). The slack covers
# bf16 rounding and double-quantized scales.
QUANTIZED_SUM_TOL = 0.05
QUANTIZED_SCALE_SLACK = 0.05


class BaseModelMismatchError(ValueError):
    """Raised (with policy ``"raise"``) when an adapter is loaded onto different base weights."""


class BaseModelMismatchWarning(UserWarning):
    """Warned (default policy) when an adapter is loaded onto different base weights."""


def current_policy() -> str:
    policy = _policy[-1] if _policy else os.environ.get("PEFT_GEORA_BASE_CHECK", "warn")
    if policy not in POLICIES:
        raise ValueError(f"PEFT_GEORA_BASE_CHECK must be one of {POLICIES}, got {policy!r}")
    return policy


@contextlib.contextmanager
def base_check(policy: str) -> Iterator[None]:
    """Within the block, loading onto a different base ``"warn"``s, ``"raise"``s or is not checked (``"off"``)."""
    if policy not in POLICIES:
        raise ValueError(f"base_check policy must be one of {POLICIES}, got {policy!r}")
    _policy.append(policy)
    try:
        yield
    finally:
        _policy.pop()


def _probe_indices(numel: int) -> list[int]:
    return [(numel * k) // 5 + (k * 7919) % max(1, numel // 5) for k in range(4)]


def _abs_and_square_sums(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum |w|`` and ``sum w^2`` in float64, chunk by chunk (``sum(dtype=float64)`` would copy it all to float64)."""
    total_abs = torch.zeros((), dtype=torch.float64, device=flat.device)
    total_sq = torch.zeros((), dtype=torch.float64, device=flat.device)
    size = max(1, chunk_size(flat.numel()) // 4)  # the float64 chunk and its |.|: an eighth of the weight in fp32
    for (part,) in chunks(flat, size=size):
        chunk = part.double()
        total_abs += chunk.abs().sum()
        total_sq += chunk.square().sum()
    return total_abs, total_sq


@torch.no_grad()
def weight_fingerprint(weight: torch.Tensor, quantized: tuple[str, int, float] | None = None) -> dict:
    """A few numbers that change when the weight does: ``{"dtype": ..., "values": [...]}`` (JSON-serialisable).

    For a quantized layer pass its dequantized weight and ``quantized=(kind, block, half_step)``: ``kind`` (e.g.
    ``"nf4"``) replaces the dtype, and each probe records the scale of its quantization block (``block`` consecutive
    entries) and the largest rounding error as a share of that scale (``half_step``), so that the same checkpoint at
    another precision can be recognised (:func:`fingerprints_match`).
    """
    flat = weight.detach().reshape(-1)
    sums = [float(total) for total in _abs_and_square_sums(flat)]
    indices = _probe_indices(flat.numel())
    fingerprint = {
        "dtype": str(weight.dtype).removeprefix("torch."),
        "values": [*sums, *(float(flat[i]) for i in indices)],
    }
    if quantized is not None:
        kind, block, half_step = quantized
        starts = [(i // block) * block for i in indices]
        fingerprint["dtype"] = kind
        fingerprint["scales"] = [float(flat[s : s + block].abs().max()) for s in starts]
        fingerprint["half_step"] = half_step
    return fingerprint


def _eps(dtype_name: str) -> float:
    dtype = getattr(torch, dtype_name, None)
    return torch.finfo(dtype).eps if isinstance(dtype, torch.dtype) and dtype.is_floating_point else 2.0**-7


def fingerprints_match(expected: dict, actual: dict) -> bool:
    """True if ``actual`` could be ``expected``'s weight, up to rounding to the coarser dtype.

    If either side is quantized (a 4-bit base against its bf16 checkpoint, nf4 against int8, or two quantizations of
    one checkpoint loaded in different dtypes), the sums may differ by ``QUANTIZED_SUM_TOL`` and each probe by the
    rounding error its quantization allows.
    """
    if len(expected["values"]) != len(actual["values"]):
        return False
    pairs = list(zip(expected["values"], actual["values"]))
    quantized = [f for f in (expected, actual) if "scales" in f]
    if not quantized:
        tol = 4 * max(_eps(expected["dtype"]), _eps(actual["dtype"]))
        return all(abs(a - b) <= tol * max(abs(a), abs(b)) + 1e-30 for a, b in pairs)
    sums_match = all(abs(a - b) <= QUANTIZED_SUM_TOL * max(abs(a), abs(b)) for a, b in pairs[:2])
    slack = [sum((f["half_step"] + QUANTIZED_SCALE_SLACK) * f["scales"][k] for f in quantized) for k in range(4)]
    return sums_match and all(abs(a - b) <= slack[k] + 1e-30 for k, (a, b) in enumerate(pairs[2:]))
