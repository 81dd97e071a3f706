"""Does a small RL update survive half precision? GeoRA against LoRA and PEFT's PiSSA on the paths users take.

Each method (all linear projections, r=8, alpha=16) is trained for ``--steps`` AdamW steps on a tiny Llama whose
weights have a pretrained-like spectrum (a few dominant singular values over a flat tail), in float32, at each
learning rate. The float32 update ``dW`` of every adapted layer is the reference. Each path then produces the update
a user would actually get, and the error is the median over layers of ``||dW_path - dW||_F / ||dW||_F``:

* ``cast``: ``model.to(torch.bfloat16)`` after training (before inference, merging or saving in bf16);
* ``load_bf16``: the float32-saved adapter loaded with ``PeftModel.from_pretrained`` onto a bf16 base;
* ``export_bf16``: the adapter as a stock LoRA (GeoRA: ``save_as_lora``, rank 2r; PiSSA: PEFT's
  ``path_initial_model_for_weight_conversion``, rank 2r) with its factors rounded to bf16, as vLLM serves a LoRA;
* ``train_bf16``: the same training with bf16 adapter weights (bf16 base, ``autocast_adapter_dtype=False``), as
  DeepSpeed bf16 and FSDP2's bf16 ``MixedPrecisionPolicy`` run the forward on such a copy, against the same training
  with float32 adapter weights on the same bf16 base (PEFT's default): what storing the adapter in bf16 costs;
* ``train_bf16_vs_fp32``: the same bf16 training against the float32 reference. This also counts how the bf16
  base's forward changes the gradients, which float32 adapters on that base see alike (Adam's first steps follow the
  gradients' signs, so entries with small gradients move either way).

``init_load_bf16`` is the largest logit difference between the bf16 base and the untrained adapter loaded onto it
(0 means exact at initialisation). The update is measured against the base in the same dtype: for PiSSA, whose
base holds ``W - s B0 A0``, that is ``W_res + s B A - W`` (in float64).

    python benchmarks/precision.py --out benchmarks/results/precision.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_geora  # noqa: F401  (registers GeoRA with PEFT)
from peft_geora import GeoRAConfig, save_as_lora

METHODS = ("geora", "lora", "pissa")
PATHS = ("cast", "load_bf16", "export_bf16", "train_bf16", "train_bf16_vs_fp32")
LEARNING_RATES = (1e-6, 1e-5, 1e-4)
RANK, ALPHA, VOCAB = 8, 16, 128


def build_base(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """A 2-layer Llama (hidden 128) whose linear weights have a pretrained-like spectrum, in ``dtype``."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
                out_f, in_f = module.weight.shape
                u, _ = torch.linalg.qr(torch.randn(out_f, min(out_f, in_f), generator=gen))
                v, _ = torch.linalg.qr(torch.randn(in_f, min(out_f, in_f), generator=gen))
                k = torch.arange(min(out_f, in_f), dtype=torch.float32)
                sigma = 0.05 * (1.0 + 20.0 * torch.exp(-k / 4.0))  # a few dominant directions, then a flat tail
                module.weight.copy_((u * sigma) @ v.T)
    return model.to(dtype).eval()


def batches(steps: int, seed: int = 0, batch: int = 4, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)} for _ in range(steps)]


def adapter_config(method: str) -> LoraConfig:
    if method == "geora":
        return GeoRAConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0)
    init = "pissa" if method == "pissa" else True
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear", init_lora_weights=init)


def train(model: torch.nn.Module, lr: float, steps: int) -> torch.nn.Module:
    """``steps`` AdamW steps (no weight decay) on the language-modelling loss of fixed random batches."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for inputs in batches(steps):
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def adapted_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and module.active_adapters
    }


@torch.no_grad()
def effective_updates(model: torch.nn.Module, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, what the model adds to the original weight in the model's dtype (float64): ``W_base + dW - W``."""
    updates = {}
    for name, layer in adapted_layers(model).items():
        base = layer.get_base_layer().weight
        original = originals[name].to(base.dtype).double()
        delta = layer.get_delta_weight(layer.active_adapters[0]).double()
        updates[name] = base.double() + delta - original
    return updates


