"""The decomposition (masks, priors, factors; one weight or a stack of experts) equals a plain, sort-based reading
of the spec's formulas; the fast path captures the exact top-r of ``W_geo``, reproducibly."""

from __future__ import annotations

import math

import pytest
import torch

import peft_geora.functional as F
import peft_geora.functional.selection as selection
from peft_geora.functional import (
    decomposition_report,
    geora_decompose,
    geora_decompose_experts,
    geora_init_factors,
    geora_masks,
    kth_smallest,
    quantile_rank,
)

from .matrices import KRYLOV_SHAPES, QUALITY, exact_top_energy, sorted_kth, structured, trained_like

SHAPES = [(48, 32), (32, 48), (40, 40)]


def reference_quantile(x: torch.Tensor, rho: float) -> torch.Tensor:
    """rho-quantile of |x| by a full sort: the ceil(rho*n)-th smallest magnitude (at least the first)."""
    values = x.abs().flatten().sort().values
    k = max(1, math.ceil(rho * values.numel()))
    return values[min(k, values.numel()) - 1]


def reference_factors(w: torch.Tensor, r: int, rho: float, k: int, priors: str, components: str, divisor: float):
    """The spec's steps 1-4 written out with full SVDs in float64."""
    w = w.double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_k = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
    m_spec = w_k.abs() <= reference_quantile(w_k, rho)
    m_euc = w.abs() <= reference_quantile(w, rho)
    keep = {"union": m_spec | m_euc, "spectral": m_spec, "euclidean": m_euc, "none": torch.ones_like(m_spec)}[priors]
    u, s, vh = torch.linalg.svd(w * keep, full_matrices=False)
    sel = slice(0, r) if components == "head" else slice(len(s) - r, len(s))
    root = (s[sel] / divisor).sqrt()
    return m_spec, m_euc, u[:, sel] * root, root[:, None] * vh[sel]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [0.2, 0.05, 0.5])
