"""How many block-Krylov steps GeoRA's two SVDs need, against a hindsight-perfect stop and PiSSA's sketch.

For ``W`` and ``W_geo`` of every target matrix that the Krylov solver handles (``min(shape) > GRAM_LIMIT``) in the
chosen ``--layers`` (SmolLM2, or random bf16 Qwen2.5-7B-shaped layers with ``--shape``), this records the captured
top-r energy after each Krylov step (``krylov_svd(tol=0, niter=s)``, which runs exactly ``s`` steps) against the
exact top-r energy (float64 Gram eigensolve), and reports per matrix:

* ``steps``: the steps the default solver takes (its stopping rule, ``KRYLOV_TOL``; identified by the FLOPs of its
  products, which equal those of the fixed-step solve with as many steps) and the error it leaves, ``1 - captured``;
* ``oracle``: the fewest steps whose error is at most ``--target`` (default 1e-3: the 0.999 quality target), which
  only hindsight knows: no stopping rule can stop earlier and meet the target;
* the matrix-vector products each costs: ``2 * block * (steps + 1)`` for the solver, ``(2 + 2 * niter) * r`` for
  PiSSA's ``torch.svd_lowrank(W, q=r, niter=4)``.

The totals bound what any stopping rule could save, and how far an accurate GeoRA init is from PiSSA's cost: GeoRA
needs two such SVDs per weight (``W`` for the spectral prior, ``W_geo`` for the factors), PiSSA one sketch.

Smaller blocks need fewer products but run them at a lower rate (narrower matrix products). ``--blocks B [B ...]``
finds the hindsight stop for other block sizes too (the fewest steps reaching ``--target``, by bisection: the Krylov
spaces of one start block are nested, so the captured energy only grows with the steps), times the two products of
each matrix with one block of each size, and times PiSSA's ``torch.svd_lowrank`` on each weight: the products alone
at the hindsight stop, with no checks, no QR, no thresholds, against PiSSA's whole sketch, bound from below what
any stopping rule and any overhead cut could give at each block size.

Examples::

    python benchmarks/krylov_convergence.py --threads 1 --out benchmarks/results/krylov_convergence_smollm2.json
    python benchmarks/krylov_convergence.py --threads 1 --blocks 1 2 4 8 16 --out blocks.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose_stages import QWEN7B_SHAPES, exact_energy, layer_matrices, timed  # noqa: E402
from init_speed import common_arguments, format_table, machine_info  # noqa: E402

from peft_geora.functional import GRAM_LIMIT, krylov_block, krylov_svd  # noqa: E402
from peft_geora.functional.decomposition import _prior_indicators  # noqa: E402

PISSA_NITER = 4


def solve(matrix: torch.Tensor, r: int, exact: float, **kwargs) -> tuple[float, int]:
    """Captured top-r energy of ``krylov_svd(matrix, r, **kwargs)`` relative to ``exact``, and the FLOPs of its
    matrix products (``torch.utils.flop_counter``; they grow with every step, so they identify the step count)."""
    with FlopCounterMode(display=False) as counter:
        values = krylov_svd(matrix, r, **kwargs)[1]
    return float(values.double().square().sum()) / exact, counter.get_total_flops()


def convergence_row(matrix: torch.Tensor, r: int, target: float) -> dict:
    """Steps of the default solve and of the hindsight-perfect stop for one matrix, and their products."""
    exact = exact_energy(matrix, r)
    default, default_flops = solve(matrix, r, exact)
    trajectory, flops, oracle = [], [], None
    block = krylov_block(r)
    cap = min(matrix.shape) // block - 1
    for steps in range(1, cap + 1):
        energy, step_flops = solve(matrix, r, exact, niter=steps, tol=0.0)
        trajectory.append(energy)
        flops.append(step_flops)
        if oracle is None and 1.0 - energy <= target:
            oracle = steps
        if oracle is not None and step_flops >= default_flops:
            break
    # the default solve runs the same products as the fixed-step solve that stopped where it did
    if default_flops not in flops:
        raise RuntimeError(f"no fixed-step solve of a {tuple(matrix.shape)} matrix matches the default one")
    taken = 1 + flops.index(default_flops)
    return {
        "shape": list(matrix.shape),
        "exact_energy": exact,
        "steps": taken,
        "error": 1.0 - default,
        "oracle": oracle,
        "oracle_error": None if oracle is None else 1.0 - trajectory[oracle - 1],
        "products": 2 * block * (taken + 1),
        "oracle_products": None if oracle is None else 2 * block * (oracle + 1),
        "trajectory_error": [1.0 - e for e in trajectory],
    }


def hindsight_steps(matrix: torch.Tensor, r: int, exact: float, block: int, target: float) -> int:
    """The fewest Krylov steps with blocks of ``block`` whose error is at most ``target``, by bisection."""

    def error(steps: int) -> float:
        values = krylov_svd(matrix, r, niter=steps, tol=0.0, block=block)[1]
        return 1.0 - float(values.double().square().sum()) / exact

    lo, hi = math.ceil(r / block), min(matrix.shape) // block - 1  # the solver's own bounds on the steps
    cap = hi
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if error(mid) <= target else (mid + 1, hi)
    if lo == cap and error(cap) > target:  # never tested: the cap's space need not span the whole short side
        raise RuntimeError(f"blocks of {block} never reach error {target} on a {tuple(matrix.shape)} matrix")
    return lo


def block_rows(matrix: torch.Tensor, r: int, exact: float, args: argparse.Namespace) -> dict:
    """Per block size: hindsight steps and products, and the seconds of one product with one vector of a block."""
    m, n = matrix.shape
    fwd, back = (matrix.T, matrix) if m >= n else (matrix, matrix.T)
    rows = {}
    for block in args.blocks:
        steps = hindsight_steps(matrix, r, exact, block, args.target)
        x = torch.randn(block, min(m, n), device=matrix.device)
        seconds = timed(partial(torch.linalg.multi_dot, [x, fwd, back]), args.device, args.repeats) / (2 * block)
        products = 2 * block * (steps + 1)
        rows[block] = {"steps": steps, "products": products, "seconds_per_product": seconds}
    return rows


def block_summary(rows: list[dict], blocks: list[int]) -> dict:
    """Per block size, over all weights: products and products-only seconds at the hindsight stop (both SVDs),
    against PiSSA's ``svd_lowrank`` seconds on the same weights."""
    pissa = sum(row["pissa_seconds"] for row in rows if row["matrix"] == "W")
    weights = sum(row["matrix"] == "W" for row in rows)
    summary = {}
    for block in blocks:
        per = [row["blocks"][block] for row in rows]
        seconds = sum(b["products"] * b["seconds_per_product"] for b in per)
        summary[block] = {
            "products_per_weight": sum(b["products"] for b in per) / weights,
            "product_seconds": seconds,
            "pissa_seconds": pissa,
            "over_pissa": seconds / pissa,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29", help="comma-separated layer indices (7B: seeds)")
    parser.add_argument("--matrices", default=",".join(QWEN7B_SHAPES), help="comma-separated projection names")
    parser.add_argument("--target", type=float, default=1e-3, help="error the oracle stop must reach")
    parser.add_argument("--blocks", type=int, nargs="*", default=[], help="block sizes for the time floor")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per product and PiSSA sketch (median)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows, r = [], args.r
    for layer in [int(i) for i in args.layers.split(",")]:
        args.layer = layer
        weights = layer_matrices(args)
        for name in args.matrices.split(","):
            w = weights[name]
            if min(w.shape) <= GRAM_LIMIT:
                continue
            _, w_geo = _prior_indicators(w, 0.2, r, "union", dict(seed=0))
            for which, matrix in (("W", w), ("W_geo", w_geo)):
                rows.append(dict(convergence_row(matrix, r, args.target), layer=layer, name=name, matrix=which))
                last = rows[-1]
                if args.blocks:
                    last["blocks"] = block_rows(matrix, r, last["exact_energy"], args)
                    if which == "W":
                        sketch = partial(torch.svd_lowrank, matrix, q=r, niter=PISSA_NITER)
                        last["pissa_seconds"] = timed(sketch, args.device, args.repeats)
                print(
                    f"layer {layer} {name} {which}: {last['steps']} steps (error {last['error']:.1e}), "
                    f"oracle {last['oracle']}",
                    flush=True,
                )
    pissa = (2 + 2 * PISSA_NITER) * r
    summary = {}
    for which in ("W", "W_geo"):
        part = [row for row in rows if row["matrix"] == which]
        summary[which] = {
            "matrices": len(part),
            "max_error": max(row["error"] for row in part),
            "products_per_matrix": sum(row["products"] for row in part) / len(part),
            "oracle_products_per_matrix": sum(row["oracle_products"] or row["products"] for row in part) / len(part),
            "oracle_reached": sum(row["oracle"] is not None for row in part),
        }
    table = [["matrix", "solves", "max error", "products / solve", "oracle products", "x PiSSA sketch", "oracle x"]]
    for which, s in summary.items():
        table.append(
            [
                which,
                str(s["matrices"]),
                f"{s['max_error']:.1e}",
                f"{s['products_per_matrix']:.0f}",
                f"{s['oracle_products_per_matrix']:.0f}",
                f"{s['products_per_matrix'] / pissa:.2f}",
                f"{s['oracle_products_per_matrix'] / pissa:.2f}",
            ]
        )
    both = summary["W"]["products_per_matrix"] + summary["W_geo"]["products_per_matrix"]
    both_oracle = summary["W"]["oracle_products_per_matrix"] + summary["W_geo"]["oracle_products_per_matrix"]
    print()
    print(format_table(table))
    print(
        f"\nper weight (W and W_geo): {both:.0f} products, {both_oracle:.0f} with the oracle stop at error "
        f"<= {args.target:g}; PiSSA's sketch: {pissa} ({both / pissa:.2f}x, oracle {both_oracle / pissa:.2f}x)"
    )
    blocks = block_summary(rows, args.blocks) if args.blocks else {}
    if blocks:
        table = [["block", "hindsight products / weight", "their seconds", "PiSSA sketch seconds", "x PiSSA"]]
        for block, b in blocks.items():
            table.append(
                [
                    str(block),
                    f"{b['products_per_weight']:.0f}",
                    f"{b['product_seconds']:.3f}",
                    f"{b['pissa_seconds']:.3f}",
                    f"{b['over_pissa']:.2f}",
                ]
            )
        print("\nproducts alone at the hindsight stop (both SVDs), against PiSSA's whole svd_lowrank:")
        print(format_table(table))
    if args.out:
        result = {
            "args": vars(args),
            "machine": machine_info(load_before, os.getloadavg(), args.device),
            "pissa_products": pissa,
            "summary": summary,
            "per_weight": {"products": both, "oracle_products": both_oracle},
            "blocks": blocks,
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
