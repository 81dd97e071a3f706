"""The benchmark scripts run end to end on a slice of SmolLM2 and write the JSON the README's tables come from.

Each runs in its own interpreter, as from the command line (they set torch's thread count and logging levels).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import ROOT

pytestmark = pytest.mark.slow

BENCHMARKS = ROOT / "benchmarks"


def run_script_printing(name: str, args: list[str], out: Path) -> tuple[dict, str]:
    """Run a benchmark script; its JSON result and what it printed."""
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args, "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def run_script(name: str, args: list[str], out: Path) -> dict:
    return run_script_printing(name, args, out)[0]


def test_init_speed_compares_geora_with_peft_on_one_layer(smollm2_path, tmp_path):
    args = ["--model", str(smollm2_path), "--layers", "1", "--repeats", "1", "--slow-repeats", "0"]
    args += ["--extra-niter", "0", "--extra-oversample", "8", "--no-memory"]
    result = run_script("init_speed.py", args, tmp_path / "init.json")
    assert set(result["median_seconds"]) == {"lora", "pissa_niter_4", "geora", "geora_oversample_8"}
    quality = result["quality"]["geora"]["summary"]
    assert quality["layers"] == 7 and quality["captured_energy"]["min"] >= 0.999
    assert quality["euclidean_threshold_exact_fraction"] == 1.0
    assert quality["anchors_reproduced_bitwise_fraction"] == 1.0


def test_step_flops_count_cpu_attention():
    """torch's counter skips the CPU attention kernel; step_speed counts it like the CUDA ones (forward 4 s^2 d h,
    backward 2.5x that)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(BENCHMARKS))
    from step_speed import CPU_ATTENTION_FLOPS

    q = torch.randn(1, 3, 128, 16, requires_grad=True)
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counted:
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert counted.get_total_flops() == 3.5 * 4 * 128**2 * 16 * 3


@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_step_speed_times_geora_against_lora(smollm2_path, tmp_path, autocast):
    args = ["--model", str(smollm2_path), "--layers", "1", "--batch", "1", "--seq", "16", "--warmup", "0"]
    args += ["--rounds", "1", "--steps", "1", "--no-memory", "--autocast", autocast]
    result, printed = run_script_printing("step_speed.py", args, tmp_path / "step.json")
    assert result["args"]["autocast"] == autocast
    seconds, median, flops = result["seconds"], result["median_seconds"], result["flops"]
    assert {method: len(steps) for method, steps in seconds.items()} == {"geora": 1, "lora": 1}  # 1 round x 1 step
    for method, steps in seconds.items():
        assert all(0.0 < s < 600.0 for s in steps), (method, steps)  # a measured step of a 1-layer model
        assert median[method] == statistics.median(steps)
    # the ratios are those of the measured quantities the JSON reports
    ratio = result["geora_over_lora"]
    assert ratio == median["geora"] / median["lora"]
    assert result["per_round_ratio"] == [seconds["geora"][0] / seconds["lora"][0]]
    assert result["geora_over_lora_flops"] == flops["geora"] / flops["lora"]
    assert 1.0 < result["geora_over_lora_flops"] < 1.2  # the rank-2r adapter, on one layer and a 16-token batch
    # the printed table and summary show the JSON's numbers
    rows = {cells[0]: cells for cells in map(str.split, printed.splitlines()) if cells[:1] in (["geora"], ["lora"])}
    for method in ("geora", "lora"):
        assert rows[method][2:5] == [f"{flops[method] / 1e9:.1f}", f"{median[method]:.4f}", "1"], rows[method]
    assert f"GeoRA / LoRA step time: {ratio:.3f} " in printed
    assert f"FLOPs {result['geora_over_lora_flops']:.4f}" in printed


def test_decompose_stages_reports_stages_blocks_and_check_spacing(smollm2_path, tmp_path):
    args = ["--model", str(smollm2_path), "--layer", "3", "--matrices", "q_proj,k_proj", "--blocks", "8", "16"]
    args += ["--check-growths", "1", "1.25", "--eigh-sizes", "64", "--repeats", "1", "--profile", "q_proj"]
    result = run_script("decompose_stages.py", args, tmp_path / "stages.json")
    ops = result["profiles"]["q_proj"]["ops"]
    assert ops["aten::mm"]["calls"] > 0 and ops["aten::_linalg_eigh"]["calls"] > 0  # products and eigensolves seen
    rows = result["matrices"]
    assert rows["q_proj"]["krylov_b16_energy"] >= 0.999 and rows["q_proj"]["krylov_growth1.25_energy"] >= 0.999
    assert "krylov_b8" not in rows["k_proj"]  # 192 wide: the exact Gram path, no Krylov sweep
    assert all(rows[m]["total"] > 0 and rows[m]["threshold"] > 0 for m in rows)


def test_krylov_convergence_counts_steps_against_the_oracle_stop(smollm2_path, tmp_path):
    args = ["--model", str(smollm2_path), "--layers", "2", "--matrices", "q_proj,k_proj,down_proj"]
    result = run_script("krylov_convergence.py", args, tmp_path / "convergence.json")
    rows = result["rows"]
    assert [(row["name"], row["matrix"]) for row in rows] == [
        ("q_proj", "W"),
        ("q_proj", "W_geo"),
        ("down_proj", "W"),
        ("down_proj", "W_geo"),
    ]  # k_proj (192 wide) takes the exact Gram path
    for row in rows:
        assert row["oracle"] <= row["steps"] and row["error"] <= 1e-3
        assert all(error > 1e-3 for error in row["trajectory_error"][: row["oracle"] - 1])  # the fewest steps
        assert row["products"] == 16 * (row["steps"] + 1)
    per_weight = result["per_weight"]
    assert result["pissa_products"] == 160 and per_weight["oracle_products"] <= per_weight["products"]


def test_krylov_convergence_bounds_the_time_per_block_size(smollm2_path, tmp_path):
    args = ["--model", str(smollm2_path), "--layers", "4", "--matrices", "gate_proj", "--blocks", "4", "8"]
    args += ["--repeats", "1"]
    result = run_script("krylov_convergence.py", args, tmp_path / "blocks.json")
    w, w_geo = result["rows"]
    for row in (w, w_geo):
        assert row["blocks"]["8"]["steps"] == row["oracle"]  # bisection finds the linear scan's hindsight stop
        assert row["blocks"]["4"]["products"] == 8 * (row["blocks"]["4"]["steps"] + 1)
        assert all(b["seconds_per_product"] > 0 for b in row["blocks"].values())
    assert w["pissa_seconds"] > 0 and "pissa_seconds" not in w_geo  # PiSSA sketches W once per weight
    summary = result["blocks"]
    assert summary["8"]["products_per_weight"] == w["oracle_products"] + w_geo["oracle_products"]
    assert summary["4"]["over_pissa"] == summary["4"]["product_seconds"] / w["pissa_seconds"]


def test_moe_init_compares_batched_geora_with_the_per_expert_loop_and_lora(tmp_path):
    result = run_script("moe_init.py", ["--shape", "tiny", "--repeats", "1", "--r", "4"], tmp_path / "moe.json")
    assert set(result["median_seconds"]) == {"lora", "geora_batched", "geora_per_expert_loop"}
    assert result["shape"]["experts"] == 4 and result["largest_product_difference"] < 1e-5
