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

Example::

    python benchmarks/krylov_convergence.py --threads 1 --out benchmarks/results/krylov_convergence_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decompose_stages import QWEN7B_SHAPES, exact_energy, layer_matrices  # noqa: E402
from init_speed import common_arguments, format_table, machine_info  # noqa: E402

from peft_geora.functional import GRAM_LIMIT, _prior_indicators, krylov_block, krylov_svd  # noqa: E402

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
        "steps": taken,
        "error": 1.0 - default,
        "oracle": oracle,
        "oracle_error": None if oracle is None else 1.0 - trajectory[oracle - 1],
        "products": 2 * block * (taken + 1),
        "oracle_products": None if oracle is None else 2 * block * (oracle + 1),
        "trajectory_error": [1.0 - e for e in trajectory],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29", help="comma-separated layer indices (7B: seeds)")
    parser.add_argument("--matrices", default=",".join(QWEN7B_SHAPES), help="comma-separated projection names")
    parser.add_argument("--target", type=float, default=1e-3, help="error the oracle stop must reach")
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
    if args.out:
        result = {
            "args": vars(args),
            "machine": machine_info(load_before, os.getloadavg(), args.device),
            "pissa_products": pissa,
            "summary": summary,
            "per_weight": {"products": both, "oracle_products": both_oracle},
            "rows": rows,
        }
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
