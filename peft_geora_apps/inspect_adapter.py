"""``peft-geora inspect ADAPTER_DIR``: where a saved GeoRA or LoRA adapter moved each weight, without building a model.

Reads ``adapter_config.json`` and ``adapter_model.safetensors`` directly, rebuilds every layer's update ``dW``
(GeoRA, keys ``lora_A.delta/anchor``: ``s ((B0 + dB) dA + dB A0)``; LoRA, keys ``lora_A.weight``: ``s B A``),
reads only the matching weights ``W`` from the base folder's safetensors, and reports per layer ``||dW||_F``, S_head
and the normalised spectral shift (definitions in :mod:`peft_geora.diagnostics`),
as a table and optionally a PNG heatmap.

Stacked mixture-of-experts parameters (the config's ``parameter_targets``: module path -> [parameter, E]) are analysed
expert by expert: ``W_e`` is read from the base tensor ``<module path>.<parameter>`` (gpt-oss-style (E, in, out)
storage transposed to (E, out, in)), ``dW_e = s ((B0_e + dB_e) dA_e + dB_e A0_e)`` from PEFT's stacked layout. Each
expert gets a row ``<parameter>[e]``; the row ``<parameter>`` holds their mean and counts once in the type means.
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

from peft_geora.diagnostics.metrics import DEFAULT_TOP_K, EXACT_LIMIT, mean_rows, update_diagnostics
from peft_geora.diagnostics.report import layer_type
from peft_geora.format.checkpoint import (
    PEFT_PREFIX,
    geora_tensors_by_module,
    parameter_key,
    read_tensors,
    split_key,
    weights_file,
)
from peft_geora.tuner.config import lora_scaling, pattern_value

logger = logging.getLogger(__name__)

# LoRA initialisations that rewrite the base weights: an unconverted adapter was trained on that residual base
_BASE_MUTATING_INITS = ("pissa", "olora", "corda", "loftq")
_TITLES = {"s_head": "S_head (energy share on W's top-k)", "spectral_shift": "spectral shift (NSS)"}
_PROJECTION_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
EXPERTS_SHOWN = 8  # per stacked-experts parameter in the printed table (the JSON holds every expert)
# transformers models whose square expert matrices are stored (E, in, out) (``use_experts_implementation``'s
# ``is_transposed=True``): only needed when out == in, where the shapes cannot tell the two storages apart
_TRANSPOSED_EXPERTS = ("gpt_oss", "aria", "openai_privacy_filter")


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
    """``(dW, r)`` of one module, ``dW`` (out x in) with PEFT's scaling (rank/alpha patterns, rsLoRA): a single
    "expert" of :func:`expert_delta`."""
    delta, rank = expert_delta(config, module_key, tensors, 1)
    return delta[0], rank


def expert_delta(
    config: dict[str, Any], parameter: str, tensors: dict[str, torch.Tensor], experts: int
) -> tuple[torch.Tensor, int]:
    """``(dW, r)`` of a stacked-experts parameter: ``dW`` (E x out x in), ``r`` per expert, with PEFT's scaling (the
    rank / alpha patterns resolve by ``parameter``, the name PEFT gives a ``ParamWrapper``'s key).

    The factors are in PEFT's layout: ``A`` (E r x in) with expert e's rows e r .. e r + r - 1, ``B`` (out x r E)
    with column j E + e."""
    geora = "A_delta" in tensors
    a_like = tensors["A_delta" if geora else "A_weight"]
    rank = a_like.shape[0] // experts
    r = pattern_value(config.get("rank_pattern") or {}, parameter, config.get("r") or rank)
    alpha = pattern_value(config.get("alpha_pattern") or {}, parameter, config.get("lora_alpha") or r)
    scaling = lora_scaling(r, alpha, bool(config.get("use_rslora")))

    def per_expert_a(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(experts, rank, t.shape[-1])  # (E, r, in)

    def per_expert_b(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], rank, experts).permute(2, 0, 1)  # (E, out, r)

    if geora:
        da, a0 = (per_expert_a(tensors[k]) for k in ("A_delta", "A_anchor"))
        db, b0 = (per_expert_b(tensors[k]) for k in ("B_delta", "B_anchor"))
        return ((b0 + db) @ da + db @ a0) * scaling, rank
    return per_expert_b(tensors["B_weight"]) @ per_expert_a(tensors["A_weight"]) * scaling, rank


def experts_as_out_in(
    stored: torch.Tensor, out_features: int, in_features: int, model_type: str | None, name: str
) -> tuple[torch.Tensor, str | None]:
    """A base expert tensor as (E, out, in): Qwen3-MoE / Mixtral store (E, out, in), gpt-oss (E, in, out). Decided
    from the shapes (the factors give out and in); for square experts, where they cannot tell, by the base model's
    ``model_type`` (returned note says so)."""
    if stored.dim() != 3:
        raise ValueError(f"'{name}': expected a 3-D stacked-experts tensor, got shape {tuple(stored.shape)}")
    dims = tuple(stored.shape[1:])
    if out_features != in_features:
        if dims == (out_features, in_features):
            return stored, None
        if dims == (in_features, out_features):
            return stored.transpose(1, 2), None
        raise ValueError(
            f"'{name}': base tensor {tuple(stored.shape)} does not fit factors of {out_features} x {in_features}"
        )
    if dims != (out_features, in_features):
        raise ValueError(f"'{name}': base tensor {tuple(stored.shape)} does not fit {out_features} x {in_features}")
    transposed = model_type in _TRANSPOSED_EXPERTS
    note = (
        f"'{name}': square experts ({out_features} x {in_features}), storage taken as "
        f"{'(E, in, out)' if transposed else '(E, out, in)'} from the base model_type {model_type!r}"
    )
    return (stored.transpose(1, 2) if transposed else stored), note


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


def _read(index: dict[str, Path], name: str, renames: list[tuple[str, str]] = ()) -> torch.Tensor | None:
    """The tensor ``name`` (also without / with a leading ``model.``, or under a checkpoint name of ``renames``)."""
    names = [name, *(name.replace(new, old, 1) for new, old in renames if new in name)]
    candidates = [c for n in names for c in (n, n.partition(".")[2], f"model.{n}")]
    key = next((c for c in candidates if c in index), None)
    if key is None:
        return None
    with safe_open(str(index[key]), framework="pt") as fh:
        return fh.get_tensor(key).float()


def _literal(pattern: str) -> str | None:
    """``pattern`` as a plain string if it is one (dots escaped or not), else None."""
    plain = pattern.replace("\\.", ".")
    return plain if re.fullmatch(r"[\w.]*", plain) else None


def _conversions(model_type: str | None) -> tuple[list[Any], list[tuple[str, str]]]:
    """transformers' checkpoint conversion rules of ``model_type`` and its plain-string renamings as (model's name,
    checkpoint's name) pairs (Mixtral: ``.mlp.`` is ``.block_sparse_moe.`` on disk)."""
    if not model_type:
        return [], []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    mapping = list(get_checkpoint_conversion_mapping(model_type) or [])
    renames = []
    for rule in mapping:
        if isinstance(rule, WeightRenaming) and len(rule.source_patterns) == len(rule.target_patterns) == 1:
            source, target = _literal(rule.source_patterns[0]), _literal(rule.target_patterns[0])
            if source and target:
                renames.append((target, source))
    return mapping, renames


