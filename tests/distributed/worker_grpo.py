"""One rank of a two-process GeoRA run under DDP, FSDP2 or ZeRO-3 (tests/integration/test_distributed.py).

Launched with ``accelerate launch --config_file examples/multi_gpu/<engine>.yaml``: the configs users copy. Steps:

1. single-process references on the same weights (base logits, GeoRA's initial factors);
2. engine-specific initialisation checks (ZeRO-3: partitioned at load, a gather that does not happen is refused;
   FSDP2: GeoRA on an already sharded model is refused);
3. TRL's GRPOTrainer with ``peft_config=GeoRAConfig(...)`` for 2 steps, beta > 0 (the KL reference is the disabled
   adapter);
4. the gathered model after training, the adapter saved by ``trainer.save_model`` (rank 0) and reloaded.

Each rank writes ``rank<k>.json`` to ``--out``; the pytest side compares ranks and asserts the invariants. Checks
that need a plain single-process model run here on every rank (they are cheap) and are recorded, not asserted, so
that one failing check does not hide the others.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Any

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.cpu_engines import enable_cpu_engines  # noqa: E402

enable_cpu_engines()

import torch  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import peft_geora  # noqa: E402
from peft_geora import GeoRAConfig, GeoRALayer  # noqa: E402
from peft_geora.functional import geora_decompose  # noqa: E402
from peft_geora.tuner.distributed import broadcast_from_rank0, full_shape  # noqa: E402
from tests.distributed.cpu_engines import digest, engine_facts, full_state_dict, shard_facts  # noqa: E402
from tests.distributed.worker_common import anchors_of, logits, max_diff, peft_key, write_result  # noqa: E402
from tests.grpo_utils import distinct_chars_reward, make_tiny_tokenizer, tiny_prompt_dataset  # noqa: E402

PROBE = "model.layers.0.mlp.down_proj"  # a rectangular (64 x 96) target
# beta > 0 makes TRL take its KL reference from disable_adapter(), on every engine (under ZeRO-3 too: the factors'
# shapes are read from the anchor buffers, which ZeRO-3 does not partition)
BETA = {"ddp": 0.1, "fsdp2": 0.1, "zero3": 0.1}


def geora_config() -> GeoRAConfig:
    return GeoRAConfig(r=4, lora_alpha=8)


def solver_digests(weight: torch.Tensor) -> dict[str, str]:
    """Digests of GeoRA's factors of one full weight with each solver: compared across ranks by the test."""
    out = {}
    for solver in ("auto", "exact", "randomized"):
        dec = geora_decompose(weight, 4, svd_solver=solver)
        out[solver] = digest(torch.cat([dec.factors.A.reshape(-1), dec.factors.B.reshape(-1)]))
    return out


