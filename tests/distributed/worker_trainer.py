"""One rank of a two-process transformers ``Trainer`` run on a language-model loss (launched by the tests).

Launched with ``accelerate launch --config_file examples/multi_gpu/<engine>.yaml`` (tests/distributed/launcher.py).
The adapter is applied with ``get_peft_model`` before the ``Trainer`` (a plain Trainer has no ``peft_config=``); the
data are fixed-length random token sequences (no padding, so every rank's loss averages the same number of tokens).
Tasks (``--task``):

* ``precision`` (tests/integration/test_distributed_precision.py): ``bf16=True`` under the engine, for GeoRA and for
  LoRA in turn, then single-process references trained on the same global batches from the same initial state: all
  float32 (``fp32``), and the engine's bf16 base with the adapter kept in float32 (``bf16_base``).
* ``train`` (tests/integration/test_distributed.py, FSDP2, float32): GeoRA for 3 steps with a checkpoint per step;
  writes the final adapter, and checks the engine against a single-process float32 reference (the machinery of
  ``precision``).
* ``resume``: a new launch resumes from the ``train`` run's ``checkpoint-2`` for the third step, with the base-weight
  check set to ``"raise"``; then the check on a sharded (DCP) save and load, and on a base changed under it.

Each rank writes ``rank<k>.json`` to ``--out``; the pytest side asserts.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.cpu_engines import enable_cpu_engines  # noqa: E402

enable_cpu_engines()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import peft_geora  # noqa: E402
from peft_geora import GeoRAConfig, GeoRALayer  # noqa: E402
from peft_geora.tuner import load_check as geora_load_check  # noqa: E402
from peft_geora.tuner.distributed import gathered  # noqa: E402
from tests.conftest import VOCAB  # noqa: E402
from tests.distributed.cpu_engines import digest, engine_facts, full_state_dict, shard_facts  # noqa: E402
from tests.distributed.worker_common import anchors_of, logits, max_diff, write_result  # noqa: E402

SEQ, BATCH = 16, 2  # per rank and step
METHODS = ("geora", "lora")
PROBE = "model.layers.0.self_attn.q_proj"
RESUME_STEPS = 3


def method_config(method: str) -> GeoRAConfig | LoraConfig:
    if method == "geora":
        return GeoRAConfig(r=4)
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def lm_dataset(n: int = 16) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (n, SEQ), generator=gen).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(output_dir: Path, *, bf16: bool, max_steps: int, save_steps: int = 0) -> TrainingArguments:
    """lr 1e-4, constant; otherwise the Trainer's defaults (fused torch AdamW, gradient clipping at 1.0)."""
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        report_to="none",
        bf16=bf16,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


class RecordingTrainer(Trainer):
    """A Trainer that records the input ids of each training step on this rank (the references replay them)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[torch.Tensor] = []

    def compute_loss(self, model, inputs, *args, **kwargs):  # noqa: ANN001
        if model.training:
            self.batches.append(inputs["input_ids"].detach().cpu())
        return super().compute_loss(model, inputs, *args, **kwargs)


def global_batches(trainer: RecordingTrainer) -> list[torch.Tensor]:
    """Each step's batch over all ranks, in rank order (the data-parallel step averages over exactly these)."""
    ranks: list[list[torch.Tensor] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, trainer.batches)
    return [torch.cat([rank[step] for rank in ranks]) for step in range(len(trainer.batches))]


def new_adapter(model_dir: str, method: str) -> torch.nn.Module:
    torch.manual_seed(0)  # LoRA's random A: the same on every rank and in every copy
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), method_config(method))


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    with peft_geora.base_check("off"):  # a container takes another model's state: its own fingerprints do not apply
        model.load_state_dict(state, strict=True)
    return model


def base_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's part of a PEFT model's state, under the base model's own names."""
    prefix = "base_model.model."
    return {k.removeprefix(prefix).replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if "lora_" in k}


