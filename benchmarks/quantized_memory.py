"""Memory of GeoRA next to LoRA on the same bitsandbytes-quantized model (SmolLM2-135M-Instruct in nf4 by default).

Counts the bytes of the tensors each method adds (exact, from the tensors themselves): trainable factors, their
gradients and AdamW's two moments (float32), GeoRA's frozen anchors, and the quantized base. With ``--anchors`` it
also measures how far the anchors computed on the quantized weights are from those computed on the float weights
(what :func:`peft_geora.tuner.quantized.quantize_base` is for)::

    python benchmarks/quantized_memory.py                         # nf4, r=16, writes benchmarks/quantized_memory.json
    python benchmarks/quantized_memory.py --quant int8 --anchors --out /tmp/int8.json
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import peft_geora  # noqa: F401  (registers GeoRA)
from peft_geora import GeoRAConfig, GeoRALayer
from peft_geora.functional import geora_decompose
from peft_geora.tuner.bnb_weights import dequantized_weight

QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
MiB = 2**20


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def base_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the quantized base: packed weights with their quantization statistics, and float tensors."""
    import bitsandbytes as bnb

    packed, stats = 0, 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, bnb.nn.Params4bit):
            packed += tensor_bytes([weight.data])
            state = weight.quant_state.as_dict(packed=True)
            stats += tensor_bytes([v for v in state.values() if torch.is_tensor(v)])
        elif isinstance(module, bnb.nn.Linear8bitLt):
            packed += tensor_bytes([weight.data])
            stats += tensor_bytes([s for s in (weight.SCB, module.state.SCB) if s is not None][:1])
    quantized = {
        id(p) for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for p in [m.weight]
    }
    floats = tensor_bytes(p for p in model.parameters() if id(p) not in quantized and p.is_floating_point())
    return {"packed_weights": packed, "quant_stats": stats, "float_tensors": floats}


def adapter_bytes(model: torch.nn.Module) -> dict[str, int]:
    """What an adapter adds: trainable parameters (float32), gradients, AdamW moments, frozen anchors."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    anchors = [b for n, b in model.named_buffers() if n.endswith(".anchor")]
    n_trainable = sum(p.numel() for p in trainable)
    return {
        "trainable_params": n_trainable,
        "trainable": tensor_bytes(trainable),
        "grads": n_trainable * 4,
        "adamw_state": 2 * n_trainable * 4,
        "frozen_anchors": tensor_bytes(anchors),
    }


def measure(path: str, quant: str, r: int, alpha: int) -> dict:
    config = BitsAndBytesConfig(**QUANT[quant])
    rows = {}
    for method, peft_config in [
        ("geora", GeoRAConfig(r=r, lora_alpha=alpha)),
        ("lora", LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear")),
        ("lora_2r", LoraConfig(r=2 * r, lora_alpha=2 * alpha, target_modules="all-linear")),
    ]:
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")
        base = base_bytes(model)
        start = time.perf_counter()
        model = get_peft_model(model, peft_config)
        row = adapter_bytes(model)
        row["init_seconds"] = round(time.perf_counter() - start, 2)
        row["adapted_modules"] = sum(1 for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
        row["training_state"] = row["trainable"] + row["grads"] + row["adamw_state"] + row["frozen_anchors"]
        rows[method] = {**row, **{f"base_{k}": v for k, v in base.items()}}
        del model
    return rows


def anchor_agreement(path: str, quant: str, r: int) -> dict[str, float]:
    """Anchors from the quantized vs the float weights: mask Jaccard indices and subspace overlap of ``A0``'s rows."""
    config = BitsAndBytesConfig(**QUANT[quant])
    floats = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu"), GeoRAConfig(r=r)
    )
    results: dict[str, list[float]] = {
        "euclidean_jaccard": [],
        "spectral_jaccard": [],
        "union_jaccard": [],
        "a0_subspace_overlap": [],
        "relative_quant_error": [],
    }
    for name, layer in model.base_model.model.named_modules():
        if not isinstance(layer, GeoRALayer):
            continue
        w_float = floats.get_submodule(name).weight.detach().float()
        w_quant = dequantized_weight(layer.get_base_layer())
        results["relative_quant_error"].append(float((w_quant - w_float).norm() / w_float.norm()))
        dq, df = geora_decompose(w_quant, r), geora_decompose(w_float, r)
        (sq, eq), (sf, ef) = dq.masks, df.masks
        results["euclidean_jaccard"].append(jaccard(eq, ef))
        results["spectral_jaccard"].append(jaccard(sq, sf))
        results["union_jaccard"].append(jaccard(sq | eq, sf | ef))
        vq, vf = torch.linalg.qr(dq.factors.A.T)[0], torch.linalg.qr(df.factors.A.T)[0]
        results["a0_subspace_overlap"].append(float((vq.T @ vf).square().sum()) / r)
    return {k: {"mean": sum(v) / len(v), "min": min(v), "max": max(v)} for k, v in results.items()}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum()) / float((a | b).sum())


def print_table(rows: dict, quant: str) -> None:
    base = next(iter(rows.values()))
    packed, stats, floats = (base[f"base_{k}"] / MiB for k in ("packed_weights", "quant_stats", "float_tensors"))
    print(
        f"\nbase ({quant}): packed weights {packed:.1f} MiB, quantization stats {stats:.2f} MiB, "
        f"float tensors (embeddings, norms, head) {floats:.1f} MiB\n"
    )
    cols = [
        ("trainable_params", "trainable params", 1),
        ("trainable", "trainable MiB", MiB),
        ("grads", "grads MiB", MiB),
        ("adamw_state", "AdamW MiB", MiB),
        ("frozen_anchors", "frozen anchors MiB", MiB),
        ("training_state", "total added MiB", MiB),
        ("init_seconds", "init s", 1),
    ]
    print("| method | modules | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for method, row in rows.items():
        cells = [f"{row[k] / d:,.2f}" if d != 1 or isinstance(row[k], float) else f"{row[k]:,}" for k, _, d in cols]
        print(f"| {method} | {row['adapted_modules']} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--quant", choices=list(QUANT), default="nf4")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=int, default=32)
    parser.add_argument("--anchors", action="store_true", help="also compare anchors from quantized vs float weights")
    parser.add_argument("--out", default=str(Path(__file__).with_name("quantized_memory.json")))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*(MatMul8bitLt|kernels).*")
    torch.set_num_threads(1)  # many small decompositions: one thread avoids OpenMP spin-waits on a shared machine
    if args.model is None:
        from peft_geora_apps.default_model import default_model_path

        args.model = str(default_model_path())
    rows = measure(args.model, args.quant, args.r, args.alpha)
    print_table(rows, args.quant)
    result = {"model": args.model, "quant": args.quant, "r": args.r, "alpha": args.alpha, "methods": rows}
    if args.anchors:
        result["anchor_agreement"] = anchor_agreement(args.model, args.quant, args.r)
        print("\nanchors on the quantized vs the float weights (over all adapted modules):")
        for key, stats in result["anchor_agreement"].items():
            print(f"  {key}: mean {stats['mean']:.3f}, min {stats['min']:.3f}, max {stats['max']:.3f}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
