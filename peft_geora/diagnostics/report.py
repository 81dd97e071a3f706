"""Initialisation report: what GeoRA's masks and decomposition did, per layer type, and how long it took."""

from __future__ import annotations

import re
from collections import defaultdict
from statistics import mean

REPORT_KEYS = (
    "spectral_coverage",
    "euclidean_coverage",
    "union_coverage",
    "overlap",
    "jaccard",
    "masked_energy",
    "captured_energy",
    "singular_spread",
    "seconds",
)


def layer_type(module_name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the name with its layer index removed)."""
    parts = re.split(r"\.\d+\.", module_name)
    return parts[-1] if len(parts) > 1 else module_name


def summarize(per_module: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Average every statistic over modules of the same type (``seconds`` is summed); adds an ``all`` row."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for name, stats in per_module.items():
        groups[layer_type(name)].append(stats)
        groups["all"].append(stats)
    table = {}
    for group, rows in groups.items():
        entry = {key: mean(row[key] for row in rows) for key in REPORT_KEYS if key != "seconds"}
        entry["seconds"] = sum(row["seconds"] for row in rows)
        entry["modules"] = len(rows)
        table[group] = entry
    return table


def format_table(table: dict[str, dict[str, float]]) -> str:
    """A fixed-width text table of :func:`summarize`'s output."""
    headers = ("layer type", "n", "M_spec", "M_euc", "union", "overlap", "jaccard", "E(W_geo)", "captured")
    headers += ("S1/mean S", "time s")
    rows = [headers]
    for group in sorted(table, key=lambda g: (g == "all", g)):
        e = table[group]
        rows.append(
            (
                group,
                str(e["modules"]),
                *(
                    f"{e[k]:.3f}"
                    for k in REPORT_KEYS
                    if k != "seconds"  # printed last, as a time
                ),
                f"{e['seconds']:.2f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
