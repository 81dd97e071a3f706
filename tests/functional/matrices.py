"""Test matrices with the spectra of trained weights, and exact references to compare the fast paths against."""

from __future__ import annotations

import math

import torch

# min(shape) above GRAM_LIMIT, so 'auto' runs the Krylov solver; both orientations and a square one
KRYLOV_SHAPES = [(640, 288), (288, 640), (320, 320)]

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


def sorted_kth(values: torch.Tensor, k: int) -> torch.Tensor:
    return values.reshape(-1).sort().values[k - 1]


def structured(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Low rank plus heavy-tailed noise: a decaying spectrum like a trained weight's."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = shape
    low = torch.randn(out, 4, generator=gen) @ torch.randn(4, inp, generator=gen)
    noise = torch.distributions.StudentT(3.0).sample((out, inp)) * 0.1
    return low + noise