def _stacked_from_per_expert(
    index: dict[str, Path], name: str, mapping: list[Any], renames: list[tuple[str, str]]
) -> torch.Tensor | None:
    """A stacked-experts tensor (``...experts.gate_up_proj``) of a checkpoint saved per expert, rebuilt with the
    conversion transformers applies when loading it (``conversion_mapping``: stack the experts, concatenate e.g. gate
    and up); None if the model type has no such conversion for ``name``. Only stacking and concatenation are
    rebuilt, and renamings that are plain strings."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter

    for rule in mapping:
        if not isinstance(rule, WeightConverter):
            continue
        ops = list(rule.operations)
        simple = bool(ops) and type(ops[0]) is MergeModulelist and ops[0].dim == 0
        simple = simple and len(ops) <= 2 and all(type(op) is Concatenate for op in ops[1:])
        for target in rule.target_patterns:
            if not simple or _literal(target) is None or not name.endswith(_literal(target)):
                continue
            prefix = name[: -len(_literal(target))]
            parts = []
            for source in rule.source_patterns:
                experts: list[torch.Tensor] = []
                while (t := _read(index, prefix + source.replace("*", str(len(experts))), renames)) is not None:
                    experts.append(t)
                parts.append(torch.stack(experts) if experts else None)
            if parts and all(p is not None for p in parts):
                return torch.cat(parts, dim=ops[1].dim) if len(ops) > 1 else parts[0]
    return None


def load_base_weights(
    folder: str | Path, module_keys: list[str], tensor_names: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Only the ``<module>.weight`` tensors of ``module_keys`` from a transformers safetensors folder (for a module in
    ``tensor_names``, the tensor of that name instead: an adapted parameter such as ``...experts.gate_up_proj``,
    rebuilt from per-expert tensors when the checkpoint stores its experts one by one, as transformers saves
    Qwen3-MoE and Mixtral)."""
    index = _weight_index(Path(folder))
    mapping, renames = _conversions(_model_type(Path(folder)) if tensor_names else None)
    found: dict[str, torch.Tensor] = {}
    for module in module_keys:
        name = (tensor_names or {}).get(module, f"{module}.weight")
        tensor = _read(index, name, renames)
        if tensor is None and module in (tensor_names or {}):
            tensor = _stacked_from_per_expert(index, name, mapping, renames)
        if tensor is None:
            raise KeyError(f"the base model in {folder} has no weight for adapted module '{module}' ({name})")
        found[module] = tensor
    return found