def updates(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``dW = get_delta_weight`` of every adapted layer, in float32."""
    return {
        name: module.get_delta_weight("default").detach().float()
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


def relative_errors(dw: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float((dw[k] - ref[k]).norm() / ref[k].norm()) for k in ref}


def summary(errors: dict[str, float]) -> dict[str, float]:
    values = list(errors.values())
    return {"median": statistics.median(values), "max": max(values)}


def params_to_bf16(model: torch.nn.Module, frozen_only: bool = True) -> torch.nn.Module:
    """The engines' bf16 base: (frozen) parameters in bf16; buffers (rotary frequencies, GeoRA's anchors) as they are,
    as FSDP2's ``param_dtype`` and DeepSpeed's bf16 cast leave them."""
    for param in model.parameters():
        if not (frozen_only and param.requires_grad):
            param.data = param.data.to(torch.bfloat16)
    return model


@contextlib.contextmanager
def adapters_in_fp32(model: torch.nn.Module) -> Iterator[None]:
    """Run every ``lora_A`` / ``lora_B`` in float32, outside autocast (the base around them is unchanged)."""
    originals = {}
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for factor in (*module.lora_A.values(), *module.lora_B.values()):
                originals[factor] = factor.forward

                def forward(x: torch.Tensor, _forward: Callable = factor.forward) -> torch.Tensor:
                    with torch.autocast("cpu", enabled=False):
                        return _forward(x.float())

                factor.forward = forward
    try:
        yield
    finally:
        for factor, forward in originals.items():
            factor.forward = forward


def train_reference(
    model: torch.nn.Module, batches: list[torch.Tensor], args: TrainingArguments, *, autocast: bool = False
) -> torch.nn.Module:
    """One process, the engine's global batches: the Trainer's optimizer and clipping, the mean token loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls(params, **kwargs)
    model.train()
    for ids in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), adapters_in_fp32(model):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


# ---- precision ----


