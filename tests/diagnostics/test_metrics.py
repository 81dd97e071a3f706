"""Spectral diagnostics on constructed updates whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model

from peft_geora import GeoRAConfig
from peft_geora.diagnostics import (
    geora_init_report,
    leading_svd,
    principal_angles,
    s_head,
    spectral_shift,
    subspace_angles,
    update_diagnostics,
    weight_spectrum,
)

from ..conftest import make_tiny_model

OUT, IN, K = 80, 60, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices: one thread is fastest, and avoids OpenMP stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed))).Q


@pytest.fixture
def svd_parts():
    """``W = U diag(sigma) V^T`` with a known, well separated, decaying spectrum."""
    u, v = orthonormal(OUT, IN, 1), orthonormal(IN, IN, 2)
    sigma = 10.0 * 0.93 ** torch.arange(IN, dtype=torch.float32)
    return u, sigma, v, (u * sigma) @ v.T


@pytest.mark.parametrize("exact_limit", [10_000, 0], ids=["exact", "randomized"])
def test_s_head_along_top_direction_is_one(svd_parts, exact_limit):
    u, _, v, w = svd_parts
    delta = 0.3 * torch.outer(u[:, 0], v[:, 0])
    assert s_head(w, delta, K, exact_limit=exact_limit) == pytest.approx(1.0, abs=1e-5)
    inside = u[:, :K] @ torch.randn(K, K, generator=torch.Generator().manual_seed(3)) @ v[:, :K].T
    assert s_head(w, inside, K, exact_limit=exact_limit) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("exact_limit", [10_000, 0], ids=["exact", "randomized"])
def test_s_head_orthogonal_to_top_k_is_zero(svd_parts, exact_limit):
    u, _, v, w = svd_parts
    tail = torch.outer(u[:, K], v[:, K]) + torch.outer(u[:, 3], v[:, 2 * K])
    assert s_head(w, tail, K, exact_limit=exact_limit) == pytest.approx(0.0, abs=1e-5)
    noise = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(4))
    projected_out = noise - noise @ v[:, :K] @ v[:, :K].T
    assert s_head(w, projected_out, K, exact_limit=exact_limit) == pytest.approx(0.0, abs=1e-5)


def test_s_head_of_mixed_update_is_its_energy_share(svd_parts):
    u, _, v, w = svd_parts
    delta = 3.0 * torch.outer(u[:, 1], v[:, 0]) + 4.0 * torch.outer(u[:, 2], v[:, K + 1])
    assert s_head(w, delta, K) == pytest.approx(9.0 / 25.0, abs=1e-5)
    assert s_head(w, delta, K, squared=False) == pytest.approx(3.0 / 5.0, abs=1e-5)


def test_zero_update(svd_parts):
    _, _, _, w = svd_parts
    zero = torch.zeros_like(w)
    assert s_head(w, zero, K) == 0.0
    assert spectral_shift(w, zero) == 0.0
    assert spectral_shift(w, zero, top_q=16) == 0.0
    assert principal_angles(zero, w, K).numel() == 0
    stats = update_diagnostics(w, zero, K)
    assert stats["s_head"] == 0.0 and stats["spectral_shift"] == 0.0 and stats["delta_norm"] == 0.0
    assert math.isnan(stats["principal_angle"])


@pytest.mark.parametrize("c", [0.1, -0.3, 1.5])
@pytest.mark.parametrize("top_q", [None, 16], ids=["exact", "top_q"])
def test_scaled_weight_shifts_by_its_factor(svd_parts, c, top_q):
    _, _, _, w = svd_parts
    assert spectral_shift(w, c * w, top_q=top_q) == pytest.approx(abs(c), rel=1e-4)


def test_single_value_change_has_closed_form_shift(svd_parts):
    u, sigma, v, w = svd_parts
    delta = 0.3 * torch.outer(u[:, 2], v[:, 2])  # sigma_3 = 8.649 grows by 0.3, still below sigma_2 = 9.3
    expected = 0.3 / float(sigma.norm())
    assert spectral_shift(w, delta) == pytest.approx(expected, rel=1e-4)
    assert spectral_shift(w, delta, top_q=8) == pytest.approx(expected, rel=1e-3)


def test_cheap_shift_matches_exact_on_head_updates_and_bounds_others(svd_parts):
    u, sigma, v, w = svd_parts
    gen = torch.Generator().manual_seed(5)
    head = (u[:, :6] * (0.1 * sigma[:6] * torch.randn(6, generator=gen))) @ v[:, :6].T
    spectrum = weight_spectrum(w, 32, exact_limit=0)
    assert not spectrum.complete and spectrum.rank == 32
    exact = spectral_shift(w, head)
    assert spectral_shift(w, head, top_q=24, spectrum=spectrum) == pytest.approx(exact, rel=1e-3)
    assert spectral_shift(w, head, top_q=24) == pytest.approx(exact, rel=1e-3)
    generic = 0.05 * torch.randn(OUT, 4, generator=gen) @ torch.randn(4, IN, generator=gen)
    exact = spectral_shift(w, generic)
    cheap = spectral_shift(w, generic, top_q=24, spectrum=spectrum)
    mirsky = float(generic.norm() / w.norm())
    assert 0.0 < cheap <= exact * (1 + 1e-3) and exact <= mirsky * (1 + 1e-4)
    # the large-layer default (q = 64 >= all 60 values) keeps every singular value: exact again
    assert spectral_shift(w, generic, exact_limit=0) == pytest.approx(exact, rel=1e-3)


def test_randomized_s_head_matches_exact(svd_parts):
    _, _, _, w = svd_parts
    gen = torch.Generator().manual_seed(6)
    delta = torch.randn(OUT, 8, generator=gen) @ torch.randn(8, IN, generator=gen)
    exact = s_head(w, delta, K)
    assert exact == pytest.approx(K / IN, abs=0.1)
    assert s_head(w, delta, K, exact_limit=0) == pytest.approx(exact, abs=1e-4)


def test_subspace_angles_known():
    basis = orthonormal(30, 5, 7)
    assert torch.allclose(subspace_angles(basis, basis), torch.zeros(5, dtype=torch.float64), atol=1e-7)
    mixed = basis @ torch.randn(5, 5, generator=torch.Generator().manual_seed(8))  # same span, other basis
    assert torch.allclose(subspace_angles(mixed, basis), torch.zeros(5, dtype=torch.float64), atol=1e-6)
    full = orthonormal(30, 10, 9)
    angles = subspace_angles(full[:, :5], full[:, 5:])
    assert torch.allclose(angles, torch.full((5,), math.pi / 2, dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("side", ["right", "left"])
def test_principal_angles_of_constructed_updates(svd_parts, side):
    u, _, v, w = svd_parts
    gen = torch.Generator().manual_seed(10)
    inside = u[:, :K] @ torch.randn(K, K, generator=gen) @ v[:, :K].T
    angles = principal_angles(inside, w, K, side=side)
    assert angles.shape == (K,) and float(angles.max()) < 1e-4
    outside = u[:, K : 2 * K] @ torch.randn(K, K, generator=gen) @ v[:, K : 2 * K].T
    right_angles = torch.full((K,), math.pi / 2, dtype=torch.float64)
    assert torch.allclose(principal_angles(outside, w, K, side=side), right_angles, atol=1e-5)
    rank2 = u[:, K : K + 2] @ v[:, K : K + 2].T  # only its 2 directions count, not K
    assert principal_angles(rank2, w, K, side=side, delta_rank=2).numel() == 2


def test_principal_angle_of_a_tilted_direction(svd_parts):
    u, _, v, w = svd_parts
    t = 0.4
    delta = torch.outer(u[:, 0], math.cos(t) * v[:, 0] + math.sin(t) * v[:, K])
    assert float(principal_angles(delta, w, K, side="right")[0]) == pytest.approx(t, abs=1e-5)
    assert float(principal_angles(delta, w, K, side="left")[0]) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("rank_hint", [None, 6, 2])
def test_leading_svd_is_exact_for_low_rank(rank_hint):
    gen = torch.Generator().manual_seed(11)
    delta = torch.randn(200, 6, generator=gen) @ torch.randn(6, 150, generator=gen)
    _, s, vh = leading_svd(delta, 4, rank_hint=rank_hint)
    _, s_ref, vh_ref = torch.linalg.svd(delta, full_matrices=False)
    assert torch.allclose(s, s_ref[:4], rtol=1e-4)
    assert float(subspace_angles(vh.T, vh_ref[:4].T).max()) < 1e-3


def test_update_diagnostics_fields(svd_parts):
    u, _, v, w = svd_parts
    delta = 0.5 * torch.outer(u[:, 0], v[:, 0])
    stats = update_diagnostics(w, delta, K)
    assert stats["s_head"] == pytest.approx(1.0, abs=1e-5)
    assert stats["principal_angle"] == pytest.approx(0.0, abs=1e-4)
    assert stats["delta_norm"] == pytest.approx(0.5, rel=1e-5)
    assert stats["relative_norm"] == pytest.approx(0.5 / float(w.norm()), rel=1e-5)


def test_bad_inputs(svd_parts):
    _, _, _, w = svd_parts
    with pytest.raises(ValueError, match="same"):
        s_head(w, w.T, K)
    with pytest.raises(ValueError, match="side"):
        principal_angles(w, w, K, side="up")
    with pytest.raises(ValueError, match="2-D"):
        spectral_shift(w[0], w[0])


def test_geora_init_report_agrees_with_the_layer_report():
    model = get_peft_model(make_tiny_model(), GeoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    name, layer = next((n, m) for n, m in model.named_modules() if n.endswith("layers.0.self_attn.q_proj"))
    report = geora_init_report(layer.get_base_layer().weight, 4, rho=0.2)
    shared = report.keys() & layer.geora_reports["default"].keys()
    masks = {"spectral_coverage", "euclidean_coverage", "union_coverage", "overlap", "jaccard"}
    assert shared == masks | {"masked_energy", "captured_energy", "singular_spread"}  # all but the layer's time
    for key in shared:
        assert report[key] == pytest.approx(layer.geora_reports["default"][key], rel=1e-6), key
    assert report["spectral_coverage"] >= 0.2 and report["euclidean_coverage"] >= 0.2
    assert report["union_coverage"] == pytest.approx(
        report["spectral_coverage"] + report["euclidean_coverage"] - report["overlap"]
    )
    assert report["jaccard"] == pytest.approx(report["overlap"] / report["union_coverage"])
    assert 0.0 <= report["init_s_head"] <= 1.0