def _model_type(folder: Path) -> str | None:
    config = folder / "config.json"
    return json.loads(config.read_text()).get("model_type") if config.exists() else None


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
    tensor_names = {key: parameter_key(key, targets[key][0]) for key in modules if key in targets}
    weights = load_base_weights(folder, sorted(modules), tensor_names)
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    model_type = _model_type(folder)
    rows, stacked = [], 0
    for key in sorted(modules, key=_natural_key):
        kind = "geora" if "A_delta" in modules[key] else "lora"
        experts = int(targets[key][1]) if key in targets else 1
        if experts > 1:
            rows += _expert_rows(config, key, targets[key][0], modules[key], experts, weights[key], model_type, notes,
                                 kind=kind, top_k=top_k, exact_limit=exact_limit)  # fmt: skip
            stacked += 1
            continue
        delta, rank = module_delta(config, key, modules[key])
        weight = weights[key].T if fan_in_fan_out and key not in targets else weights[key]
        if weight.shape != delta.shape and weight.T.shape == delta.shape:  # a Conv1D among Linear layers
            weight = weight.T
        if weight.shape != delta.shape:
            raise ValueError(f"'{key}': base weight {tuple(weight.shape)} does not fit dW {tuple(delta.shape)}")
        delta_rank = 2 * rank if kind == "geora" else rank
        stats = update_diagnostics(weight, delta, top_k or rank, exact_limit=exact_limit, delta_rank=delta_rank)
        rows.append({"module": key, "kind": kind, "shape": tuple(delta.shape), "r": rank, **stats})
    if stacked:
        notes.append(
            f"{stacked} parameters of stacked experts analysed expert by expert: rows '<parameter>[e]' per expert, "
            "'<parameter>' their mean (counted once in the type means); the table shows at most "
            f"{EXPERTS_SHOWN} experts per parameter, --json holds all"
        )
    return rows, notes


def _expert_rows(
    config: dict[str, Any],
    key: str,
    parameter: str,
    tensors: dict[str, torch.Tensor],
    experts: int,
    stored: torch.Tensor,
    model_type: str | None,
    notes: list[str],
    *,
    kind: str,
    top_k: int | None,
    exact_limit: int,
) -> list[dict[str, Any]]:
    """The mean row of a stacked-experts parameter, then one row per expert (``update_diagnostics`` on W_e, dW_e)."""
    delta, rank = expert_delta(config, parameter, tensors, experts)
    weight, note = experts_as_out_in(stored, delta.shape[1], delta.shape[2], model_type, parameter)
    if note:
        notes.append(note)
    if weight.shape != delta.shape:
        raise ValueError(f"'{parameter}': base tensor {tuple(weight.shape)} does not fit dW {tuple(delta.shape)}")
    delta_rank = 2 * rank if kind == "geora" else rank
    per_expert = []
    for e in range(experts):
        stats = update_diagnostics(weight[e], delta[e], top_k or rank, exact_limit=exact_limit, delta_rank=delta_rank)
        shape = tuple(delta.shape[1:])
        per_expert.append(
            {"module": f"{parameter}[{e}]", "kind": kind, "shape": shape, "r": rank, "expert": e, **stats}
        )
    metrics = mean_rows([{k: v for k, v in row.items() if isinstance(v, float)} for row in per_expert])
    mean = {"module": parameter, "kind": kind, "shape": tuple(delta.shape), "r": rank, "experts": experts, **metrics}
    return [mean, *per_expert]


def _is_expert_row(row: dict[str, Any]) -> bool:
    return "expert" in row


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _type_order(name: str) -> tuple[int, str]:
    last = name.rsplit(".", 1)[-1]
    return (_PROJECTION_ORDER.index(last) if last in _PROJECTION_ORDER else len(_PROJECTION_ORDER), name)


def format_rows(rows: list[dict[str, Any]], experts_shown: int | None = None) -> str:
    """Fixed-width per-layer table plus per-layer-type means (at most ``experts_shown`` expert rows per stacked
    parameter; the type means count each parameter once, by its mean over experts)."""
    headers = ("module", "kind", "shape", "r", "||dW||_F", "rel_norm", "S_head", "shift", "angle_rad")
    table = [headers]
    experts_shown = EXPERTS_SHOWN if experts_shown is None else experts_shown
    shown = [row for row in rows if not _is_expert_row(row) or row["expert"] < experts_shown]
    for row in shown:
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
        if not _is_expert_row(row):
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
    lines.insert(len(shown) + 2, "-" * len(lines[0]))
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

    rows = [r for r in rows if not _is_expert_row(r)]  # a stacked-experts parameter: its mean over experts

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