@contextlib.contextmanager
def captured_adapter_io(model: torch.nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """``{layer: [lora_A input, lora_B output]}`` of one forward of ``model`` (the engine's own forward)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.")
            seen[key] = [None, None]

            def grab_input(mod, args, _key=key):  # noqa: ANN001
                seen[_key][0] = args[0].detach().cpu()

            def grab_output(mod, args, output, _key=key):  # noqa: ANN001
                seen[_key][1] = output.detach().cpu()

            handles.append(module.lora_A["default"].register_forward_pre_hook(grab_input))
            handles.append(module.lora_B["default"].register_forward_hook(grab_output))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def adapter_output_errors(
    seen: dict[str, list[torch.Tensor]], container: torch.nn.Module
) -> tuple[dict[str, float], str]:
    """Relative error of ``s lora_B(lora_A(x))`` in the engine's forward against ``s x dW^T`` in float64."""
    errors, dtype = {}, ""
    for name, module in container.named_modules():
        key = name.removeprefix("base_model.model.")
        if key not in seen:
            continue
        x, out = seen[key]
        dtype = str(x.dtype).removeprefix("torch.")
        scale = module.scaling["default"]
        a, b = module.lora_A["default"], module.lora_B["default"]
        if hasattr(a, "anchor"):
            a0, da, b0, db = (t.detach().double() for t in (a.anchor, a.delta, b.anchor, b.delta))
            dw = (b0 + db) @ da + db @ a0
        else:
            dw = b.weight.detach().double() @ a.weight.detach().double()
        exact = x.double() @ dw.T * scale
        errors[key] = float((out.double() * scale - exact).norm() / exact.norm())
    return errors, dtype


def engine_precision_facts(trainer: Trainer, engine: str) -> dict[str, Any]:
    facts = engine_facts(trainer)
    if engine == "fsdp2":
        policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy  # what fully_shard was given
        for field in ("param_dtype", "reduce_dtype", "output_dtype"):
            facts[field] = str(getattr(policy, field, None)).removeprefix("torch.")
        facts["autocast"] = trainer.accelerator.native_amp  # accelerate's torch.autocast around the forward
    else:
        facts["bf16_enabled"] = trainer.model_wrapped.bfloat16_enabled()
    delta = next(p for n, p in trainer.model.named_parameters() if p.requires_grad)
    facts["stored_trainable_dtype"] = str(delta.dtype).removeprefix("torch.")
    return facts


def precision_one(method: str, engine: str, model_dir: str, out_dir: Path, containers: dict) -> dict[str, Any]:
    """Train ``method`` under the engine in bf16; compare with the references; check the invariants."""
    result: dict[str, Any] = {}
    args = training_args(out_dir / method, bf16=True, max_steps=3)
    model = new_adapter(model_dir, method)  # ZeRO-3: partitioned at load, in bf16
    init = full_state_dict(model)
    result["base_dtype"] = str(init[next(k for k in init if k.endswith("base_layer.weight"))].dtype)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=lm_dataset())
    t0 = time.perf_counter()
    trainer.train()
    result["train_s"] = time.perf_counter() - t0
    result["facts"] = engine_precision_facts(trainer, engine)
    result["probe"] = shard_facts(trainer.model.base_model.model.get_submodule(PROBE).base_layer.weight)
    final = full_state_dict(trainer.model)
    batches = global_batches(trainer)
    result["steps"] = len(batches)
    result["final_digests"] = {k: digest(v) for k, v in adapter_tensors(final).items()}
    init_anchors, final_anchors = anchors_of(init), anchors_of(final)
    result["anchors"] = {
        "count": len(final_anchors),
        "unchanged": all(torch.equal(final_anchors[k], init_anchors[k]) for k in init_anchors),
        "dtypes": sorted({str(v.dtype) for v in final_anchors.values()}),
    }

    # the engine's own forward: adapter output against the exact product; adapter disabled against the base
    trainer.model.eval()
    with captured_adapter_io(trainer.model) as seen:
        logits(trainer.model)
    with trainer.model.disable_adapter():
        engine_disabled = logits(trainer.model)

    # gathered weights in plain single-process models
    gathered_model = load_state(containers["gathered"], final).eval()
    errors, input_dtype = adapter_output_errors(seen, gathered_model)
    result["adapter_output_vs_exact"] = {**summary(errors), "input_dtype": input_dtype}
    dw_engine = updates(gathered_model)
    result["update_norms"] = {k: float(v.norm()) for k, v in dw_engine.items()}
    autocast = engine == "fsdp2"  # FSDP2 + bf16: accelerate's autocast around param_dtype bf16; DeepSpeed: none
    base = containers["base"]
    base.load_state_dict(base_state(init), strict=True)
    base = params_to_bf16(base, frozen_only=False).eval()
    params_to_bf16(gathered_model)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        base_logits = logits(base)
        with gathered_model.disable_adapter():
            result["gathered_disabled_bitwise"] = torch.equal(logits(gathered_model), base_logits)
    result["engine_disabled_vs_base"] = max_diff(engine_disabled, base_logits)
    result["engine_disabled_bitwise"] = torch.equal(engine_disabled, base_logits)

    # references on the same global batches, from the same initial state
    fp32 = train_reference(load_state(containers["fp32"], init), batches, args)
    bf16_base = params_to_bf16(load_state(containers["bf16_base"], init))
    bf16_base = train_reference(bf16_base, batches, args, autocast=autocast)
    dw_fp32, dw_bf16_base = updates(fp32), updates(bf16_base)
    result["errors"] = {
        "engine_vs_fp32": relative_errors(dw_engine, dw_fp32),
        "bf16_base_vs_fp32": relative_errors(dw_bf16_base, dw_fp32),
        "engine_vs_bf16_base": relative_errors(dw_engine, dw_bf16_base),
    }
    result["summary"] = {k: summary(v) for k, v in result["errors"].items()}
    del trainer
    gc.collect()
    return result


