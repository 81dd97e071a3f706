"""Training step time and peak memory: GeoRA against LoRA at equal rank (forward + backward + AdamW step).

Both adapters are put on the same base model (all linear projections, r=16, alpha=32) and trained on the same
random token batch; steps alternate between the two methods (``--rounds`` rounds of ``--steps`` steps after
``--warmup`` steps each), and medians and ratios are reported. GeoRA's adapter computes ``B A x - B0 A0 x`` as
a rank-2r product (one matmul per factor, see ``peft_geora/tuner/anchor.py``) where LoRA's is rank r; the FLOPs of one
step (``torch.utils.flop_counter``: matrix products and attention) give the ratio that load cannot blur, the floor
under the time ratio where products dominate; ``--profile`` shows where the extra time goes with ``torch.profiler``.
Peak memory during training: on CUDA ``max_memory_allocated``; on CPU one fresh subprocess per method samples its
RSS (glibc told to return large blocks at once, as in ``init_speed.py``).

PEFT keeps adapters in fp32 on a half-precision base, so without autocast their products run in fp32, off a GPU's
tensor cores, where GeoRA's rank-2r product costs more than its FLOP share; ``--autocast bf16`` runs the forward
(and GeoRA's backward, which re-enters the forward's autocast) as TRL and accelerate do with ``bf16=True``.

Examples::

    python benchmarks/step_speed.py --out step_speed.json
    python benchmarks/step_speed.py --device cuda --shape qwen2.5-7b --layers 2 --seq 512
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from init_speed import (  # noqa: E402
    RssSampler,
    _return_memory_eagerly,
    _rss_bytes,
    build_model,
    common_arguments,
    format_table,
    machine_info,
    run_probe_script,
)

import peft_geora  # noqa: E402,F401  (registers GeoRA with PEFT)
from peft_geora import GeoRAConfig  # noqa: E402

logger = logging.getLogger("step_speed")

METHODS = ("lora", "geora")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16}  # fp16 would also need a GradScaler, as accelerate adds


def make_peft(base: torch.nn.Module, method: str, r: int) -> torch.nn.Module:
    """``base`` with a LoRA or GeoRA adapter of rank ``r`` on every linear projection (trainable)."""
    from peft import LoraConfig, get_peft_model

    common = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    config = LoraConfig(**common) if method == "lora" else GeoRAConfig(**common)
    model = get_peft_model(base, config)
    model.train()
    return model


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(args.device)
    return {"input_ids": ids, "labels": ids}


class Trainer:
    """One model, its AdamW optimizer and a fixed batch; :meth:`step` runs and times one training step."""

    def __init__(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str, autocast: str = "none"
    ) -> None:
        self.model, self.batch, self.device = model, batch, device
        self.autocast = autocast
        params = [p for p in model.parameters() if p.requires_grad]
        self.trainable = sum(p.numel() for p in params)
        self.optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(self) -> float:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def loss(self) -> torch.Tensor:
        """The forward pass, under ``torch.autocast`` when asked (as accelerate runs it for ``bf16=True``)."""
        if self.autocast == "none":
            return self.model(**self.batch).loss
        with torch.autocast(self.device.split(":")[0], dtype=AUTOCAST_DTYPES[self.autocast]):
            return self.model(**self.batch).loss


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# torch's counter knows the CUDA attention kernels but not the CPU one, which it would count as 0 FLOPs; counted
# like the CUDA kernels (the full score matrix: causality is not accounted for there either)
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def step_flops(trainer: Trainer) -> int:
    """FLOPs of one forward and backward as ``torch.utils.flop_counter`` counts them (matrix products and attention;
    not the optimizer or elementwise work). Untimed; the gradients are dropped."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        trainer.loss().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def memory_probe(args: argparse.Namespace) -> dict:
    """Peak memory of ``args.probe``'s training steps above the model with its adapter (this fresh process)."""
    cuda = args.device.startswith("cuda")
    if not cuda:
        _return_memory_eagerly()
    base = build_model(args)
    batch = make_batch(args, base.config.vocab_size)
    trainer = Trainer(make_peft(base, args.probe, args.r), batch, args.device, args.autocast)
    gc.collect()
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup + 1):
            trainer.step()
        return {"peak_above_model_mb": (torch.cuda.max_memory_allocated() - before) / 2**20}
    before = _rss_bytes()
    with RssSampler() as sampler:
        for _ in range(args.warmup + 1):
            trainer.step()
    return {"peak_above_model_mb": (sampler.peak - before) / 2**20}


def run_probe_subprocess(method: str, args: argparse.Namespace) -> dict | None:
    extra = ["--batch", str(args.batch), "--seq", str(args.seq), "--warmup", str(args.warmup)]
    extra += ["--autocast", args.autocast]
    return run_probe_script(__file__, method, args, extra)


