"""The RLVR sweep's bookkeeping: which runs it plans, which learning rate it selects, what it reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.rlvr import sweep  # noqa: E402


def fake_run(method: str, lr: float, seed: int = 0, task: str = "addition", val: float = 0.5, phase: str = "sweep"):
    after = {"in_domain": val, "validation": val, "longer_numbers": 0.1, "retained_skill": 0.8, "general_kl": lr}
    before = {"in_domain": 0.4, "validation": 0.4, "longer_numbers": 0.1, "retained_skill": 0.9, "general_kl": 0.0}
    return {
        "method": method,
        "learning_rate": lr,
        "seed": seed,
        "task": task,
        "phase": phase,
        "before": before,
        "after": after,
        "reward_curve": [val] * 30,
        "wall_seconds": 600.0,
    }


def write(out: Path, run: dict) -> None:
    path = sweep.Run(run["phase"], run["task"], run["method"], run["learning_rate"], run["seed"]).path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(run))


def test_the_sweep_comes_first_and_later_phases_follow_each_selection():
    runs = sweep.plan([])
    assert {r.phase for r in runs} == {"sweep"}
    assert len(runs) == sum(len(grid) for grid in sweep.LR_GRIDS.values())
    for method, grid in sweep.LR_GRIDS.items():
        assert len(grid) >= 4 and max(grid) / min(grid) >= 10, method
        assert sorted(r.learning_rate for r in runs if r.method == method) == sorted(grid)
    # the middle of every grid is planned before its ends
    first = runs[: len(sweep.METHODS)]
    assert all(r.learning_rate not in (min(sweep.LR_GRIDS[r.method]), max(sweep.LR_GRIDS[r.method])) for r in first)
    grid = sweep.LR_GRIDS["lora"]
    results = [fake_run("lora", lr, val=0.9 if lr == grid[2] else 0.5) for lr in grid]
    assert sweep.selected_lr(results, "lora") == grid[2]
    assert sweep.selected_lr(results[:-1], "lora") is None  # an unfinished grid selects nothing
    later = [r for r in sweep.plan(results) if r.phase != "sweep"]
    assert {(r.phase, r.method, r.learning_rate, r.seed, r.task) for r in later} == {
        ("final", "lora", grid[2], 1, "addition"),
        ("final", "lora", grid[2], 2, "addition"),
        ("task2", "lora", grid[2], 0, "comparison"),
        ("task2", "lora", grid[2], 1, "comparison"),
    }


def test_ties_go_to_the_higher_final_reward():
    grid = sweep.LR_GRIDS["geora"]
    results = [fake_run("geora", lr) for lr in grid]
    results[1]["reward_curve"] = [0.1] * 25 + [0.9] * 5
    assert sweep.selected_lr(results, "geora") == grid[1]
    ablations = [r for r in sweep.plan(results) if r.phase == "ablation"]
    assert {(r.method, r.learning_rate) for r in ablations} == {(m, grid[1]) for m in sweep.ABLATIONS}


def test_report_tables_average_the_seeds_at_the_selected_lr(tmp_path):
    pytest.importorskip("matplotlib")
    grid = sweep.LR_GRIDS["lora"]
    for lr in grid:
        write(tmp_path, fake_run("lora", lr, val=0.7 if lr == grid[1] else 0.5))
    write(tmp_path, fake_run("lora", grid[1], seed=1, val=0.9, phase="final"))
    write(tmp_path, fake_run("lora", grid[3], seed=1, val=1.0, phase="final"))  # not the selected lr: left out
    (tmp_path / "runs" / "addition" / "base_seed0_eval48_val48.json").write_text(json.dumps({"validation": 0.4}))
    text = sweep.report(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith(f"| lora | {grid[1]:g} | 2 |"))
    assert "0.400 → 0.800 ± 0.141" in row  # in domain: mean and sample std of 0.7 and 0.9
    assert f"| lora | {grid[1]:g} (selected) |" in text
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["selected_learning_rates"]["lora"] == grid[1] and summary["runs"] == 6
    for name in ("lr_robustness.png", "frontier.png", "reward_curves.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_orthonormal_factors_are_tried_where_geora_collapsed():
    grid = sweep.LR_GRIDS["geora"]
    healthy = [fake_run("geora", lr, val=0.9 if lr == grid[1] else 0.5) for lr in grid]
    assert sweep.collapsed_lrs(healthy, "geora") == []
    assert not [r for r in sweep.plan(healthy) if r.phase == "scale"]  # no collapse: no scale phase
    collapsed = healthy[:2] + [fake_run("geora", lr, val=0.2) for lr in grid[2:]]  # below the base's 0.4
    assert sweep.collapsed_lrs(collapsed, "geora") == list(grid[2:])
    runs = sweep.plan(collapsed)
    scale = [r for r in runs if r.phase == "scale"]
    assert {(r.method, r.learning_rate, r.seed) for r in scale} == {
        (sweep.SCALE_METHOD, lr, sweep.SWEEP_SEED) for lr in (grid[1], *grid[2:])
    }
    assert runs.index(scale[0]) < min(i for i, r in enumerate(runs) if r.phase == "final")
    write_all = [fake_run(sweep.SCALE_METHOD, r.learning_rate, val=0.6, phase="scale") for r in scale]
    text = sweep.scale_table(collapsed + write_all)
    assert f"| {grid[2]:g} | sqrt(S) (default) | 0.400 → 0.200 |" in text
    assert f"| {grid[2]:g} | orthonormal | 0.400 → 0.600 |" in text


def test_run_plans_again_after_each_run(tmp_path, monkeypatch):
    """One invocation runs the later phases too: they are planned once the sweep's grid is complete."""
    done = []

    def fake_run_one(run, args):
        val = 0.9 if run.learning_rate == sweep.LR_GRIDS[run.method][1] else 0.5
        write(tmp_path, fake_run(run.method, run.learning_rate, run.seed, run.task, val, run.phase))
        done.append(run)

    monkeypatch.setattr(sweep, "run_one", fake_run_one)
    sweep_runs = sum(len(grid) for grid in sweep.LR_GRIDS.values())
    args = ["run", "--out", str(tmp_path), "--phase", "sweep", "final"]
    assert sweep.main([*args, "--max-runs", str(sweep_runs + 1)]) == 0
    assert [r.phase for r in done] == ["sweep"] * sweep_runs + ["final"]
    assert sweep.main(args) == 0  # resumes: the rest of the final phase, nothing twice
    final = {(r.method, r.learning_rate, r.seed) for r in done[sweep_runs:]}
    assert len(final) == len(done) - sweep_runs == 2 * len(sweep.METHODS)
    assert final == {(m, sweep.LR_GRIDS[m][1], s) for m in sweep.METHODS for s in sweep.FINAL_SEEDS}
