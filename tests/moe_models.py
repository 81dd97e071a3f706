"""Tiny mixture-of-experts models for the tests: Qwen3-MoE and Mixtral (experts stored as (E, out, in);
``"all-linear"`` reaches them as LoRA's does) and gpt-oss (stored transposed, (E, in, out); targeted explicitly, as
LoRA's "all-linear" does not reach them there), and helpers to reach GeoRA's expert wrappers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

from peft_geora import GeoRAConfig
from peft_geora.tuner.experts import GeoRAParamWrapper

COMMON = dict(
    vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    num_experts_per_tok=2, max_position_embeddings=64,
)  # fmt: skip
EXPERTS = 4
ARCHS = {
    "qwen3_moe": lambda: Qwen3MoeConfig(intermediate_size=96, moe_intermediate_size=48, num_experts=EXPERTS, **COMMON),
    "mixtral": lambda: MixtralConfig(intermediate_size=48, num_local_experts=EXPERTS, **COMMON),
    "gpt_oss": lambda: GptOssConfig(intermediate_size=48, num_local_experts=EXPERTS, head_dim=16, **COMMON),
}
GPT_OSS_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build(arch: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(ARCHS[arch](), dtype=dtype).eval()


def geora_config(arch: str, **kwargs) -> GeoRAConfig:
    if arch == "gpt_oss":
        kwargs.setdefault("target_parameters", GPT_OSS_TARGETS)
    return GeoRAConfig(r=4, **kwargs)


def wrappers(model) -> dict[str, GeoRAParamWrapper]:
    return {m.geora_param_key: m for m in model.modules() if isinstance(m, GeoRAParamWrapper)}


def perturb(model, scale: float = 0.05, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".delta"):
                param.add_((scale * torch.randn(param.shape, generator=gen)).to(param.dtype))


def expert_matrices(wrapper: GeoRAParamWrapper) -> torch.Tensor:
    """The targeted weight as (E, out, in) (gpt-oss stores it as (E, in, out))."""
    param = wrapper.get_param().detach().float()
    return param if wrapper._did_swap_in_out_features else param.transpose(1, 2)