def profile(trainers: dict[str, Trainer], steps: int, rows: int) -> dict[str, dict[str, float]]:
    """Self CPU (and CUDA) time per op over ``steps`` steps of each method; prints the ops whose time differs most."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    per_op: dict[str, dict[str, float]] = {}
    for method, trainer in trainers.items():
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                trainer.step()
        for event in prof.key_averages():
            entry = per_op.setdefault(event.key, {m: 0.0 for m in trainers})
            entry[method] = event.self_cpu_time_total / 1e3 / steps  # ms per step
    total = {m: sum(op[m] for op in per_op.values()) for m in trainers}
    diff = sorted(per_op.items(), key=lambda kv: abs(kv[1]["geora"] - kv[1]["lora"]), reverse=True)[:rows]
    table = [["op (self CPU ms / step)", "lora", "geora", "geora - lora"]]
    table += [[k, f"{v['lora']:.2f}", f"{v['geora']:.2f}", f"{v['geora'] - v['lora']:+.2f}"] for k, v in diff]
    table.append(["total", f"{total['lora']:.2f}", f"{total['geora']:.2f}", f"{total['geora'] - total['lora']:+.2f}"])
    print()
    print(format_table(table))
    return per_op


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (7B shape: default 2)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method before timing")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method and round")
    parser.add_argument("--profile", type=int, default=0, help="profile this many steps per method (0: off)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument(
        "--autocast",
        default="none",
        choices=["none", *AUTOCAST_DTYPES],
        help="run the forward under torch.autocast (what TRL / accelerate do with bf16=True); default: none, so "
        "PEFT's fp32 adapters run their products in fp32",
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("peft_geora").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(memory_probe(args)))
        return 0

    trainers = {}
    for method in METHODS:  # two copies of the base: adapters are injected in place
        base = build_model(args)
        batch = make_batch(args, base.config.vocab_size)
        trainers[method] = Trainer(make_peft(base, method, args.r), batch, args.device, args.autocast)
    for trainer in trainers.values():
        for _ in range(args.warmup):
            trainer.step()
    flops = {m: step_flops(trainers[m]) for m in METHODS}
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for rnd in tqdm(range(args.rounds), desc="rounds"):
        order = METHODS if rnd % 2 == 0 else METHODS[::-1]
        for method in order:
            times[method] += [trainers[method].step() for _ in range(args.steps)]
    load_after = os.getloadavg()
    median = {m: statistics.median(v) for m, v in times.items()}
    round_ratios = [
        statistics.median(times["geora"][i : i + args.steps]) / statistics.median(times["lora"][i : i + args.steps])
        for i in range(0, len(times["lora"]), args.steps)
    ]
    per_op = profile(trainers, args.profile, 15) if args.profile else None
    memory = {} if args.no_memory else {m: run_probe_subprocess(m, args) for m in tqdm(METHODS, desc="memory")}

    rows = [["method", "trainable", "GFLOP / step", "step s (median)", "steps", "peak MB above model"]]
    for method in METHODS:
        mem = memory.get(method)
        rows.append(
            [
                method,
                f"{trainers[method].trainable:,}",
                f"{flops[method] / 1e9:.1f}",
                f"{median[method]:.4f}",
                str(len(times[method])),
                f"{mem['peak_above_model_mb']:.1f}" if mem else "-",
            ]
        )
    print()
    print(format_table(rows))
    print(
        f"\nGeoRA / LoRA step time: {median['geora'] / median['lora']:.3f} (median of per-round ratios "
        f"{statistics.median(round_ratios):.3f}, range {min(round_ratios):.3f}-{max(round_ratios):.3f}); "
        f"FLOPs {flops['geora'] / flops['lora']:.4f}"
    )
    if memory.get("geora") and memory.get("lora"):
        ratio = memory["geora"]["peak_above_model_mb"] / memory["lora"]["peak_above_model_mb"]
        print(f"GeoRA / LoRA peak memory above the model: {ratio:.3f}")
    print(
        f"batch {args.batch} x seq {args.seq}, r={args.r}, autocast {args.autocast}; "
        f"load average before/after {load_before[0]:.1f} / "
        f"{load_after[0]:.1f}; torch threads {torch.get_num_threads()}"
    )
    if args.out:
        result = {
            "args": vars(args),
            "machine": machine_info(load_before, load_after, args.device),
            "seconds": times,
            "median_seconds": median,
            "geora_over_lora": median["geora"] / median["lora"],
            "per_round_ratio": round_ratios,
            "flops": flops,
            "geora_over_lora_flops": flops["geora"] / flops["lora"],
            "memory": memory,
            "profile_ms_per_step": per_op,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