def grpo_args(engine: str, output_dir: str) -> GRPOConfig:
    """GRPO settings of tests/grpo_utils.py; DDP uses accelerate's own CPU switch, the other engines their config."""
    return GRPOConfig(
        output_dir=output_dir,
        max_steps=2,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
        learning_rate=1e-2,
        beta=BETA[engine],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=engine == "ddp",
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def zero3_refuses_an_ungathered_weight(model: torch.nn.Module) -> dict[str, Any]:
    """Make DeepSpeed's gather a no-op: GeoRA must refuse the partition, and leave the model as it was."""
    import deepspeed

    real = deepspeed.zero.GatheredParameters
    deepspeed.zero.GatheredParameters = lambda *args, **kwargs: contextlib.nullcontext()
    try:
        get_peft_model(model, geora_config())
        error = None
    except Exception as exc:  # noqa: BLE001  (recorded, asserted by the test)
        error = f"{type(exc).__name__}: {exc}"
    finally:
        deepspeed.zero.GatheredParameters = real
    return {"error": error, "lora_layers_left": sum(isinstance(m, LoraLayer) for m in model.modules())}


def fsdp2_refuses_a_sharded_model(model_dir: str) -> dict[str, Any]:
    """GeoRA applied after fully_shard (base weights are DTensors) must fail with advice, changing nothing."""
    from torch.distributed.fsdp import fully_shard

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    facts = shard_facts(model.get_submodule(PROBE).weight)
    try:
        get_peft_model(model, geora_config())
        error = None
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
    return {"error": error, "probe": facts, "lora_layers_left": sum(isinstance(m, LoraLayer) for m in model.modules())}


def plain_checks(plains: dict[str, Any], full: dict[str, torch.Tensor], adapter_dir: str, engine_logits: torch.Tensor):
    """Invariants on the gathered weights, in a plain single-process model, and the saved adapter's reload.

    ``plains`` holds models built before the engine existed (under ZeRO-3 a later from_pretrained would partition):
    ``peft`` (a GeoRA model of the same config), ``base`` (untouched) and ``spare`` (a base to reload onto).
    """
    out: dict[str, Any] = {}
    plain = plains["peft"].eval()
    plain.load_state_dict(full, strict=True)
    base_logits, plain_logits = logits(plains["base"]), logits(plain)
    out["plain_vs_engine_logits"] = max_diff(plain_logits, engine_logits)
    with plain.disable_adapter():
        out["disabled_vs_base_bitwise"] = torch.equal(logits(plain), base_logits)
    deltas = []
    for name, module in plain.base_model.model.named_modules():
        if not isinstance(module, GeoRALayer):
            continue
        a, b = module.lora_A["default"], module.lora_B["default"]
        expected = module.scaling["default"] * ((b.anchor + b.delta) @ a.delta + b.delta @ a.anchor)
        weight = module.get_base_layer().weight.detach().clone()
        module.merge(adapter_names=["default"])
        merged = module.get_base_layer().weight.detach().clone()
        module.unmerge()
        deltas.append(
            {
                "module": name,
                "delta_norm": float(expected.norm()),
                "merged_minus_w_vs_delta": max_diff(merged - weight, expected),
                "unmerged_vs_w": max_diff(module.get_base_layer().weight, weight),
            }
        )
    out["deltas"] = deltas
    with peft_geora.base_check("raise"):  # the fingerprints recorded under the engine match the plain base
        reloaded = PeftModel.from_pretrained(plains["spare"], adapter_dir).eval()
    saved = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    out["reload_tensors"] = len(saved)
    out["reload_bitwise"] = all(torch.equal(v, full[k]) for k, v in saved.items())
    out["reload_logits_bitwise"] = torch.equal(logits(reloaded), plain_logits)
    return out


def factor_shapes(peft_model: Any, text: str) -> dict[str, Any]:
    """The factors' shapes as ``repr(model)`` prints them (its ``AnchoredA`` / ``AnchoredB`` lines; torch prints
    repeated identical layers once) and as each factor module's repr does, the anchors' shapes, and the deltas' full
    shapes next to what this rank holds of them (ZeRO-3: nothing)."""
    deltas = {n: p for n, p in peft_model.named_parameters() if n.endswith(".delta")}
    return {
        "model_repr_lines": re.findall(r"Anchored[AB]\(.*\)", text),
        "factor_reprs": {n: repr(m) for n, m in peft_model.named_modules() if type(m).__name__.startswith("Anchored")},
        "anchor_shapes": {n: list(b.shape) for n, b in peft_model.named_buffers() if n.endswith(".anchor")},
        "delta_full_shapes": {n: list(full_shape(p)) for n, p in deltas.items()},
        "delta_local_numel": sum(p.numel() for p in deltas.values()),
    }


def run(engine: str, model_dir: str, out_dir: Path) -> dict[str, Any]:
    import torch.distributed as dist

    result: dict[str, Any] = {"engine": engine, "import_s": time.perf_counter() - START}
    # 1. single-process references, made before any ZeRO-3 context exists
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    base_logits = logits(base)
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), geora_config())
    ref_anchors = {k: v.clone() for k, v in anchors_of(reference.state_dict()).items()}
    plains = {"peft": reference, "base": base, "spare": AutoModelForCausalLM.from_pretrained(model_dir)}
    result["solver_digests"] = solver_digests(base.get_submodule(PROBE).weight.detach())

    # 2. the engine; under ZeRO-3 the training arguments make from_pretrained partition the weights at load
    args = grpo_args(engine, str(out_dir / "trainer"))
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result["rank"] = dist.get_rank()
    result["probe_at_load"] = shard_facts(model.get_submodule(PROBE).weight)
    if engine == "zero3":
        result["ungathered"] = zero3_refuses_an_ungathered_weight(model)
        mine = torch.full((3,), float(dist.get_rank() + 1))
        (got,) = broadcast_from_rank0([mine], like=model.get_submodule(PROBE).weight)
        result["broadcast_from_rank0"] = got.tolist()
    if engine == "fsdp2":
        result["after_sharding"] = fsdp2_refuses_a_sharded_model(model_dir)

    t0 = time.perf_counter()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=distinct_chars_reward,
        args=args,
        train_dataset=tiny_prompt_dataset(),
        processing_class=make_tiny_tokenizer(model.config.vocab_size),
        peft_config=geora_config(),
    )
    result["init_s"] = time.perf_counter() - t0
    peft_model = trainer.model
    result["is_geora"] = type(peft_model.peft_config["default"]).__name__
    result["probe_after_init"] = shard_facts(peft_model.base_model.model.get_submodule(PROBE).base_layer.weight)
    init_anchors = anchors_of(dict(peft_model.named_buffers()))
    result["init_anchor_digests"] = {k: digest(v) for k, v in init_anchors.items()}
    result["init_anchors_equal_reference"] = init_anchors.keys() == ref_anchors.keys() and all(
        torch.equal(v.cpu(), ref_anchors[k]) for k, v in init_anchors.items()
    )

    t0 = time.perf_counter()
    trainer.train()
    result["train_s"] = time.perf_counter() - t0
    result["engine"] = engine
    result["facts"] = engine_facts(trainer)
    result["probe_after_train"] = shard_facts(peft_model.base_model.model.get_submodule(PROBE).base_layer.weight)
    factor_name = next(n for n, _ in peft_model.named_parameters() if n.endswith("lora_B.default.delta"))
    result["factor_after_train"] = shard_facts(dict(peft_model.named_parameters())[factor_name])
    result["kl"] = [float(e["kl"]) for e in trainer.state.log_history if "kl" in e]
    try:  # PEFT's disable_adapter() calls repr(model), which reads the GeoRA factors' shapes
        result["repr_after_train"] = factor_shapes(peft_model, repr(peft_model))
    except Exception as exc:  # noqa: BLE001
        result["repr_after_train"] = f"{type(exc).__name__}: {exc}"

    # 3. the trained model, gathered; its logits under the engine (every rank takes part)
    full = full_state_dict(trainer.model)
    result["full_digests"] = {k: digest(v) for k, v in full.items()}
    result["base_untouched"] = all(torch.equal(full[peft_key(k, full)], v) for k, v in base_state.items())
    result["anchors_unchanged"] = all(torch.equal(full[k], init_anchors[k].cpu()) for k in init_anchors)
    result["factors_trained"] = any(bool(full[k].any()) for k in full if k.endswith("lora_B.default.delta"))
    peft_model.eval()
    engine_logits = logits(peft_model)
    try:
        with peft_model.disable_adapter():
            result["engine_disabled_vs_base"] = max_diff(logits(peft_model), base_logits)
    except Exception as exc:  # noqa: BLE001  (ZeRO-3: see tests/integration/test_distributed.py)
        result["engine_disabled_error"] = f"{type(exc).__name__}: {exc}"

    # 4. save (trainer.save_model gathers; rank 0 writes), then reload and check on plain models
    adapter_dir = str(out_dir / "adapter")
    trainer.save_model(adapter_dir)
    dist.barrier()
    result["plain"] = plain_checks(plains, full, adapter_dir, engine_logits)
    if engine == "zero3":  # loading onto a partitioned base: the fingerprint check gathers the base weights
        with peft_geora.base_check("raise"):
            loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter_dir)
        result["zero3_reload_probe"] = shard_facts(loaded.base_model.model.get_submodule(PROBE).base_layer.weight)
        result["zero3_reload_factors_equal"] = all(
            torch.equal(v, full[k]) for k, v in loaded.state_dict().items() if k.endswith((".delta", ".anchor"))
        )
    result["total_s"] = time.perf_counter() - START
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("ddp", "fsdp2", "zero3"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    write_result(Path(opts.out), lambda: run(opts.engine, opts.model, Path(opts.out)))


if __name__ == "__main__":
    main()
