"""The torch-only core equals a plain, sort-based reading of the spec's formulas."""

from __future__ import annotations

import math

import pytest
import torch

from peft_geora.functional import geora_decompose, geora_init_factors, geora_masks, kth_smallest, truncate_product


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


def structured(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Low rank plus heavy-tailed noise: a decaying spectrum like a trained weight's."""
    gen = torch.Generator().manual_seed(seed)
    out, inp = shape
    low = torch.randn(out, 4, generator=gen) @ torch.randn(4, inp, generator=gen)
    noise = torch.distributions.StudentT(3.0).sample((out, inp)) * 0.1
    return low + noise


SHAPES = [(48, 32), (32, 48), (40, 40)]


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


def test_kth_smallest_matches_sort_on_a_large_tensor():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1_300_000, generator=gen).abs()
    x[::7] = 0.5  # many ties
    ordered = x.sort().values
    for k in (1, 1000, 260_000, 650_000, 1_299_999, 1_300_000):
        assert kth_smallest(x, k).item() == ordered[k - 1].item()


@pytest.mark.parametrize("k", [1, 3, 6, 9])
def test_truncate_product_is_the_dense_svd_truncation(k):
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(50, 6, generator=gen), torch.randn(6, 40, generator=gen)
    b_k, a_k, rel_err = truncate_product(b, a, k)
    dense = b.double() @ a.double()
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    kept = min(k, 6)
    best = (u[:, :kept] * s[:kept]) @ vh[:kept]
    assert b_k.shape == (50, kept) and a_k.shape == (kept, 40) and b_k.dtype == torch.float32
    torch.testing.assert_close((b_k @ a_k).double(), best, rtol=1e-5, atol=1e-5)
    expected = float(s[kept:].square().sum().sqrt() / s.square().sum().sqrt())
    assert abs(rel_err - expected) <= 1e-9 + 1e-6 * expected
    torch.testing.assert_close(b_k.norm(dim=0), a_k.norm(dim=1))  # sqrt(S) on both sides


def test_truncate_product_edge_cases():
    zero_b, zero_a, err = truncate_product(torch.zeros(5, 2), torch.zeros(2, 4), 1)
    assert err == 0.0 and not (zero_b @ zero_a).any()
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rank k must be a positive int"):
            truncate_product(torch.ones(5, 2), torch.ones(2, 4), bad)
    with pytest.raises(ValueError, match="do not multiply"):
        truncate_product(torch.ones(5, 2), torch.ones(3, 4), 1)


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
