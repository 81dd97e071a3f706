"""RLVR benchmark: GeoRA against LoRA, PiSSA, MiLoRA, the two one-prior ablations and full fine-tuning.

One command runs every (method, seed) at the main learning rate plus one high-learning-rate run per adapter method,
each in its own process (``run_one.py``), then writes ``results.json``, ``results.md`` and two PNG plots::

    python benchmarks/rlvr/run.py --out benchmarks/rlvr/results          # CPU sizing, see --help
    python benchmarks/rlvr/run.py --device cuda --steps 100 ...           # on a GPU

Finished runs are kept (``runs/*.json``) and skipped when the command is repeated, so it can be resumed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ADAPTERS = ["geora", "lora", "pissa", "milora", "geora_no_spectral", "geora_no_euclidean"]
METHODS = [*ADAPTERS, "full_ft"]
METRICS = [
    ("in_domain", "in-domain acc"),
    ("longer_numbers", "OOD: 2+2 digits"),
    ("held_out_operation", "OOD: subtraction"),
    ("retained_skill", "retained skill"),
    ("general_kl", "KL to base (general)"),
]


def run_all(args: argparse.Namespace) -> list[dict]:
    runs_dir = Path(args.out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    plan = [(m, s, args.full_ft_lr if m == "full_ft" else args.lr) for m in args.methods for s in args.seeds]
    plan += [(m, args.seeds[0], args.high_lr) for m in args.methods if m in ADAPTERS and args.high_lr]
    results = []
    for i, (method, seed, lr) in enumerate(plan, 1):
        path = runs_dir / f"{method}_seed{seed}_lr{lr:g}.json"
        if not path.exists():
            start = time.perf_counter()
            command = [sys.executable, str(HERE / "run_one.py"), "--method", method, "--seed", str(seed)]
            command += ["--learning-rate", str(lr), "--steps", str(args.steps), "--device", args.device]
            command += [
                "--prompts-per-step",
                str(args.prompts_per_step),
                "--num-generations",
                str(args.num_generations),
            ]
            command += ["--eval-size", str(args.eval_size), "--out", str(path)]
            command += ["--before-cache", str(runs_dir / f"base_seed{seed}_eval{args.eval_size}.json")]
            if args.model:
                command += ["--model", args.model]
            subprocess.run(command, check=True)
            print(f"[{i}/{len(plan)}] {method} seed {seed} lr {lr:g}: {time.perf_counter() - start:.0f} s", flush=True)
        results.append(json.loads(path.read_text()))
    return results


def _spread(values: list[float], fmt: str = ".3f") -> str:
    mean = statistics.fmean(values)
    return f"{mean:{fmt}}" if len(values) < 2 else f"{mean:{fmt}} ± {(max(values) - min(values)) / 2:{fmt}}"


def table(results: list[dict], lr: float, full_ft_lr: float) -> str:
    """Markdown table: per method at its main learning rate, mean ± half-range over seeds."""
    headers = [
        "method",
        "seeds",
        *[label for _, label in METRICS],
        "reward first→last 5",
        "S_head",
        "NSS",
        "s/step",
        "peak RSS MB",
    ]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method in METHODS:
        rows = [
            r
            for r in results
            if r["method"] == method and r["learning_rate"] == (full_ft_lr if method == "full_ft" else lr)
        ]
        if not rows:
            continue
        cells = [method, str(len(rows))]
        for key, _ in METRICS:
            before = statistics.fmean(r["before"][key] for r in rows)
            cells.append(f"{before:.3f} → {_spread([r['after'][key] for r in rows])}")
        first = statistics.fmean(statistics.fmean(r["reward_curve"][:5]) for r in rows)
        last = statistics.fmean(statistics.fmean(r["reward_curve"][-5:]) for r in rows)
        cells.append(f"{first:.2f} → {last:.2f}")
        cells.append(_spread([r["geometry"]["s_head"] for r in rows]))
        cells.append(_spread([r["geometry"]["spectral_shift"] for r in rows], ".1e"))
        cells.append(f"{statistics.fmean(r['step_seconds'] for r in rows):.1f}")
        cells.append(f"{statistics.fmean(r['peak_rss_mb'] for r in rows):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def high_lr_table(results: list[dict], high_lr: float) -> str:
    lines = ["| method | in-domain acc | reward last 5 | KL to base |", "|---|---|---|---|"]
    for r in (r for r in results if r["learning_rate"] == high_lr):
        last = statistics.fmean(r["reward_curve"][-5:])
        lines.append(
            f"| {r['method']} | {r['after']['in_domain']:.3f} | {last:.2f} | {r['after']['general_kl']:.4f} |"
        )
    return "\n".join(lines)


def plots(results: list[dict], lr: float, full_ft_lr: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = [r for r in results if r["learning_rate"] == (full_ft_lr if r["method"] == "full_ft" else lr)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        curves = [r["reward_curve"] for r in main if r["method"] == method]
        if curves:
            n = min(map(len, curves))
            ax.plot(range(1, n + 1), [statistics.fmean(c[i] for c in curves) for i in range(n)], label=method)
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (seeds averaged)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=120)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.5))
    for ax, (key, label) in zip(axes, METRICS[:4]):
        methods = [m for m in METHODS if any(r["method"] == m for r in main)]
        values = [statistics.fmean(r["after"][key] for r in main if r["method"] == m) for m in methods]
        base = statistics.fmean(r["before"][key] for r in main)
        ax.bar(range(len(methods)), values)
        ax.axhline(base, color="k", linestyle="--", linewidth=1, label="base")
        ax.set_xticks(range(len(methods)), methods, rotation=60, ha="right", fontsize=7)
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate of every adapter method")
    parser.add_argument("--full-ft-lr", type=float, default=1e-5)
    parser.add_argument("--high-lr", type=float, default=2e-3, help="stress point, one run per adapter (0: none)")
    parser.add_argument("--steps", type=int, default=10, help="GRPO steps per run (10: ~2 h in all on 2 CPU cores)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None)
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()
    results = run_all(args)
    summary = {"settings": vars(args), "results": results, "seconds_this_invocation": time.perf_counter() - start}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    text = [table(results, args.lr, args.full_ft_lr)]
    if args.high_lr:
        text += [
            "",
            f"High learning rate ({args.high_lr:g}), seed {args.seeds[0]}:",
            "",
            high_lr_table(results, args.high_lr),
        ]
    (out / "results.md").write_text("\n".join(text) + "\n")
    plots(results, args.lr, args.full_ft_lr, out)
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
