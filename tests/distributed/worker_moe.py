"""One rank of a two-process GeoRA run on a tiny Qwen3-MoE, ZeRO-3 or FSDP2 (tests/integration/test_distributed.py).

Launched with ``accelerate launch --config_file examples/multi_gpu/<engine>.yaml`` (tests/distributed/launcher.py,
with the test-only ZeRO-3 keys). ``GeoRAConfig(r=4)``: "all-linear" on Qwen3-MoE targets the attention projections,
both expert parameters (``mlp.experts.gate_up_proj`` / ``down_proj``, 3-D, PEFT's ``target_parameters``) and the
router.

1. single-process references on the same weights, made before any ZeRO-3 context (initial factors, a base to reload
   onto);
2. the training arguments, then ``from_pretrained``: under ZeRO-3 the weights (experts included) are partitioned at
   load; ``get_peft_model`` on every rank (GeoRA gathers each expert parameter, decomposes it, keeps rank 0's
   factors); under FSDP2 the Trainer shards the model after GeoRA's initialisation;
3. a plain ``Trainer`` on a language-model loss for 2 steps, with ``GeoRADiagnosticsCallback`` (every rank gathers
   the partitioned / sharded layers, rank 0 logs), whose logged numbers are compared with the callback run on a
   plain single-process model holding the gathered final state;
4. the gathered model after training, the adapter saved by ``trainer.save_model`` (rank 0) and reloaded on a plain
   single-process model.

Each rank writes ``rank<k>.json`` to ``--out``; the pytest side asserts.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

START = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.cpu_engines import enable_cpu_engines  # noqa: E402

enable_cpu_engines()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

import peft_geora  # noqa: E402
from peft_geora import GeoRAConfig  # noqa: E402
from peft_geora.diagnostics.callback import GeoRADiagnosticsCallback  # noqa: E402
from tests.conftest import VOCAB  # noqa: E402
from tests.distributed.cpu_engines import digest, engine_facts, full_state_dict, shard_facts  # noqa: E402
from tests.distributed.worker_common import anchors_of, logits, write_result  # noqa: E402

EXPERTS = "model.layers.0.mlp.experts"  # holds gate_up_proj (E x 2I x H) and down_proj (E x H x I)
SEQ, BATCH = 16, 2


def lm_dataset(n: int = 8) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (n, SEQ), generator=gen).tolist()
    return [{"input_ids": row, "labels": row} for row in ids]


def training_args(output_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def expert_probes(model: torch.nn.Module) -> dict[str, Any]:
    experts = model.get_submodule(EXPERTS)
    while hasattr(experts, "base_layer"):  # PEFT's (nested) ParamWrapper around the experts module
        experts = experts.base_layer
    return {name: shard_facts(getattr(experts, name)) for name in ("gate_up_proj", "down_proj")}


def run(engine: str, model_dir: str, out_dir: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"engine": engine, "import_s": time.perf_counter() - START}
    # 1. references, before any ZeRO-3 context exists
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    reference = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), GeoRAConfig(r=4))
    ref_factors = {k: v.clone() for k, v in reference.state_dict().items() if k.endswith((".anchor", ".delta"))}
    spare = AutoModelForCausalLM.from_pretrained(model_dir)

    # 2. ZeRO-3: partitioned at load, GeoRA on every rank
    args = training_args(out_dir / "trainer")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    result["rank"] = dist.get_rank()
    result["probe_at_load"] = expert_probes(model)
    t0 = time.perf_counter()
    peft_model = get_peft_model(model, GeoRAConfig(r=4))
    result["init_s"] = time.perf_counter() - t0
    result["probe_after_init"] = expert_probes(peft_model.base_model.model)
    result["parameter_targets"] = peft_model.peft_config["default"].parameter_targets
    init = full_state_dict(peft_model)
    factors = {k: v for k, v in init.items() if k.endswith((".anchor", ".delta"))}
    result["init_factor_count"] = len(factors)
    result["init_expert_factor_count"] = sum(".experts." in k for k in factors)
    result["init_factor_digests"] = {k: digest(v) for k, v in factors.items()}
    result["init_equal_reference"] = factors.keys() == ref_factors.keys() and all(
        torch.equal(v, ref_factors[k]) for k, v in factors.items()
    )
    result["init_unequal"] = sorted(
        k for k, v in factors.items() if k in ref_factors and not torch.equal(v, ref_factors[k])
    )

    # 3. a plain Trainer, LM loss, 2 steps, with the diagnostics callback
    callback = GeoRADiagnosticsCallback(every_n_steps=1, max_layers=None)
    trainer = Trainer(model=peft_model, args=args, train_dataset=lm_dataset(), callbacks=[callback])
    t0 = time.perf_counter()
    trainer.train()
    result["train_s"] = time.perf_counter() - t0
    result["facts"] = engine_facts(trainer)
    result["probe_after_train"] = expert_probes(peft_model.base_model.model)
    result["log_history"] = trainer.state.log_history
    result["callback_per_expert"] = sorted(callback.last_per_expert)  # empty on rank 1 (it only gathers)

    # 4. gathered, saved, reloaded
    full = full_state_dict(trainer.model)
    result["full_digests"] = {k: digest(v) for k, v in full.items()}
    result["base_untouched"] = all(torch.equal(full[_peft_base_key(k, full)], v) for k, v in base_state.items())
    anchors = anchors_of(full)
    result["anchors_unchanged"] = all(torch.equal(v, init[k]) for k, v in anchors.items())
    deltas = {k: v for k, v in full.items() if k.endswith(".delta") and ".experts." in k}
    result["expert_deltas_moved"] = {k: bool(v.any()) for k, v in deltas.items()}
    adapter_dir = out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    dist.barrier()
    with peft_geora.base_check("raise"):
        reloaded = PeftModel.from_pretrained(spare, str(adapter_dir)).eval()
    saved = {k: v for k, v in reloaded.state_dict().items() if k.endswith((".anchor", ".delta"))}
    result["reload_tensors"] = len(saved)
    result["reload_expert_tensors"] = sum(".experts." in k for k in saved)
    result["reload_bitwise"] = saved.keys() == {k for k in full if k.endswith((".anchor", ".delta"))} and all(
        torch.equal(v, full[k]) for k, v in saved.items()
    )
    plain = reference.eval()
    with peft_geora.base_check("off"):
        plain.load_state_dict(full, strict=True)
    result["reload_logits_bitwise"] = torch.equal(logits(reloaded), logits(plain))
    # the callback on the plain model holding the final state: what rank 0 logged at the last step
    result["callback_plain"] = GeoRADiagnosticsCallback(max_layers=None).compute(plain)
    result["total_s"] = time.perf_counter() - START
    return result


def _peft_base_key(base_key: str, state: dict[str, torch.Tensor]) -> str:
    """A base tensor's name in the PEFT model's state dict: under one ``base_layer`` per wrapper around it."""
    module, _, leaf = ("base_model.model." + base_key).rpartition(".")
    while module + "." + leaf not in state:
        module += ".base_layer"
        if module.count(".base_layer") > 4:
            raise KeyError(base_key)
    return module + "." + leaf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=("zero3", "fsdp2"), default="zero3")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    write_result(Path(opts.out), lambda: run(opts.engine, opts.model, Path(opts.out)))


if __name__ == "__main__":
    main()
