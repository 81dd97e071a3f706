"""RLVR benchmark, each method at its own learning rate: a per-method sweep, then seeds, ablations and a second task.

Phases (``python benchmarks/rlvr/sweep.py plan`` lists every run and what is done):

* ``sweep``: every method at each learning rate of its grid (:data:`LR_GRIDS`), seed 0, on the addition task. Each
  run is scored on a validation split, and the learning rate with the best validation accuracy is the method's
  selected one (ties: the higher mean reward over the last 5 steps).
* ``scale``: only if GeoRA collapsed somewhere in its sweep (ended below the base's validation accuracy): GeoRA with
  orthonormal initial factors (``scale_convention="orthonormal"``: ``U_r``, ``V_r`` times one constant per layer, no
  direction weighted by its singular value) at each lr where the default collapsed and at its selected lr, seed 0.
* ``final``: seeds 1 and 2 at each method's selected learning rate (seed 0 is the sweep's run), scored on the test
  split.
* ``ablation``: GeoRA's two one-prior variants at GeoRA's selected learning rate, seed 0.
* ``task2``: the comparison task ("which number is larger"), each method at its selected learning rate, seeds 0, 1.

Every run is its own process (``run_one.py``) and its own JSON file under ``--out``; a run whose file exists is
skipped, so the benchmark resumes where it stopped and can be run in several sittings (``--max-runs N`` runs N and
stops; ``--commit`` commits each run's file as it is written). Nothing else heavy may run beside it: on 2 CPU cores
contention makes GRPO steps several times slower. ``report`` writes ``results.md``, ``results.json`` and three plots
from whatever runs exist.

Budget (2 CPU cores, nothing else running): 30 steps of 3 prompts x 8 completions at about 13 s a step, plus
loading, the probes and the geometry: about 7.5 minutes a run (measured on the first sweep runs). 24 sweep + 12 final
+ 2 ablation + 12 second-task runs = 50 runs, about 6.5 hours, plus 2 to 4 ``scale`` runs (30 minutes at most): under
7 hours in all. Full fine-tuning's steps cost more.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

METHODS = ("geora", "lora", "pissa", "milora", "full_ft", "lora_r1")
ABLATIONS = ("geora_no_spectral", "geora_no_euclidean")
# GeoRA with orthonormal initial factors (scale_convention="orthonormal"): run where the default collapsed
SCALE_METHOD = "geora_orthonormal"
# 4 values spanning 30x per method family
LR_GRIDS: dict[str, tuple[float, ...]] = {
    "geora": (3e-5, 1e-4, 3e-4, 1e-3),
    "pissa": (3e-5, 1e-4, 3e-4, 1e-3),
    "milora": (3e-5, 1e-4, 3e-4, 1e-3),
    "lora": (1e-4, 3e-4, 1e-3, 3e-3),
    "lora_r1": (1e-4, 3e-4, 1e-3, 3e-3),
    "full_ft": (1e-6, 3e-6, 1e-5, 3e-5),
}
# the order in which a grid is run: the middle first, so a partial sweep already brackets each method
GRID_ORDER = (1, 2, 0, 3)
SWEEP_SEED, FINAL_SEEDS, ABLATION_SEEDS, TASK2_SEEDS = 0, (1, 2), (0,), (0, 1)
PHASES = ("sweep", "scale", "final", "ablation", "task2")
METRICS = (
    ("in_domain", "in domain"),
    ("longer_numbers", "OOD: longer numbers"),
    ("held_out_operation", "OOD: subtraction"),
    ("retained_skill", "retained skill"),
    ("general_kl", "KL to base"),
)


@dataclass(frozen=True)
class Run:
    phase: str
    task: str
    method: str
    learning_rate: float
    seed: int

    def path(self, out: Path) -> Path:
        return out / "runs" / self.task / f"{self.method}_lr{self.learning_rate:g}_seed{self.seed}.json"


def load_runs(out: Path) -> list[dict]:
    """Every finished run under ``out`` (the base model's cached scores, ``base_*.json``, are not runs)."""
    return [
        json.loads(p.read_text()) for p in sorted((out / "runs").glob("*/*.json")) if not p.name.startswith("base_")
    ]


def selected_lr(results: list[dict], method: str) -> float | None:
    """The learning rate of ``method``'s best sweep run on the validation split, once its whole grid is done."""
    sweep = [r for r in results if r["method"] == method and r["task"] == "addition" and r["seed"] == SWEEP_SEED]
    done = {r["learning_rate"] for r in sweep}
    if not set(LR_GRIDS[method]) <= done:
        return None
    return max(sweep, key=lambda r: (r["after"]["validation"], statistics.fmean(r["reward_curve"][-5:])))[
        "learning_rate"
    ]


def collapsed_lrs(results: list[dict], method: str) -> list[float]:
    """The sweep lrs at which ``method`` ended below the base model's validation accuracy (it unlearned)."""
    return sorted(
        r["learning_rate"]
        for r in results
        if r["method"] == method and r.get("phase") == "sweep" and r["after"]["validation"] < r["before"]["validation"]
    )


def plan(results: list[dict]) -> list[Run]:
    """Every run the benchmark needs, in running order; later phases appear once the sweep has chosen their lrs."""
    runs = []
    for index in GRID_ORDER:
        for method in METHODS:
            if index < len(LR_GRIDS[method]):
                runs.append(Run("sweep", "addition", method, LR_GRIDS[method][index], SWEEP_SEED))
    chosen = {method: selected_lr(results, method) for method in METHODS}
    collapsed = collapsed_lrs(results, "geora")
    if chosen["geora"] is not None and collapsed:
        for lr in sorted({chosen["geora"], *collapsed}):
            runs.append(Run("scale", "addition", SCALE_METHOD, lr, SWEEP_SEED))
    for seed in FINAL_SEEDS:
        runs += [Run("final", "addition", m, lr, seed) for m, lr in chosen.items() if lr is not None]
    if chosen["geora"] is not None:
        for seed in ABLATION_SEEDS:
            runs += [Run("ablation", "addition", m, chosen["geora"], seed) for m in ABLATIONS]
    for seed in TASK2_SEEDS:
        runs += [Run("task2", "comparison", m, lr, seed) for m, lr in chosen.items() if lr is not None]
    return runs


def run_one(run: Run, args: argparse.Namespace) -> None:
    path = run.path(Path(args.out))
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = path.parent / f"base_seed{run.seed}_eval{args.eval_size}_val{args.val_size}.json"
    command = [sys.executable, str(HERE / "run_one.py"), "--method", run.method, "--task", run.task]
    command += ["--seed", str(run.seed), "--learning-rate", repr(run.learning_rate), "--steps", str(args.steps)]
    command += ["--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations)]
    command += ["--eval-size", str(args.eval_size), "--val-size", str(args.val_size), "--device", args.device]
    command += ["--out", str(path), "--before-cache", str(cache)]
    start = time.perf_counter()
    subprocess.run(command, check=True)
    result = json.loads(path.read_text())
    result.update(phase=run.phase, wall_seconds=time.perf_counter() - start)
    path.write_text(json.dumps(result, indent=2))
    if args.commit:
        files = [str(path), str(cache)]
        subprocess.run(["git", "add", *files], cwd=ROOT, check=True)
        message = f"RLVR {run.phase}: {run.method} lr {run.learning_rate:g} seed {run.seed} ({run.task})"
        subprocess.run(["git", "commit", "-q", "-m", message, "--", *files], cwd=ROOT, check=True)


def _mean_std(values: list[float], fmt: str = ".3f") -> str:
    if len(values) < 2:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def table(results: list[dict], task: str) -> str:
    """Each method at its selected learning rate: mean ± std over seeds, test split."""
    keys = [(k, label) for k, label in METRICS if any(k in r["after"] for r in results if r["task"] == task)]
    headers = ["method", "lr", "seeds", *[label for _, label in keys], "reward first 5 → last 5"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for method in (*METHODS, *ABLATIONS):
        lr = selected_lr(results, "geora" if method in ABLATIONS else method)
        rows = [r for r in results if r["method"] == method and r["task"] == task and r["learning_rate"] == lr]
        if not rows:
            continue
        cells = [method, f"{lr:g}", str(len(rows))]
        for key, _ in keys:
            base = statistics.fmean(r["before"][key] for r in rows)
            cells.append(f"{base:.3f} → {_mean_std([r['after'][key] for r in rows], '.4f' if 'kl' in key else '.3f')}")
        first = _mean_std([statistics.fmean(r["reward_curve"][:5]) for r in rows], ".2f")
        last = _mean_std([statistics.fmean(r["reward_curve"][-5:]) for r in rows], ".2f")
        cells.append(f"{first} → {last}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_table(results: list[dict]) -> str:
    """Every sweep run: validation accuracy, KL and the last rewards, per method and learning rate."""
    lines = [
        "| method | lr | validation acc | KL to base | retained skill | reward last 5 |",
        "|---|---|---|---|---|---|",
    ]
    for method in METHODS:
        rows = sorted(
            (r for r in results if r["method"] == method and r.get("phase") == "sweep"),
            key=lambda r: r["learning_rate"],
        )
        chosen = selected_lr(results, method)
        for r in rows:
            mark = " (selected)" if r["learning_rate"] == chosen else ""
            lines.append(
                f"| {method} | {r['learning_rate']:g}{mark} | {r['before']['validation']:.3f} → "
                f"{r['after']['validation']:.3f} | {r['after']['general_kl']:.4f} | "
                f"{r['after']['retained_skill']:.2f} | {statistics.fmean(r['reward_curve'][-5:]):.2f} |"
            )
    return "\n".join(lines)


def scale_table(results: list[dict]) -> str:
    """GeoRA's default (singular-value-scaled) factors against orthonormal ones, at the same lr and seed."""
    lines = [
        "| lr | factors | validation acc | KL to base | retained skill | reward last 5 |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted((r for r in results if r["method"] == SCALE_METHOD), key=lambda r: r["learning_rate"]):
        default = next(
            (
                r
                for r in results
                if r["method"] == "geora" and r.get("phase") == "sweep" and r["learning_rate"] == run["learning_rate"]
            ),
            None,
        )
        for label, r in (("sqrt(S) (default)", default), ("orthonormal", run)):
            if r is None:
                continue
            before, after = r["before"], r["after"]
            lines.append(
                f"| {r['learning_rate']:g} | {label} | {before['validation']:.3f} → {after['validation']:.3f} "
                f"| {after['general_kl']:.4f} | {after['retained_skill']:.2f} | "
                f"{statistics.fmean(r['reward_curve'][-5:]):.2f} |"
            )
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in results if r.get("phase") == "sweep"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        rows = sorted((r for r in sweep if r["method"] == method), key=lambda r: r["learning_rate"])
        if rows:
            ax.plot([r["learning_rate"] for r in rows], [r["after"]["validation"] for r in rows], "o-", label=method)
    rows = sorted((r for r in results if r["method"] == SCALE_METHOD), key=lambda r: r["learning_rate"])
    if rows:
        xs, ys = [r["learning_rate"] for r in rows], [r["after"]["validation"] for r in rows]
        ax.plot(xs, ys, "s--", color="gray", label=f"{SCALE_METHOD} (scale phase)")
    if sweep:
        ax.axhline(sweep[0]["before"]["validation"], color="k", linestyle="--", linewidth=1, label="base")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation accuracy after training")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "lr_robustness.png", dpi=120)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in METHODS:
        rows = [r for r in sweep if r["method"] == method]
        if not rows:
            continue
        gain = [r["after"]["validation"] - r["before"]["validation"] for r in rows]
        axes[0].scatter([r["after"]["general_kl"] for r in rows], gain, label=method)
        axes[1].scatter([r["after"]["retained_skill"] for r in rows], gain, label=method)
    rows = [r for r in results if r["method"] == SCALE_METHOD]
    if rows:
        gain = [r["after"]["validation"] - r["before"]["validation"] for r in rows]
        for ax, key in zip(axes, ("general_kl", "retained_skill")):
            ax.scatter([r["after"][key] for r in rows], gain, marker="s", color="gray", label=SCALE_METHOD)
    axes[0].set_xscale("symlog", linthresh=1e-3)
    axes[0].set_xlabel("KL to the base on general prompts")
    axes[1].set_xlabel("retained skill (capitals named)")
    for ax in axes:
        ax.set_ylabel("validation gain (accuracy after - before)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=120)

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in METHODS:
        lr = selected_lr(results, method)
        curves = [
            r["reward_curve"]
            for r in results
            if r["method"] == method and r["task"] == "addition" and r["learning_rate"] == lr
        ]
        if curves:
            n = min(map(len, curves))
            mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{method} ({lr:g}, {len(curves)} seeds)")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "reward_curves.png", dpi=120)


def report(out: Path) -> str:
    results = load_runs(out)
    text = ["## Sweep (seed 0, validation split)", "", sweep_table(results), ""]
    if any(r["method"] == SCALE_METHOD for r in results):
        text += ["## GeoRA's initial factors: sqrt(S)-scaled or orthonormal (seed 0)", "", scale_table(results), ""]
    for task in ("addition", "comparison"):
        text += [f"## {task}: each method at its selected learning rate (test split)", "", table(results, task), ""]
    summary = {
        "selected_learning_rates": {m: selected_lr(results, m) for m in METHODS},
        "collapsed_learning_rates": {m: collapsed_lrs(results, m) for m in METHODS},
        "runs": len(results),
        "wall_seconds": sum(r.get("wall_seconds", 0.0) for r in results),
        "commits": sorted({r.get("commit", "unknown") for r in results}),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text("\n".join(text))
    plots(results, out)
    return "\n".join(text)


def _pending(planned: list[Run], out: Path, phases: list[str] | None) -> list[Run]:
    """The ``planned`` runs (of ``phases``, or all) that have no file under ``out`` yet, in running order."""
    return [r for r in planned if not r.path(out).exists() and (not phases or r.phase in phases)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "run", "report"))
    parser.add_argument("--out", default=str(HERE / "sweep"))
    parser.add_argument(
        "--phase", nargs="+", choices=PHASES, default=None, help="run only these phases (default: all, in order)"
    )
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs (resume later)")
    parser.add_argument("--commit", action="store_true", help="git-commit each run's JSON as it is written")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts-per-step", type=int, default=3)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--eval-size", type=int, default=48)
    parser.add_argument("--val-size", type=int, default=48)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.command == "report":
        print(report(out))
        return 0
    if args.command == "plan":
        done_runs = load_runs(out)
        planned = plan(done_runs)
        pending = _pending(planned, out, args.phase)
        walls = [r["wall_seconds"] for r in done_runs if "wall_seconds" in r]
        per_run = statistics.median(walls) if walls else math.nan
        for r in planned:
            print(
                f"{'done   ' if r.path(out).exists() else 'pending'}  {r.phase:8s} {r.task:10s} "
                f"{r.method:18s} lr {r.learning_rate:<7g} seed {r.seed}"
            )
        print(
            f"{len(done_runs)} done, {len(pending)} pending; median {per_run / 60:.1f} min per run, "
            f"about {len(pending) * per_run / 3600:.1f} h left (later phases appear as the sweep completes)"
        )
        return 0
    done = 0
    while args.max_runs is None or done < args.max_runs:
        # planned again after every run: a finished grid adds later phases
        pending = _pending(plan(load_runs(out)), out, args.phase)
        if not pending:
            break
        run, start = pending[0], time.perf_counter()
        run_one(run, args)
        done += 1
        print(
            f"[{done}] {run.phase} {run.task} {run.method} lr {run.learning_rate:g} seed {run.seed}: "
            f"{time.perf_counter() - start:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