@torch.no_grad()
def lora_file_updates(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per layer ``s B A`` of a stock LoRA folder (uniform rank and alpha), factors rounded to ``dtype`` first."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config["rank_pattern"] and not config["alpha_pattern"] and not config["use_rslora"]
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    updates = {}
    for key, a in tensors.items():
        if key.endswith("lora_A.weight"):
            b = tensors[key.replace("lora_A", "lora_B")]
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            updates[name] = scaling * (b.to(dtype).double() @ a.to(dtype).double())
    return updates


def relative_error(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Median over layers of ``||got - ref||_F / ||ref||_F``."""
    assert got.keys() == reference.keys(), (sorted(got)[:3], sorted(reference)[:3])
    return statistics.median(float((got[k] - reference[k]).norm() / reference[k].norm()) for k in reference)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**batches(1, seed=99)[0]).logits.float()


class Scenario:
    """One method trained at one learning rate in float32, and the paths that re-express its update."""

    def __init__(self, method: str, lr: float, steps: int, workdir: Path) -> None:
        self.method, self.lr, self.steps, self.workdir = method, lr, steps, workdir
        base = build_base()
        self.originals = {
            n: m.weight.detach().clone() for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)
        }
        self.model = get_peft_model(base, adapter_config(method))
        self.init_dir = workdir / f"{method}-init"
        if method == "pissa":  # PEFT's recipe for converting PiSSA to a LoRA on the original weights
            self.model.peft_config["default"].init_lora_weights = True
            self.model.save_pretrained(self.init_dir)
            self.model.peft_config["default"].init_lora_weights = "pissa"
        elif method == "geora":
            self.model.save_pretrained(self.init_dir)
        train(self.model, lr, steps)
        self.reference = effective_updates(self.model, self.originals)
        self.saved = workdir / f"{method}-{lr:g}"
        kwargs = {"path_initial_model_for_weight_conversion": str(self.init_dir)} if method == "pissa" else {}
        self.model.save_pretrained(self.saved, **kwargs)  # PiSSA: written as a rank-2r LoRA on the original W

    def error(self, path: str) -> float:
        if path == "train_bf16":
            return relative_error(self.trained_on_bf16(adapters_in_fp32=False), self.trained_on_bf16(True))
        if path == "train_bf16_vs_fp32":
            return relative_error(self.trained_on_bf16(adapters_in_fp32=False), self.reference)
        return relative_error(getattr(self, f"_{path}")(), self.reference)

    def _cast(self) -> dict[str, torch.Tensor]:
        return effective_updates(copy.deepcopy(self.model).to(torch.bfloat16), self.originals)

    def _load_bf16(self) -> dict[str, torch.Tensor]:
        return effective_updates(PeftModel.from_pretrained(build_base(torch.bfloat16), self.saved), self.originals)

    def _export_bf16(self) -> dict[str, torch.Tensor]:
        if self.method != "geora":  # LoRA is its own export; PiSSA was saved converted
            return lora_file_updates(self.saved, torch.bfloat16)
        return lora_file_updates(save_as_lora(self.model, self.workdir / "geora-export"), torch.bfloat16)

    @functools.cache  # noqa: B019  (a few scenarios per process)
    def trained_on_bf16(self, adapters_in_fp32: bool) -> dict[str, torch.Tensor]:
        base = build_base(torch.bfloat16)
        model = get_peft_model(base, adapter_config(self.method), autocast_adapter_dtype=adapters_in_fp32)
        return effective_updates(train(model, self.lr, self.steps), self.originals)

    def init_load_bf16(self) -> float:
        """Largest logit difference between the bf16 base and the untrained adapter loaded onto it."""
        base = logits(build_base(torch.bfloat16))
        if self.method == "lora":
            untrained = self.workdir / "lora-init"
            get_peft_model(build_base(), adapter_config("lora")).save_pretrained(untrained)
        elif self.method == "pissa":
            untrained = self.workdir / "pissa-init-converted"
            model = PeftModel.from_pretrained(build_base(), self.init_dir, is_trainable=True)
            model.peft_config["default"].init_lora_weights = "pissa"
            model.save_pretrained(untrained, path_initial_model_for_weight_conversion=str(self.init_dir))
        else:
            untrained = self.init_dir
        loaded = PeftModel.from_pretrained(build_base(torch.bfloat16), untrained)
        return float((logits(loaded) - base).abs().max())


def measure(methods=METHODS, lrs=LEARNING_RATES, paths=PATHS, steps: int = 10) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in lrs:
            for method in methods:
                scenario = Scenario(method, lr, steps, Path(tmp))
                row = {"method": method, "lr": lr, **{p: scenario.error(p) for p in paths}}
                row["init_load_bf16"] = scenario.init_load_bf16()
                rows.append(row)
    return rows


def format_table(rows: list[dict], paths=PATHS) -> str:
    head = "| method | lr | " + " | ".join(paths) + " | init_load_bf16 (max logit diff) |"
    lines = [head, "|" + "---|" * (len(paths) + 3)]
    for row in rows:
        cells = [f"{row[p]:.3g}" for p in paths] + [f"{row['init_load_bf16']:.3g}"]
        lines.append(f"| {row['method']} | {row['lr']:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--lrs", nargs="+", type=float, default=list(LEARNING_RATES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = measure(args.methods, args.lrs, steps=args.steps)
    print(format_table(rows))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"steps": args.steps, "rank": RANK, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
