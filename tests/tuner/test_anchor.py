"""The anchored factor modules on their own: the formula's gradients, with the anchors' share of the work skipped."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from peft_geora import AnchoredA, AnchoredB


@pytest.fixture(autouse=True)
def seeded():
    """Every test draws its inputs from the same global RNG state, whatever ran before it."""
    torch.manual_seed(0)


def anchored_pair(r=4, n_in=12, n_out=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a0, b0 = torch.randn(r, n_in, generator=gen), torch.randn(n_out, r, generator=gen)
    da, db = 0.1 * torch.randn(r, n_in, generator=gen), 0.1 * torch.randn(n_out, r, generator=gen)
    return AnchoredA(da, a0), AnchoredB(db, b0)


def formula_grads(lora_a, lora_b, x, g):
    """Gradients of ``<g, B A x - B0 A0 x>`` (``A = A0 + dA``, ``B = B0 + dB``) by plain autograd on the formula:
    the gradient with respect to ``dA`` is the one with respect to ``A``."""
    a0, b0 = lora_a.anchor_like_delta(), lora_b.anchor_like_delta()
    a = (a0 + lora_a.delta).detach().clone().requires_grad_()
    b = (b0 + lora_b.delta).detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    ((x @ a.T @ b.T - x @ a0.T @ b0.T) * g).sum().backward()
    return a.grad, b.grad, x.grad


@pytest.mark.parametrize("shape", [(5,), (2, 3)])
def test_anchored_pair_has_the_gradients_of_the_formula(shape):
    """``[dA x; A0 x]`` then ``[B0 + dB, dB]`` trains dA, dB and passes gradients to x like ``B A x - B0 A0 x``."""
    lora_a, lora_b = anchored_pair()
    x, g = torch.randn(*shape, 12, requires_grad=True), torch.randn(*shape, 10)
    (lora_b(lora_a(x)) * g).sum().backward()
    a_grad, b_grad, x_grad = formula_grads(lora_a, lora_b, x, g)
    torch.testing.assert_close(lora_a.delta.grad, a_grad)
    torch.testing.assert_close(lora_b.delta.grad, b_grad)
    torch.testing.assert_close(x.grad, x_grad)
    assert lora_a.anchor.grad is None and lora_b.anchor.grad is None


def test_frozen_factors_still_pass_the_input_gradient():
    lora_a, lora_b = anchored_pair()
    lora_a.delta.requires_grad_(False)
    lora_b.delta.requires_grad_(False)
    x, g = torch.randn(5, 12, requires_grad=True), torch.randn(5, 10)
    (lora_b(lora_a(x)) * g).sum().backward()
    torch.testing.assert_close(x.grad, formula_grads(lora_a, lora_b, x, g)[2])
    assert lora_a.delta.grad is None and lora_b.delta.grad is None


def test_backward_skips_the_anchors_weight_gradient():
    """Autograd through the rank-2r weights would compute (2r x in) and (out x 2r) weight gradients; the anchored
    product computes the factors' (r x in) and (out x r) only: 5 rank-r products per token, where LoRA needs 3."""
    r, n_in, n_out, tokens = 4, 12, 10, 7
    lora_a, lora_b = anchored_pair(r, n_in, n_out)
    x = torch.randn(tokens, n_in, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        lora_b(lora_a(x)).sum().backward()
    rank_r_product = 2 * tokens * r * (n_in + n_out)  # flops of x -> A x -> B (A x) at rank r
    assert counter.get_total_flops() == 5 * rank_r_product


def test_backward_keeps_no_copy_of_the_weights():
    """What the pair saves for backward is the input, the activations between the factors and views of the factors
    and anchors themselves: no concatenated (2r x in) / (out x 2r) weight per layer."""
    lora_a, lora_b = anchored_pair(r=4, n_in=12, n_out=10)
    x = torch.randn(7, 12, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        hidden = lora_a(x)
        lora_b(hidden)
    own = {t.data_ptr() for t in (x, hidden, lora_a.delta, lora_a.anchor, lora_b.delta, lora_b.anchor)}
    assert saved and {t.data_ptr() for t in saved} <= own


def test_runs_on_the_meta_device():
    """Shape-only passes (meta tensors, no autocast there) go through forward and backward."""
    lora_a, lora_b = (module.to("meta") for module in anchored_pair())
    x = torch.randn(2, 5, 12, device="meta", requires_grad=True)
    out = lora_b(lora_a(x))
    assert out.shape == (2, 5, 10) and out.device.type == "meta"
    out.sum().backward()
    assert lora_a.delta.grad.shape == (4, 12) and x.grad.shape == x.shape


def test_output_is_exactly_zero_at_init_and_grads_flow():
    a0, b0 = torch.randn(4, 12), torch.randn(10, 4)
    lora_a, lora_b = AnchoredA(torch.zeros_like(a0), a0), AnchoredB(torch.zeros_like(b0), b0)
    x = torch.randn(3, 12, requires_grad=True)
    out = lora_b(lora_a(x))
    assert torch.equal(out, torch.zeros_like(out))
    out.pow(2).sum().backward()  # zero loss gradient at init: gradients exist and are zero
    assert torch.equal(lora_a.delta.grad, torch.zeros_like(a0))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_backward_is_as_accurate_as_autograd_and_keeps_fp32_grads(device):
    """Under autocast the backward runs in the forward's autocast dtype, like autograd's own, and the gradients come
    back in fp32. Against the float64 truth, A's and x's gradients are as accurate as autograd's through the
    concatenated weights; B's rounds ``d + h0`` to bf16 once more (1.1x autograd's error at the median of 100 draws,
    1.3x at most), still at bf16's precision."""
    lora_a, lora_b = (module.to(device) for module in anchored_pair(r=8, n_in=64, n_out=48))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(16, 64, generator=gen).to(device).requires_grad_()
    g = torch.randn(16, 48, generator=gen).to(device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = lora_b(lora_a(x))
    assert out.dtype == torch.bfloat16
    (out.float() * g).sum().backward()
    ours = (lora_a.delta.grad, lora_b.delta.grad, x.grad)
    assert ours[0].dtype == ours[1].dtype == torch.float32
    a = lora_a.delta.detach().clone().requires_grad_()
    b = lora_b.delta.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16):
        weight_a = torch.cat([a, lora_a.anchor])
        weight_b = torch.cat([lora_b.anchor + b, b], dim=1)
        ref = torch.nn.functional.linear(torch.nn.functional.linear(xr, weight_a), weight_b)
    (ref.float() * g).sum().backward()
    torch.testing.assert_close(out, ref)
    lora_a.double(), lora_b.double()
    truth = formula_grads(lora_a, lora_b, x.double(), g.double())
    for mine, autograd, exact, slack in zip(ours, (a.grad, b.grad, xr.grad), truth, (1.05, 1.5, 1.05)):
        error, autograd_error = ((t.double() - exact).norm() / exact.norm() for t in (mine, autograd))
        assert error < 1e-2 and error <= slack * autograd_error


def test_compiles_into_one_graph_with_the_same_gradients():
    """``torch.compile`` (here its backend-independent ``aot_eager``) traces the custom backward without breaks."""
    lora_a, lora_b = anchored_pair()
    x = torch.randn(5, 12, requires_grad=True)
    compiled = torch.compile(lambda inputs: lora_b(lora_a(inputs)), backend="aot_eager", fullgraph=True)
    compiled(x).sum().backward()
    grads = (lora_a.delta.grad.clone(), lora_b.delta.grad.clone(), x.grad.clone())
    lora_a.delta.grad = lora_b.delta.grad = x.grad = None
    lora_b(lora_a(x)).sum().backward()
    for compiled_grad, eager_grad in zip(grads, (lora_a.delta.grad, lora_b.delta.grad, x.grad)):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("cast", ["to_bf16", "half", "to_fp16_with_device"])
def test_a_cast_moves_the_anchor_but_keeps_it_float32(cast):
    """Casting the model rounds the trainable delta (as it rounds a LoRA's factors), never the frozen anchor: the
    anchor is used in the delta's dtype, so the module computes in one dtype."""
    lora_a, lora_b = anchored_pair()
    anchors = (lora_a.anchor.clone(), lora_b.anchor.clone())
    for module in (lora_a, lora_b):
        if cast == "to_bf16":
            module.to(torch.bfloat16)
        elif cast == "half":
            module.half()
        else:
            module.to("cpu", dtype=torch.float16)
    assert lora_a.delta.dtype == lora_b.delta.dtype != torch.float32
    assert lora_a.anchor.dtype == lora_b.anchor.dtype == torch.float32
    assert torch.equal(lora_a.anchor, anchors[0]) and torch.equal(lora_b.anchor, anchors[1])
    x = torch.randn(3, 12).to(lora_a.delta.dtype)
    assert lora_b(lora_a(x)).dtype == lora_a.delta.dtype
    lora_a.float()
    assert torch.equal(lora_a.anchor, anchors[0])
