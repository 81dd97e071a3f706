"""``peft-geora inspect ADAPTER_DIR``: where a saved GeoRA or LoRA adapter moved each weight, without building a model.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` directly, rebuilds every layer's update ``dW``
(GeoRA, keys ``lora_A.delta/anchor``: ``s ((B0 + dB) dA + dB A0)``; LoRA, keys ``lora_A.weight``: ``s B A``),
reads only the matching weights ``W`` from the base folder's safetensors, and reports per layer ``||dW||_F``, S_head
and the normalised spectral shift (definitions in :mod:`peft_geora.diagnostics`),
as a table and optionally a PNG heatmap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .checkpoint import GEORA_PARTS, PEFT_PREFIX, geora_tensors_by_module, read_tensors, split_key, weights_file
from .config import lora_scaling, pattern_value
from .diagnostics import DEFAULT_TOP_K, EXACT_LIMIT, update_diagnostics
from .report import layer_type

logger = logging.getLogger(__name__)

# LoRA initialisations that rewrite the base weights: an unconverted adapter was trained on that residual base
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")
_TITLES = {"s_head": "S_head (energy share on W's top-k)", "spectral_shift": "spectral shift (NSS)"}
_PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def load_adapter(adapter_dir: str | Path) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """The adapter's config and, per module key (``model.layers.0.self_attn.q_proj``), its factor tensors."""
    folder = Path(adapter_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = weights_file(folder)
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    tensors = {key: value.float() for key, value in read_tensors(weights).items() if split_key(key) is not None}
    geora, lora = geora_tensors_by_module(tensors, weights)
    for key, value in lora.items():
        module, side, kind = split_key(key)
        modules[module.removeprefix(PEFT_PREFIX)][f"{side}_{kind}"] = value
    modules.update({module.removeprefix(PEFT_PREFIX): parts for module, parts in geora.items()})
    return config, dict(modules)


def module_delta(
    config: dict[str, Any], module_key: str, tensors: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """``(dW, r)`` of one module, ``dW`` (out x in) with PEFT's scaling (rank/alpha patterns, rsLoRA)."""
    geora = "A_delta" in tensors
    rank = tensors["A_delta" if geora else "A_weight"].shape[0]
    r = pattern_value(config.get("rank_pattern") or {}, module_key, config.get("r") or rank)
    alpha = pattern_value(config.get("alpha_pattern") or {}, module_key, config.get("lora_alpha") or r)
    scaling = lora_scaling(r, alpha, bool(config.get("use_rslora")))
    if geora:
        da, a0, db, b0 = (tensors[k] for k in GEORA_PARTS)
        return ((b0 + db) @ da + db @ a0) * scaling, rank
    return tensors["B_weight"] @ tensors["A_weight"] * scaling, rank


def resolve_base(config: dict[str, Any], base: str | Path | None) -> tuple[Path, str | None]:
    """Folder of the base weights (``--base``, else a local ``base_model_name_or_path``, else the built-in model)."""
    if base is not None:
        return Path(base), None
    named = config.get("base_model_name_or_path")
    if named and Path(named).is_dir():
        return Path(named), None
    from .default_model import default_model_path

    note = (
        f"base_model_name_or_path {named!r} is not a local folder: using the built-in default model "
        "(SmolLM2-135M-Instruct dequantized from Q4_1 GGUF, close to but not equal to the Hub weights); pass --base"
    )
    return default_model_path(), note


def _weight_index(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"no model.safetensors (or sharded index) in {folder}")
    with safe_open(str(single), framework="pt") as fh:
        return dict.fromkeys(fh.keys(), single)


def load_base_weights(folder: str | Path, module_keys: list[str]) -> dict[str, torch.Tensor]:
    """Only the ``<module>.weight`` tensors of ``module_keys`` from a transformers safetensors folder."""
    index = _weight_index(Path(folder))
    found: dict[str, torch.Tensor] = {}
    for module in module_keys:
        candidates = [f"{module}.weight", f"{module.partition('.')[2]}.weight", f"model.{module}.weight"]
        key = next((c for c in candidates if c in index), None)
        if key is None:
            raise KeyError(f"the base model in {folder} has no weight for adapted module '{module}'")
        with safe_open(str(index[key]), framework="pt") as fh:
            found[module] = fh.get_tensor(key).float()
    return found


def inspect_adapter(
    adapter_dir: str | Path,
    base: str | Path | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    exact_limit: int = EXACT_LIMIT,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-layer diagnostics rows of a saved adapter, and notes on how to read them.

    ``top_k``: W's directions for S_head and the angles (``None``: each module's adapter rank; a GeoRA adapter
    exported as LoRA has rank 2r, so keep a fixed k to compare formats, methods and ranks)."""
    config, modules = load_adapter(adapter_dir)
    if not modules:
        raise ValueError(f"{adapter_dir} holds no lora_A/lora_B tensors")
    folder, note = resolve_base(config, base)
    notes = [note] if note else []
    init = str(config.get("init_lora_weights"))
    if init.lower().startswith(_BASE_MUTATING_INITS):
        notes.append(
            f"init_lora_weights={init!r}: an adapter saved without PEFT's path_initial_model_for_weight_conversion "
            "was trained on the RESIDUAL base (W minus its initial product), so these numbers are relative to the "
            "base given here, not to the weights it was trained on"
        )
    if config.get("use_dora"):
        notes.append("DoRA magnitude vectors are ignored: dW is the low-rank part only")
    skipped = sorted(k for k, t in modules.items() if any(v.dim() != 2 for v in t.values()))
    if skipped:
        notes.append(f"skipped {len(skipped)} modules with non-matrix factors (convolutions): {', '.join(skipped)}")
        modules = {k: t for k, t in modules.items() if k not in skipped}
    targets = config.get("parameter_targets") or {}
    experts = sorted(k for k in modules if targets.get(k, (k, 1))[1] > 1)
    if experts:
        notes.append(
            f"skipped {len(experts)} modules of stacked experts (not analysed per expert): {', '.join(experts)}"
        )
        modules = {k: t for k, t in modules.items() if k not in experts}
    weights = load_base_weights(folder, sorted(modules))
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    rows = []
    for key in sorted(modules, key=_natural_key):
        delta, rank = module_delta(config, key, modules[key])
        weight = weights[key].T if fan_in_fan_out else weights[key]
        if weight.shape != delta.shape and weight.T.shape == delta.shape:  # a Conv1D among Linear layers
            weight = weight.T
        if weight.shape != delta.shape:
            raise ValueError(f"'{key}': base weight {tuple(weight.shape)} does not fit dW {tuple(delta.shape)}")
        kind = "geora" if "A_delta" in modules[key] else "lora"
        delta_rank = 2 * rank if kind == "geora" else rank
        stats = update_diagnostics(weight, delta, top_k or rank, exact_limit=exact_limit, delta_rank=delta_rank)
        rows.append({"module": key, "kind": kind, "shape": tuple(delta.shape), "r": rank, **stats})
    return rows, notes


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _type_order(name: str) -> tuple[int, str]:
    last = name.rsplit(".", 1)[-1]
    return (_PROJECTION_ORDER.index(last) if last in _PROJECTION_ORDER else len(_PROJECTION_ORDER), name)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """Fixed-width per-layer table plus per-layer-type means."""
    headers = ("module", "kind", "shape", "r", "||dW||_F", "rel_norm", "S_head", "shift", "angle_rad")
    table = [headers]
    for row in rows:
        table.append(
            (
                row["module"],
                row["kind"],
                "x".join(map(str, row["shape"])),
                str(row["r"]),
                *(f"{row[k]:.6g}" for k in ("delta_norm", "relative_norm", "s_head", "spectral_shift")),
                f"{row['principal_angle']:.4f}",
            )
        )
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[layer_type(row["module"])].append(row)
    for group, members in groups.items():
        means = {k: sum(m[k] for m in members) / len(members) for k in ("delta_norm", "relative_norm", "s_head")}
        shift = sum(m["spectral_shift"] for m in members) / len(members)
        angles = [m["principal_angle"] for m in members if not math.isnan(m["principal_angle"])]
        angle = f"{sum(angles) / len(angles):.4f}" if angles else "nan"
        cells = (f"{means['delta_norm']:.6g}", f"{means['relative_norm']:.6g}", f"{means['s_head']:.6g}")
        table.append((f"mean {group}", "", "", str(len(members)), *cells, f"{shift:.6g}", angle))
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(rows) + 2, "-" * len(lines[0]))
    return "\n".join(lines)


def require_matplotlib() -> None:
    """Raise ``ModuleNotFoundError`` saying what to install when matplotlib (for ``--png``) is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError(
            "peft-geora inspect --png draws with matplotlib, which is not installed: "
            "pip install 'peft-geora[demo]' (or pip install matplotlib)",
            name="matplotlib",
        )


def write_heatmap(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Two heatmaps (S_head, spectral shift), layers down, projection types across, with the Agg backend."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    types = sorted(dict.fromkeys(layer_type(r["module"]) for r in rows), key=_type_order)
    layers = list(dict.fromkeys(r["module"][: -len(layer_type(r["module"])) - 1] or "-" for r in rows))
    grids = {m: torch.full((len(layers), len(types)), float("nan")) for m in ("s_head", "spectral_shift")}
    for r in rows:
        t = layer_type(r["module"])
        i, j = layers.index(r["module"][: -len(t) - 1] or "-"), types.index(t)
        for metric, grid in grids.items():
            grid[i, j] = r[metric]
    fig = Figure(figsize=(4 + 1.2 * len(types), 1.5 + 0.3 * len(layers)), layout="constrained")
    FigureCanvasAgg(fig)
    labels = [re.sub(r"^.*?(\d+)$", r"\1", name) for name in layers]
    for ax, (metric, grid) in zip(fig.subplots(1, 2), grids.items()):
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_title(_TITLES[metric])
        ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), labels, fontsize=7)
        ax.set_ylabel("layer")
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(str(path), dpi=120)


def run(args: argparse.Namespace) -> int:
    """CLI entry: print the table (and notes), write ``--png`` / ``--json`` if asked."""
    if args.png:
        require_matplotlib()  # before the work, not after it
    rows, notes = inspect_adapter(args.adapter_dir, base=args.base, top_k=args.top_k)
    print(format_rows(rows))
    for note in notes:
        print(f"note: {note}")
    if args.png:
        write_heatmap(rows, args.png, title=str(args.adapter_dir))
        print(f"wrote {args.png}")
    if getattr(args, "json", None):
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0
