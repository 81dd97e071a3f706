"""The RLVR benchmark's metric functions: forgetting KL, effective weights, update geometry, probes."""

from __future__ import annotations

import math

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.rlvr.metrics import effective_linear_weights, token_kl, update_geometry
from benchmarks.rlvr.probes import RETAINED_SKILL, skill_correct
from benchmarks.rlvr.run_one import method_config
from peft_geora import GeoRAConfig

from ..conftest import make_tiny_model


def test_token_kl_known_values():
    base = torch.zeros(1, 3, 2)
    assert token_kl(base, base, torch.ones(1, 3, dtype=torch.bool)) == 0.0
    policy = torch.tensor([[[math.log(3.0), 0.0]]])  # p = (3/4, 1/4) against q = (1/2, 1/2)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert math.isclose(token_kl(policy, torch.zeros(1, 1, 2), torch.ones(1, 1)), expected, rel_tol=1e-6)
    mixed = torch.cat([policy, torch.zeros(1, 1, 2)], dim=1)
    assert math.isclose(token_kl(mixed, torch.zeros(1, 2, 2), torch.tensor([[False, True]])), 0.0, abs_tol=1e-9)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_effective_weights_use_the_merged_update_for_every_kind_of_method():
    base = effective_linear_weights(make_tiny_model())
    assert len(base) == 14 and "lm_head" not in base
    for config in (GeoRAConfig(r=4), LoraConfig(r=4, target_modules="all-linear", init_lora_weights="pissa")):
        model = get_peft_model(make_tiny_model(), config)
        unchanged = effective_linear_weights(model)
        for name in base:  # GeoRA is exact at init; PiSSA's W_res + B0A0 equals W up to rounding
            torch.testing.assert_close(unchanged[name], base[name], rtol=1e-5, atol=1e-5)
        moved = effective_linear_weights(_perturbed(model))
        layer = model.base_model.model.model.layers[0].self_attn.q_proj
        expected = layer.get_base_layer().weight + layer.get_delta_weight("default")
        torch.testing.assert_close(moved["model.layers.0.self_attn.q_proj"], expected, rtol=1e-5, atol=1e-6)


def test_update_geometry_on_constructed_updates():
    torch.manual_seed(0)
    w = torch.randn(32, 24)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    along = w + 0.1 * torch.outer(u[:, 0], vh[0])
    orthogonal = w + 0.1 * torch.outer(u[:, -1], vh[-1])
    geometry = update_geometry({"a": w, "b": w}, {"a": along, "b": w}, k=2)
    assert geometry["layers"] == 1 and math.isclose(geometry["s_head"], 1.0, rel_tol=1e-4)
    assert update_geometry({"a": w}, {"a": orthogonal}, k=2)["s_head"] < 1e-6
    assert update_geometry({"a": w}, {"a": w}, k=2) == {"s_head": 0.0, "spectral_shift": 0.0, "layers": 0}


def test_methods_and_probes():
    assert method_config("full_ft", 16, 32) is None
    milora = method_config("milora", 16, 32)
    assert (milora.priors, milora.components) == ("none", "tail")
    assert method_config("pissa", 16, 32).init_lora_weights == "pissa_niter_4"
    assert method_config("geora_orthonormal", 16, 32).scale_convention == "orthonormal"
    item = RETAINED_SKILL[0]
    assert item.answer == "Paris" and skill_correct("The capital of France is Paris.", item)
    assert skill_correct("PARIS", item) and not skill_correct("Lyon", item) and not skill_correct("", item)
    assert not skill_correct("Parisian food", item)  # whole words only
    two_words = next(i for i in RETAINED_SKILL if " " in i.answer)
    assert skill_correct(f"It is {two_words.answer}.", two_words)
    assert not skill_correct(two_words.answer.split()[0], two_words)
