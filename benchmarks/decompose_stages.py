"""Where ``geora_decompose`` spends its time on one decoder layer's weights, and what the Krylov block size buys.

Per target matrix of one layer (SmolLM2's ``--layer``, or a random bf16 Qwen2.5-7B-shaped layer with ``--shape``),
on ``--device``, each timing the median of ``--repeats`` synchronised runs after a warm-up:

* ``total``: ``geora_decompose`` with the defaults; the stages: one exact threshold (``kth_smallest`` of ``|W|``;
  GeoRA needs two), the truncated SVD of ``W`` and of ``W_geo``; for comparison ``torch.kthvalue`` on all entries, a
  sort of all entries and ``torch.svd_lowrank(W, q=r, niter=4)``, the SVD of PEFT's ``pissa_niter_4``;
* the Krylov solver on ``W_geo`` for each ``--blocks`` size (``svd_oversample = block - krylov_block(r)``) and each
  spacing of its convergence checks (``--check-growths``, :data:`peft_geora.functional.svd.CHECK_GROWTH`): time and
  captured energy against the exact top-r energy (float64 Gram eigensolve);
* the building blocks of one Krylov step: the two products with one block, and the dense symmetric eigensolves of
  the projected problem (CPU and device) at the sizes the solver reaches.
* with ``--profile NAME [NAME ...]``: ``torch.profiler`` over one default Krylov solve of those matrices'
  ``W_geo``, per op: calls, host time (where launch latency and waits for the device show) and device time.

Example::

    python benchmarks/decompose_stages.py --device cuda --shape qwen2.5-7b --out stages_7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from init_speed import common_arguments, format_table, machine_info  # noqa: E402

import peft_geora.functional.svd as functional  # noqa: E402  (CHECK_GROWTH is the solver's)
from peft_geora.functional import (  # noqa: E402
    geora_decompose,
    krylov_block,
    krylov_svd,
    kth_smallest,
    quantile_rank,
    truncated_svd,
)
from peft_geora.functional.decomposition import _prior_indicators  # noqa: E402

QWEN7B_SHAPES = {
    "q_proj": (3584, 3584),
    "k_proj": (512, 3584),
    "v_proj": (512, 3584),
    "o_proj": (3584, 3584),
    "gate_proj": (18944, 3584),
    "up_proj": (18944, 3584),
    "down_proj": (3584, 18944),
}


def layer_matrices(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """The fp32 target weights of one decoder layer, on ``args.device``."""
    if args.shape == "qwen2.5-7b":
        gen = torch.Generator().manual_seed(args.layer)
        return {  # Qwen2's init: normal(0, 0.02), stored in bf16
            name: (torch.randn(*shape, generator=gen) * 0.02).bfloat16().float().to(args.device)
            for name, shape in QWEN7B_SHAPES.items()
        }
    from peft_geora_apps.default_model import load_default_model

    model, _ = load_default_model(args.model)
    layer = model.model.layers[args.layer]
    modules = {**dict(layer.self_attn.named_children()), **dict(layer.mlp.named_children())}
    return {name: modules[name].weight.detach().float().to(args.device) for name in QWEN7B_SHAPES}


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` synchronised runs, after one warm-up run."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def exact_energy(matrix: torch.Tensor, r: int) -> float:
    """Sum of the top-r squared singular values, from a float64 Gram eigensolve of the short side."""
    a = matrix.double()
    rows = a.T if a.shape[0] >= a.shape[1] else a
    return float(torch.linalg.eigvalsh(rows @ rows.T)[-r:].sum())


def matrix_row(w: torch.Tensor, args: argparse.Namespace) -> dict:
    """Stage timings and the block-size sweep for one matrix."""
    r, dev, rep = args.r, args.device, args.repeats
    k = quantile_rank(0.2, w.numel())
    mags = w.abs()
    _, w_geo = _prior_indicators(w, 0.2, r, "union", dict(seed=0))
    row = {
        "shape": list(w.shape),
        "total": timed(lambda: geora_decompose(w, r), dev, rep),
        "threshold": timed(lambda: kth_smallest(mags, k), dev, rep),
        "kthvalue_all": timed(lambda: torch.kthvalue(mags.reshape(-1), k), dev, rep),
        "sort_all": timed(lambda: mags.reshape(-1).sort(), dev, rep),
        "svd_W": timed(lambda: truncated_svd(w, r), dev, rep),
        "svd_Wgeo": timed(lambda: truncated_svd(w_geo, r), dev, rep),
        "pissa_svd_lowrank": timed(lambda: torch.svd_lowrank(w, q=r, niter=4), dev, rep),
    }
    if min(w.shape) > 256:  # the Gram path handles the rest exactly, no Krylov solve
        exact = exact_energy(w_geo, r)
        base = krylov_block(r)
        for block in args.blocks:
            solve = lambda b=block: krylov_svd(w_geo, r, oversample=b - base)  # noqa: E731
            s = krylov_svd(w_geo, r, oversample=block - base)[1].double()
            row[f"krylov_b{block}"] = timed(solve, dev, rep)
            row[f"krylov_b{block}_energy"] = float(s.square().sum()) / exact
        default_growth = functional.CHECK_GROWTH.get(dev)
        for growth in args.check_growths:  # the default solve with convergence checks more or less often
            functional.CHECK_GROWTH[dev] = growth
            row[f"krylov_growth{growth:g}"] = timed(lambda: krylov_svd(w_geo, r), dev, rep)
            s = krylov_svd(w_geo, r)[1].double()
            row[f"krylov_growth{growth:g}_energy"] = float(s.square().sum()) / exact
        if default_growth is None:
            functional.CHECK_GROWTH.pop(dev, None)
        else:
            functional.CHECK_GROWTH[dev] = default_growth
        short = min(w.shape)
        fwd = w.T if w.shape[0] >= w.shape[1] else w
        for block in args.blocks:
            x = torch.randn(block, short, device=dev)
            row[f"step_b{block}"] = timed(lambda x=x: (x @ fwd) @ fwd.T, dev, rep)
            y = torch.randn(short, block, device=dev)
            row[f"qr_b{block}"] = timed(lambda y=y: torch.linalg.qr(y), dev, rep)
    return row


def profile_solve(matrix: torch.Tensor, r: int, rows: int) -> dict:
    """Per op of one default ``krylov_svd`` (after a warm-up solve): calls, self host ms and self device ms."""
    from torch.profiler import ProfilerActivity, profile

    cuda = matrix.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    krylov_svd(matrix, r)
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        krylov_svd(matrix, r)
        if cuda:
            torch.cuda.synchronize()
    ops = {
        event.key: {
            "calls": event.count,
            "host_ms": event.self_cpu_time_total / 1e3,
            "device_ms": getattr(event, "self_device_time_total", 0.0) / 1e3,
        }
        for event in prof.key_averages()
    }
    top = sorted(ops.items(), key=lambda kv: kv[1]["host_ms"] + kv[1]["device_ms"], reverse=True)[:rows]
    table = [["op", "calls", "self host ms", "self device ms"]]
    table += [[k, str(v["calls"]), f"{v['host_ms']:.2f}", f"{v['device_ms']:.2f}"] for k, v in top]
    print(format_table(table), "\n")
    return {"profiled_seconds": time.perf_counter() - start, "ops": ops}


def eigh_row(n: int, device: str, repeats: int) -> dict:
    """Seconds of the dense symmetric eigensolves the Krylov solver runs at projected size ``n``."""
    a = torch.randn(n, n)
    sym = a @ a.T
    row = {"n": n}
    row["cpu_eigvalsh"] = timed(lambda: torch.linalg.eigvalsh(sym), "cpu", repeats)
    row["cpu_eigh"] = timed(lambda: torch.linalg.eigh(sym), "cpu", repeats)
    if device == "cuda":
        dev_sym = sym.cuda()
        row["cuda_eigvalsh"] = timed(lambda: torch.linalg.eigvalsh(dev_sym), device, repeats)
        row["cuda_eigh"] = timed(lambda: torch.linalg.eigh(dev_sym), device, repeats)
        row["to_cpu_eigvalsh"] = timed(lambda: torch.linalg.eigvalsh(dev_sym.cpu()), device, repeats)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser, shape_help="a random bf16 layer of this shape")
    parser.add_argument("--layer", type=int, default=0, help="SmolLM2 layer index (7B shape: the random seed)")
    parser.add_argument("--matrices", default=",".join(QWEN7B_SHAPES), help="comma-separated projection names")
    parser.add_argument("--blocks", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--check-growths", type=float, nargs="*", default=[], help="CHECK_GROWTH values to sweep")
    parser.add_argument("--eigh-sizes", type=int, nargs="+", default=[64, 128, 256, 384, 512, 768])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", nargs="*", default=[], help="profile one W_geo Krylov solve of these matrices")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    weights = layer_matrices(args)
    rows = {name: matrix_row(weights[name], args) for name in args.matrices.split(",")}
    eighs = [eigh_row(n, args.device, args.repeats) for n in args.eigh_sizes]

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1e3 * value:.2f}"

    stage_keys = ["total", "threshold", "kthvalue_all", "sort_all", "svd_W", "svd_Wgeo", "pissa_svd_lowrank"]
    table = [["matrix (ms)", "shape", *stage_keys]]
    for name, row in rows.items():
        table.append([name, "x".join(map(str, row["shape"])), *(ms(row[key]) for key in stage_keys)])
    print(format_table(table), "\n")
    sweep = [["Krylov on W_geo", *(f"b{b} ms / energy" for b in args.blocks), *(f"step b{b}" for b in args.blocks)]]
    for name, row in rows.items():
        if f"krylov_b{args.blocks[0]}" in row:
            cells = [f"{ms(row[f'krylov_b{b}'])} / {row[f'krylov_b{b}_energy']:.5f}" for b in args.blocks]
            sweep.append([name, *cells, *(ms(row[f"step_b{b}"]) for b in args.blocks)])
    print(format_table(sweep), "\n")
    if args.check_growths:
        growths = args.check_growths
        cadence = [["checks spaced by", *(f"x{g:g} ms / energy" for g in growths)]]
        for name, row in rows.items():
            if f"krylov_growth{growths[0]:g}" in row:
                keys = [f"krylov_growth{g:g}" for g in growths]
                cadence.append([name, *(f"{ms(row[key])} / {row[key + '_energy']:.5f}" for key in keys)])
        print(format_table(cadence), "\n")
    profiles = {}
    for name in args.profile:
        _, w_geo = _prior_indicators(weights[name], 0.2, args.r, "union", dict(seed=0))
        print(f"profile of one Krylov solve of {name}'s W_geo:")
        profiles[name] = profile_solve(w_geo, args.r, rows=15)
    keys = [key for key in eighs[0] if key != "n"]
    print(format_table([["eigensolve (ms)", *keys]] + [[str(e["n"]), *(ms(e[key]) for key in keys)] for e in eighs]))
    if args.out:
        info = machine_info(load_before, os.getloadavg(), args.device)
        result = {"args": vars(args), "machine": info, "matrices": rows, "eigensolves": eighs, "profiles": profiles}
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
