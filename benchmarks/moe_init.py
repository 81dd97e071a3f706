"""Initialisation time over all expert parameters of one mixture-of-experts layer: GeoRA batched over the experts,
the same decomposition as a Python loop over the experts, and PEFT LoRA (``target_parameters``), in one run.

One Qwen3-MoE decoder layer built from its config (random weights), GeoRA / LoRA with r=16 on the experts'
``gate_up_proj`` (E x 2I x H) and ``down_proj`` (E x H x I) only. "GeoRA batched" is ``get_peft_model`` (GeoRA's
``ParamWrapper``, :func:`peft_geora.functional.geora_decompose_experts`); "per-expert loop" runs
``geora_decompose(svd_solver="exact")`` on each expert matrix in turn (the same exact decomposition, one expert at a
time); "LoRA" is ``get_peft_model`` with a ``LoraConfig``. Medians of ``--repeats`` rounds; the batched factors are
checked against the loop's (largest difference of ``B0 A0``).

    python benchmarks/moe_init.py --out benchmarks/results/moe_init_cpu.json
    python benchmarks/moe_init.py --shape qwen3-30b-a3b --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from init_speed import format_table, machine_info  # noqa: E402

import peft_geora  # noqa: E402,F401  (registers GeoRA with PEFT)
from peft_geora import GeoRAConfig  # noqa: E402
from peft_geora.functional import geora_decompose  # noqa: E402
from peft_geora.tuner.experts import GeoRAParamWrapper  # noqa: E402

SHAPES = {  # hidden, moe_intermediate, experts
    "qwen3-30b-a3b": (2048, 768, 128),
    "small": (1024, 384, 16),
    "tiny": (64, 32, 4),  # for the test that runs this script
}
TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def build_layer(shape: str, device: str) -> torch.nn.Module:
    hidden, intermediate, experts = SHAPES[shape]
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=intermediate,
        moe_intermediate_size=intermediate,
        num_hidden_layers=1,
        num_attention_heads=16,
        num_key_value_heads=4,
        num_experts=experts,
        num_experts_per_tok=8,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device).eval()


def expert_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    experts = model.model.layers[0].mlp.experts
    return [experts.gate_up_proj.detach(), experts.down_proj.detach()]  # both stored (E, out, in)


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def per_expert_loop(matrices: list[torch.Tensor], r: int) -> list[torch.Tensor]:
    return [
        torch.stack([(f.B @ f.A) for f in (geora_decompose(m, r, svd_solver="exact").factors for m in stack)])
        for stack in matrices
    ]


def batched_products(model: torch.nn.Module, r: int) -> list[torch.Tensor]:
    """``B0_e A0_e`` per expert from GeoRA's wrappers, in the order of :func:`expert_matrices`."""
    found = {m.parameter_name: m for m in model.modules() if isinstance(m, GeoRAParamWrapper)}
    products = []
    for name in ("gate_up_proj", "down_proj"):
        wrapper = found[name]
        e = wrapper.num_experts
        a0 = wrapper.lora_A["default"].anchor.reshape(e, r, -1)
        b0 = wrapper.lora_B["default"].anchor.reshape(-1, r, e).permute(2, 0, 1)
        products.append(b0 @ a0)
    return products


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = tuple(round(x, 2) for x in os.getloadavg())
    configs = {
        "lora": lambda: LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=[], target_parameters=TARGETS),
        "geora_batched": lambda: GeoRAConfig(
            r=args.r, target_modules=[], target_parameters=TARGETS, init_device=args.device
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in (*configs, "geora_per_expert_loop")}
    largest_difference = 0.0
    for _ in range(args.repeats):
        for name, make in configs.items():
            model = build_layer(args.shape, args.device)
            elapsed, peft_model = timed(lambda: get_peft_model(model, make()), args.device)  # noqa: B023
            seconds[name].append(elapsed)
            if name == "geora_batched":
                batched = batched_products(peft_model, args.r)
        matrices = expert_matrices(build_layer(args.shape, args.device))
        elapsed, looped = timed(lambda: per_expert_loop(matrices, args.r), args.device)  # noqa: B023
        seconds["geora_per_expert_loop"].append(elapsed)
        for ours, theirs in zip(batched, looped):
            largest_difference = max(largest_difference, float((ours.to(theirs.device) - theirs).abs().max()))
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    hidden, intermediate, experts = SHAPES[args.shape]
    rows = [["method", "median s", "x LoRA", "x GeoRA batched"]]
    for name, value in medians.items():
        rows.append(
            [name, f"{value:.3f}", f"{value / medians['lora']:.1f}", f"{value / medians['geora_batched']:.2f}"]
        )
    print(f"one Qwen3-MoE layer, {experts} experts, hidden {hidden}, moe_intermediate {intermediate}, r={args.r}")
    print(format_table(rows))
    print(f"largest |B0 A0| difference, batched vs loop: {largest_difference:.2e}")
    if args.out:
        load_after = tuple(round(x, 2) for x in os.getloadavg())
        result = {
            "shape": {"name": args.shape, "hidden": hidden, "moe_intermediate": intermediate, "experts": experts},
            "r": args.r,
            "seconds": seconds,
            "median_seconds": medians,
            "largest_product_difference": largest_difference,
            "machine": machine_info(load_before, load_after, args.device),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