@pytest.mark.parametrize("priors", ["union", "spectral", "euclidean", "none"])
def test_factors_match_reference(shape, rho, priors):
    torch.manual_seed(0)
    for w in (torch.randn(shape), structured(shape, 1)):
        m_spec, m_euc, b_ref, a_ref = reference_factors(w, 6, rho, 6, priors, "head", 1.0)
        dec = geora_decompose(w, 6, rho=rho, priors=priors, svd_solver="exact")
        if priors != "none":
            assert torch.equal(dec.masks.spectral, m_spec)
            assert torch.equal(dec.masks.euclidean, m_euc)
        a, b = dec.factors
        assert a.shape == (6, shape[1]) and b.shape == (shape[0], 6)
        # B0 A0 is the rank-r truncated SVD of the masked matrix (factors are unique only up to signs)
        torch.testing.assert_close((b @ a).double(), b_ref @ a_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.norm(dim=1).double(), a_ref.norm(dim=1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("components", ["head", "tail"])
@pytest.mark.parametrize("convention_divisor", [1.0, 2.0])
def test_components_and_scale_convention(components, convention_divisor):
    w = structured((36, 28), 2)
    _, _, b_ref, a_ref = reference_factors(w, 5, 0.2, 3, "union", components, convention_divisor)
    a, b = geora_init_factors(
        w, 5, rho=0.2, spectral_rank=3, components=components, scale_divisor=convention_divisor, svd_solver="exact"
    )
    torch.testing.assert_close((b @ a).double(), b_ref @ a_ref, rtol=1e-4, atol=1e-5)
    # paper convention: B0 A0 is the truncated SVD itself; PiSSA's divides it by the scaling
    torch.testing.assert_close(a.norm(dim=1) ** 2, b.norm(dim=0) ** 2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("components", ["head", "tail"])
@pytest.mark.parametrize("divisor", [1.0, 2.0])
def test_uniform_scale_gives_orthonormal_factors_times_one_constant(components, divisor):
    w = structured((36, 28), 2)
    kwargs = dict(rho=0.2, spectral_rank=3, components=components, scale_divisor=divisor, svd_solver="exact")
    scaled = geora_decompose(w, 5, **kwargs)
    flat = geora_decompose(w, 5, uniform_scale=True, **kwargs)
    a, b = (f.double() for f in flat.factors)
    c2 = float(scaled.singular_values.double().mean()) / divisor
    eye = torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(a @ a.T, c2 * eye, rtol=1e-5, atol=1e-5 * c2)  # rows of A0: orthogonal, one norm
    torch.testing.assert_close(b.T @ b, c2 * eye, rtol=1e-5, atol=1e-5 * c2)  # columns of B0 likewise
    # the same singular subspaces as the singular-value-scaled factors, and their Frobenius norms
    a_ref, b_ref = (f.double() for f in scaled.factors)
    rows = a_ref.T @ torch.linalg.solve(a_ref @ a_ref.T, a_ref)  # projector on the row space of A0 (paper's)
    cols = b_ref @ torch.linalg.solve(b_ref.T @ b_ref, b_ref.T)  # and on the column space of B0
    torch.testing.assert_close(cols @ (b @ a) @ rows, b @ a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.norm(), a_ref.norm(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.norm(), b_ref.norm(), rtol=1e-5, atol=1e-6)
    spectrum = scaled.singular_values
    assert spectrum.max() > 1.2 * spectrum.min()  # not flat: the two conventions give different factors
    spread = decomposition_report(scaled)["singular_spread"]
    assert spread == pytest.approx(float(spectrum.max() / spectrum.mean()))
    # the spread is how much the default weights its top direction over the orthonormal factors' one constant
    assert float(a_ref.norm(dim=1).max() ** 2 / a[0].norm() ** 2) == pytest.approx(spread, rel=1e-4)
    assert not torch.allclose(a.norm(dim=1), a_ref.norm(dim=1), rtol=0.05)
    # the masks and the reported spectrum do not depend on how the factors are scaled
    assert torch.equal(flat.masks.spectral, scaled.masks.spectral)
    assert torch.equal(flat.singular_values, scaled.singular_values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_half_precision_weights_are_decomposed_in_fp32(dtype):
    w = structured((40, 24), 3).to(dtype)
    a, b = geora_init_factors(w, 4, svd_solver="exact")
    assert a.dtype == b.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    ref = geora_init_factors(w.to(torch.float64), 4, svd_solver="exact")
    torch.testing.assert_close((b @ a).double(), ref.B @ ref.A, rtol=1e-4, atol=1e-4)


def test_ties_are_all_kept():
    w = torch.tensor([[0.0, 1.0, 1.0, 2.0], [1.0, 3.0, -1.0, 0.0], [2.0, 2.0, 1.0, -3.0]])
    masks = geora_masks(w, rho=0.25, spectral_rank=1, svd_solver="exact")
    # 12 entries, k = 3: the 3rd smallest |w| is 1, so the two zeros and every +-1 are kept
    assert torch.equal(masks.euclidean, w.abs() <= 1.0)
    assert int(masks.euclidean.sum()) == 7


@pytest.mark.parametrize("rho", [1e-9, 0.999999])
def test_rho_at_its_edges(rho):
    w = structured((20, 30), 4)
    masks = geora_masks(w, rho=rho, spectral_rank=2, svd_solver="exact")
    if rho < 0.5:
        assert int(masks.euclidean.sum()) == 1 and bool(masks.euclidean.flatten()[w.abs().flatten().argmin()])
    else:
        assert bool(masks.euclidean.all()) and bool(masks.spectral.all())
    a, b = geora_init_factors(w, 2, rho=rho, spectral_rank=2, svd_solver="exact")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()


@pytest.mark.parametrize("bad_rho", [0.0, 1.0, -0.1, 1.5])
def test_bad_rho_raises(bad_rho):
    with pytest.raises(ValueError, match="rho"):
        geora_masks(torch.randn(8, 8), rho=bad_rho, spectral_rank=2)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="2-D"):
        geora_init_factors(torch.randn(4, 4, 4), 2)
    with pytest.raises(TypeError, match="floating-point"):
        geora_init_factors(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="rank"):
        geora_init_factors(torch.randn(4, 6), 5, svd_solver="exact")
    with pytest.raises(ValueError, match="meta"):
        geora_init_factors(torch.empty(4, 4, device="meta"), 2)
    with pytest.raises(ValueError, match="randomized"):
        geora_init_factors(torch.randn(64, 64), 2, components="tail", svd_solver="randomized")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transposed_weight_decomposes_as_its_contiguous_copy(dtype):
    """A Conv1D weight is read as out x in through a transposed view: masks and factors must not depend on the
    layout (the passes write through flat views, which a non-contiguous tensor would turn into lost copies)."""
    gen = torch.Generator().manual_seed(0)
    stored = (torch.randn(48, 64, generator=gen) * torch.linspace(0.1, 2.0, 64)).to(dtype)  # (in, out), as Conv1D
    view = stored.T
    assert not view.is_contiguous()
    for solver in ("exact", "auto"):
        ours, reference = (geora_decompose(w, 4, svd_solver=solver) for w in (view, view.contiguous()))
        assert torch.equal(ours.masks.spectral, reference.masks.spectral)
        assert torch.equal(ours.masks.euclidean, reference.masks.euclidean)
        assert torch.equal(ours.factors.A, reference.factors.A) and torch.equal(ours.factors.B, reference.factors.B)
    assert all(torch.equal(m, n) for m, n in zip(geora_masks(view, rho=0.2), geora_masks(view.contiguous(), rho=0.2)))


@pytest.mark.parametrize("shape", KRYLOV_SHAPES)
def test_fast_path_factors_capture_the_exact_top_r_of_w_geo(shape):
    torch.manual_seed(0)
    w = trained_like(shape, seed=sum(shape))
    assert min(shape) > F.GRAM_LIMIT
    dec = geora_decompose(w, 16)  # the defaults: solver 'auto' -> Krylov
    w_geo = w * (dec.masks.spectral | dec.masks.euclidean)
    b0a0 = dec.factors.B.double() @ dec.factors.A.double()  # paper convention: U S V^T
    assert float(b0a0.square().sum()) / exact_top_energy(w_geo, 16) >= QUALITY
    # and the exact path on the same matrix gives the same product up to the (tiny) missing energy
    exact = geora_decompose(w, 16, svd_solver="exact")
    assert torch.equal(exact.masks.euclidean, dec.masks.euclidean)  # thresholds are exact in both


def test_masks_equal_a_sort_based_reference_on_a_large_matrix():
    w = trained_like((1100, 1000), seed=4)  # 1.1M entries
    masks = geora_masks(w, rho=0.2, spectral_rank=16, svd_solver="exact")
    mags = w.abs()
    k = quantile_rank(0.2, w.numel())
    assert torch.equal(masks.euclidean, mags <= sorted_kth(mags, k))
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_k = ((u[:, :16] * s[:16]) @ vh[:16]).abs()
    assert torch.equal(masks.spectral, w_k <= sorted_kth(w_k, k))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_matches_the_cpu_thresholds_and_meets_the_quality_target():
    w = trained_like((1100, 700), seed=8)
    k = quantile_rank(0.2, w.numel())
    assert kth_smallest(w.abs().cuda(), k).item() == sorted_kth(w.abs(), k).item()
    dec = geora_decompose(w.cuda(), 16)
    assert torch.equal(dec.masks.euclidean.cpu(), geora_decompose(w, 16).masks.euclidean)
    w_geo = w * (dec.masks.spectral | dec.masks.euclidean).cpu()
    energy = float((dec.factors.B.double() @ dec.factors.A.double()).square().sum())
    assert energy >= QUALITY * exact_top_energy(w_geo, 16)
    again = geora_decompose(w.cuda(), 16)  # reproducible on the device too
    assert torch.equal(again.factors.A, dec.factors.A) and torch.equal(again.factors.B, dec.factors.B)


def test_masks_and_w_geo_do_not_depend_on_the_chunking(monkeypatch):
    w = trained_like((640, 288), seed=12)
    whole = {p: geora_decompose(w, 16, priors=p) for p in ("union", "spectral", "euclidean")}
    monkeypatch.setattr(selection, "_SELECT_CHUNK", 10_000)
    for priors, expected in whole.items():
        chunked = geora_decompose(w, 16, priors=priors)
        assert torch.equal(chunked.masks.spectral, expected.masks.spectral)
        assert torch.equal(chunked.masks.euclidean, expected.masks.euclidean)
        assert torch.equal(chunked.factors.A, expected.factors.A)
        assert torch.equal(chunked.factors.B, expected.factors.B)


def test_same_seed_gives_bitwise_the_same_factors_whatever_the_global_rng():
    w = trained_like((640, 288), seed=21)
    torch.manual_seed(0)
    first = geora_decompose(w, 16, svd_seed=7)
    torch.manual_seed(12345)
    torch.rand(1000)  # move the global generator
    second = geora_decompose(w, 16, svd_seed=7)
    assert torch.equal(first.factors.A, second.factors.A) and torch.equal(first.factors.B, second.factors.B)
    assert torch.equal(first.masks.spectral, second.masks.spectral)
    assert torch.equal(first.masks.euclidean, second.masks.euclidean)
    other = geora_decompose(w, 16, svd_seed=8)
    assert not torch.equal(other.factors.A, first.factors.A)
    w_geo = w * (other.masks.spectral | other.masks.euclidean)
    assert float((other.factors.B.double() @ other.factors.A.double()).square().sum()) >= QUALITY * exact_top_energy(
        w_geo, 16
    )


def test_global_rng_is_not_consumed():
    w = trained_like((640, 288), seed=22)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    geora_decompose(w, 16)
    kth_smallest(torch.rand(300_000, generator=torch.Generator().manual_seed(0)), 1000)
    assert torch.equal(torch.rand(4), expected)


@pytest.mark.slow
def test_smollm2_layers_meet_the_quality_target(smollm2_path):
    """The real target: on SmolLM2, every projection type of the first and last layer captures >= 0.999."""
    from safetensors.torch import load_file

    weights = load_file(str(smollm2_path / "model.safetensors"))
    names = [k for k in weights if k.endswith("proj.weight") and (".layers.0." in k or ".layers.29." in k)]
    assert len(names) == 14
    for name in names:
        w = weights[name].float()
        dec = geora_decompose(w, 16)
        w_geo = w * (dec.masks.spectral | dec.masks.euclidean)
        energy = float((dec.factors.B.double() @ dec.factors.A.double()).square().sum())
        assert energy >= QUALITY * exact_top_energy(w_geo, 16), name


def test_the_batched_decomposition_is_the_per_expert_one():
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(6, 40, 24, generator=gen) * torch.linspace(0.1, 2.0, 24)
    for priors, components in [("union", "head"), ("spectral", "head"), ("euclidean", "tail"), ("none", "head")]:
        factors, report = geora_decompose_experts(weights, 5, rho=0.3, priors=priors, components=components)
        assert factors.A.shape == (6, 5, 24) and factors.B.shape == (6, 40, 5) and report["experts"] == 6
        for e in range(6):
            kwargs = dict(rho=0.3, priors=priors, components=components, svd_solver="exact")
            alone = geora_decompose(weights[e], 5, **kwargs).factors
            torch.testing.assert_close(factors.B[e] @ factors.A[e], alone.B @ alone.A, rtol=1e-4, atol=1e-5)
    # orthonormal factors: each expert's own constant, as the single-matrix decomposition gives it
    flat, _ = geora_decompose_experts(weights, 5, rho=0.3, scale_divisor=2.0, uniform_scale=True)
    for e in range(6):
        alone = geora_decompose(weights[e], 5, rho=0.3, scale_divisor=2.0, uniform_scale=True, svd_solver="exact")
        torch.testing.assert_close(flat.B[e] @ flat.A[e], alone.factors.B @ alone.factors.A, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(flat.A[e].norm(dim=1), alone.factors.A.norm(dim=1), rtol=1e-4, atol=1e-6)
    spreads = [decomposition_report(geora_decompose(w, 5, rho=0.3, svd_solver="exact")) for w in weights]
    expected = sum(s["singular_spread"] for s in spreads) / 6
    assert geora_decompose_experts(weights, 5, rho=0.3)[1]["singular_spread"] == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="rank r=25"):
        geora_decompose_experts(weights, 25)