def precision(engine: str, model_dir: str, out_dir: Path) -> dict[str, Any]:
    # plain single-process models, built before the training arguments (under ZeRO-3 a later load is partitioned)
    containers = {
        method: {
            "fp32": new_adapter(model_dir, method),
            "bf16_base": new_adapter(model_dir, method),
            "gathered": new_adapter(model_dir, method),
            "base": AutoModelForCausalLM.from_pretrained(model_dir),
        }
        for method in METHODS
    }
    training_args(out_dir, bf16=True, max_steps=1)  # sets up the process group; ZeRO-3: later loads are partitioned
    result: dict[str, Any] = {"engine": engine, "rank": dist.get_rank()}
    for method in METHODS:
        result[method] = precision_one(method, engine, model_dir, out_dir, containers[method])
    result["total_s"] = time.perf_counter() - START
    return result


# ---- train / resume (FSDP2) ----


class Counting:
    """Counts calls of GeoRA's load check and of its base-weight fingerprints (patched at class/module level)."""

    def __init__(self) -> None:
        self.checks = self.fingerprints = 0
        self.mismatched: list[str] = []
        check, fingerprint = geora_load_check.check_loaded_adapters, GeoRALayer.geora_fingerprint

        def counted_check(model: torch.nn.Module) -> list[str]:
            self.checks += 1
            found = check(model)
            self.mismatched += found
            return found

        def counted_fingerprint(layer: GeoRALayer) -> dict:
            self.fingerprints += 1
            return fingerprint(layer)

        geora_load_check.check_loaded_adapters = counted_check
        GeoRALayer.geora_fingerprint = counted_fingerprint

    def snapshot(self) -> dict[str, Any]:
        return {"checks": self.checks, "fingerprints": self.fingerprints, "mismatched": list(self.mismatched)}


def train(engine: str, model_dir: str, out_dir: Path) -> dict[str, Any]:
    """The uninterrupted run: 3 steps, a checkpoint after each; the engine against a float32 reference."""
    reference = new_adapter(model_dir, "geora")
    model = new_adapter(model_dir, "geora")
    init = full_state_dict(model)
    args = training_args(out_dir / "run", bf16=False, max_steps=RESUME_STEPS, save_steps=1)
    trainer = RecordingTrainer(model=model, args=args, train_dataset=lm_dataset())
    trainer.train()
    result: dict[str, Any] = {"engine": engine, "rank": dist.get_rank(), "facts": engine_facts(trainer)}
    final = adapter_tensors(full_state_dict(trainer.model))
    if dist.get_rank() == 0:
        torch.save(final, out_dir / "final_adapter.pt")
    dist.barrier()
    result["checkpoints"] = sorted(p.name for p in (out_dir / "run").glob("checkpoint-*"))
    result["final_digests"] = {k: digest(v) for k, v in final.items()}
    fp32 = train_reference(load_state(reference, init), global_batches(trainer), args)
    dw_engine = updates(load_state(new_adapter(model_dir, "geora"), {**init, **final}))
    result["engine_vs_fp32_reference"] = summary(relative_errors(dw_engine, updates(fp32)))
    result["total_s"] = time.perf_counter() - START
    return result


