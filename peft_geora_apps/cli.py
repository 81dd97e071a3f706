"""``peft-geora`` command line: one subcommand per job, each implemented in its own function.

Only the standard library is imported until a command runs, so ``--help`` answers at once. Third-party libraries'
start-up notices (bitsandbytes' optional kernels, DeepSpeed's accelerator, deprecation warnings) are hidden unless
``--verbose`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

# loggers of dependencies that announce optional features at import time
QUIET_LOGGERS = ("bitsandbytes", "DeepSpeed", "deepspeed", "torch.distributed.elastic", "accelerate", "httpx")
# PEFT, offline, on saving an adapter of a Hub model: it cannot check the base's vocabulary (GeoRA adapts no embedding)
QUIET_WARNINGS = ("Unable to fetch remote file", "Could not find a config file")


def _init_report(args: argparse.Namespace) -> int:
    """Apply GeoRA to a model, print the per-layer-type init report, check the model is unchanged."""
    import torch
    from peft import get_peft_model

    from peft_geora import GeoRAConfig
    from peft_geora.diagnostics.report import format_table, summarize

    from .default_model import load_default_model

    model, tokenizer = load_default_model(args.model, device=args.device)
    model.eval()
    prompt = tokenizer("GeoRA keeps the base model exact at initialisation.", return_tensors="pt").to(args.device)
    with torch.no_grad():
        base_logits = model(**prompt).logits
    config = GeoRAConfig(r=args.r, lora_alpha=2 * args.r, rho=args.rho, svd_solver=args.svd_solver)
    start = time.perf_counter()
    peft_model = get_peft_model(model, config)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        logits = peft_model(**prompt).logits
    per_module = peft_model.base_model.geora_init_report()
    table = summarize(per_module)
    print(format_table(table))
    identical = torch.equal(logits, base_logits)
    print(
        f"\n{len(per_module)} modules, r={args.r}, rho={args.rho}, svd_solver={args.svd_solver}: "
        f"get_peft_model took {seconds:.2f} s; logits identical to the base model: {identical}"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"config": config.to_dict(), "seconds": seconds, "summary": table, "modules": per_module},
                fh,
                indent=2,
                default=str,
            )
        print(f"wrote {args.json}")
    return 0 if identical else 1


def _demo(args: argparse.Namespace) -> int:
    """GRPO with GeoRA on SmolLM2-135M-Instruct (or --model) on synthetic arithmetic; prints the reward curve."""
    from dataclasses import fields

    from .demo import DemoSettings, report, run_demo

    settings = DemoSettings(**{f.name: getattr(args, f.name) for f in fields(DemoSettings)})
    print(report(run_demo(settings)))
    return 0


def _export_lora(args: argparse.Namespace) -> int:
    """Convert a saved GeoRA adapter folder into a stock PEFT LoRA folder (exact rank 2r, or rank --rank)."""
    import json

    from peft_geora.sharing.export import REPORT_NAME, export_lora

    dst = export_lora(args.src, args.dst, rank=args.rank)
    if args.rank is None:
        print(f"wrote the exact rank-2r LoRA export of {args.src} to {dst}")
        return 0
    errors = json.loads((dst / REPORT_NAME).read_text())["relative_error"]
    worst = max(errors, key=errors.get)
    print(
        f"wrote a rank-{args.rank} LoRA export of {args.src} to {dst} (serve it with --max-lora-rank {args.rank}); "
        f"relative error of the update per module: median {sorted(errors.values())[len(errors) // 2]:.3g}, "
        f"largest {errors[worst]:.3g} ({worst}); all in {dst / REPORT_NAME}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="peft-geora", description="GeoRA (geometry-aware low-rank adaptation) for PEFT: demo and tools."
    )
    parser.add_argument("--verbose", action="store_true", help="show third-party start-up notices and warnings")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import DemoSettings

    defaults = DemoSettings()
    p = sub.add_parser(
        "demo",
        help="GRPO with GeoRA on the built-in SmolLM2-135M-Instruct (about 10 minutes on 2 CPU cores)",
        description="GRPO with GeoRA on the built-in SmolLM2-135M-Instruct, learning small additions from a "
        "verifiable reward (about 10 minutes on 2 CPU cores with the defaults). Prints one line per step, saves the "
        "adapter to OUTPUT_DIR/adapter after every step, and ends with the reward curve and the greedy accuracy on "
        "held-out problems before and after.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=defaults.steps, help="GRPO steps")
    p.add_argument("--model", default=None, help="local model folder (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=defaults.device, help="cpu or cuda")
    p.add_argument(
        "--output-dir", dest="output_dir", default=defaults.output_dir, help="adapter/, summary.json go here"
    )
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the problems, the sampling and the init")
    p.add_argument(
        "--prompts-per-step",
        dest="prompts_per_step",
        type=int,
        default=defaults.prompts_per_step,
        help="distinct problems per GRPO step",
    )
    p.add_argument(
        "--num-generations",
        dest="num_generations",
        type=int,
        default=defaults.num_generations,
        help="sampled completions per problem (GRPO's group size)",
    )
    p.add_argument(
        "--max-new-tokens",
        dest="max_new_tokens",
        type=int,
        default=defaults.max_new_tokens,
        help="longest completion, in tokens",
    )
    p.add_argument(
        "--learning-rate", dest="learning_rate", type=float, default=defaults.learning_rate, help="AdamW learning rate"
    )
    p.add_argument("--beta", type=float, default=defaults.beta, help="KL coefficient (TRL's default 0)")
    p.add_argument("--r", type=int, default=defaults.r, help="GeoRA rank")
    p.add_argument("--lora-alpha", dest="lora_alpha", type=int, default=defaults.lora_alpha, help="LoRA alpha")
    p.add_argument(
        "--eval-size",
        dest="eval_size",
        type=int,
        default=defaults.eval_size,
        help="held-out problems for the greedy accuracy before and after",
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("init-report", help="GeoRA init report over a model's layers (default: SmolLM2-135M)")
    p.add_argument("--model", default=None, help="local model folder (default: built-in SmolLM2-135M-Instruct)")
    p.add_argument("--r", type=int, default=16, help="GeoRA rank (default 16)")
    p.add_argument("--rho", type=float, default=0.2, help="quantile of both priors (default 0.2)")
    p.add_argument(
        "--svd-solver",
        dest="svd_solver",
        default="auto",
        choices=["auto", "exact", "randomized"],
        help="GeoRAConfig.svd_solver (default auto)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.set_defaults(func=_init_report)

    p = sub.add_parser("export-lora", help="write a saved GeoRA adapter as a stock PEFT LoRA (rank 2r, or --rank k)")
    p.add_argument("src", help="folder of a saved GeoRA adapter (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("dst", help="output folder for the LoRA adapter")
    p.add_argument(
        "--rank",
        type=int,
        default=None,
        help="write the best rank-k approximation of each module's update instead of the exact rank-2r LoRA "
        "(serving engines cap the rank: vLLM's --max-lora-rank defaults to 16); per-module errors go to "
        "geora_export.json",
    )
    p.set_defaults(func=_export_lora)

    p = sub.add_parser("inspect", help="where a saved GeoRA/LoRA adapter moved each weight: S_head, spectral shift")
    p.add_argument("adapter_dir", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--base", default=None, help="local base model folder (default: the config's, else built-in)")
    p.add_argument("--png", default=None, help="write a heatmap (layers x projection types) here")
    p.add_argument("--top-k", type=int, default=16, help="W's top-k directions for S_head and angles (default 16)")
    p.add_argument("--json", default=None, help="also write the per-layer rows as JSON here")

    def _inspect(args: argparse.Namespace) -> int:
        from .inspect_adapter import run

        return run(args)

    p.set_defaults(func=_inspect)
    return parser


def quiet_dependencies() -> None:
    """Hide dependencies' start-up notices, progress bars and deprecation warnings; errors still show.

    A filter as well as a level: DeepSpeed sets its logger's level when it is imported, after this runs.
    """
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        logger.addFilter(lambda record: record.levelno >= logging.ERROR)
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when transformers is imported


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.verbose:
        quiet_dependencies()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