class FirstStepState(TrainerCallback):
    """The adapter tensors as the resumed run starts its first step (every rank gathers: a collective)."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):  # noqa: ANN001
        if self.state is None:
            self.state = adapter_tensors(full_state_dict(model))


def resume(engine: str, model_dir: str, out_dir: Path, first_run: Path) -> dict[str, Any]:
    from accelerate.utils import load_fsdp_model, save_fsdp_model

    counting = Counting()
    checkpoint = first_run / "run" / "checkpoint-2"
    model = new_adapter(model_dir, "geora")
    plain_probe = model.base_model.model.get_submodule(PROBE).base_layer.weight.detach().clone()
    expected_fingerprint = model.base_model.model.get_submodule(PROBE).geora_expected_fingerprint["default"]
    args = training_args(out_dir / "run", bf16=False, max_steps=RESUME_STEPS, save_steps=1)
    result: dict[str, Any] = {"engine": engine, "rank": dist.get_rank()}
    first_step = FirstStepState()
    trainer = RecordingTrainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[first_step])
    before = counting.snapshot()
    with peft_geora.base_check("raise"):
        trainer.train(resume_from_checkpoint=str(checkpoint))
    result["facts"] = engine_facts(trainer)
    result["steps_run"] = len(trainer.batches)
    result["global_step"] = trainer.state.global_step
    result["check_at_resume"] = {"before": before, "after": counting.snapshot()}

    # what the checkpoint holds (FULL_STATE_DICT, adapter only: GeoRA's deltas and every persistent buffer)
    saved = torch.load(checkpoint / "pytorch_model_fsdp.bin", weights_only=True)
    loaded = first_step.state or {}
    names = {k.removeprefix("base_model.model."): k for k in loaded}
    result["checkpoint_keys"] = sorted(k for k in saved if k.endswith((".delta", ".anchor")))
    result["loaded_equal_checkpoint"] = {
        k: torch.equal(loaded[names.get(k, k)], v) for k, v in saved.items() if k.endswith((".delta", ".anchor"))
    }
    final = adapter_tensors(full_state_dict(trainer.model))
    uninterrupted = torch.load(first_run / "final_adapter.pt", weights_only=True)
    result["final_keys_match"] = sorted(final) == sorted(uninterrupted)
    result["final_bitwise"] = {k: torch.equal(v, uninterrupted[k]) for k, v in final.items() if k in uninterrupted}
    result["final_max_diff"] = max(max_diff(v, uninterrupted[k]) for k, v in final.items() if k in uninterrupted)

    # the helper and the fingerprint on the DTensor shard: the full weight, the fingerprint recorded before sharding
    layer = trainer.model.base_model.model.get_submodule(PROBE)
    weight = layer.base_layer.weight
    result["probe"] = shard_facts(weight)
    with gathered(weight) as full:
        result["gathered_is_full"] = type(full).__name__ == "Tensor" and torch.equal(full, plain_probe)
    result["fingerprint_on_shards_equal"] = layer.geora_fingerprint() == expected_fingerprint

    # a SHARDED_STATE_DICT save and load (DCP) through accelerate, as the Trainer does with that setting
    plugin, accelerator = trainer.accelerator.state.fsdp_plugin, trainer.accelerator
    plugin.set_state_dict_type("SHARDED_STATE_DICT")
    sharded_dir = out_dir / "sharded"
    save_fsdp_model(plugin, accelerator, trainer.model, str(sharded_dir), adapter_only=True)
    before = counting.snapshot()
    with peft_geora.base_check("raise"):
        load_fsdp_model(plugin, accelerator, trainer.model, str(sharded_dir), adapter_only=True)
    result["check_at_sharded_load"] = {"before": before, "after": counting.snapshot()}
    result["sharded_load_unchanged"] = all(
        torch.equal(v, final[k]) for k, v in adapter_tensors(full_state_dict(trainer.model)).items()
    )

    # a different base: change this rank's shard of one base weight, then load the checkpoint again
    plugin.set_state_dict_type("FULL_STATE_DICT")
    with torch.no_grad():
        weight.to_local().mul_(2.0)
    try:
        with peft_geora.base_check("raise"):
            trainer._load_from_checkpoint(str(checkpoint))
        result["changed_base"] = None
    except peft_geora.BaseModelMismatchError as exc:
        result["changed_base"] = str(exc)
    result["total_s"] = time.perf_counter() - START
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--task", choices=("precision", "train", "resume"), required=True)
    parser.add_argument("--engine", choices=("fsdp2", "zero3"), required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--first-run", default=None, help="resume: the --out of the train launch")
    opts = parser.parse_args()
    out_dir = Path(opts.out)
    if opts.task == "precision":
        write_result(out_dir, lambda: precision(opts.engine, opts.model, out_dir))
    elif opts.task == "train":
        write_result(out_dir, lambda: train(opts.engine, opts.model, out_dir))
    else:
        write_result(out_dir, lambda: resume(opts.engine, opts.model, out_dir, Path(opts.first_run)))


if __name__ == "__main__":
    main()
