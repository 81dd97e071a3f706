"""Whole-model initialisation: GeoRA (fast default, exact) against PEFT's PiSSA (full SVD, ``niter_4``) and LoRA.

One run, one machine, one base model: every method gets a fresh deep copy of the base and is timed on
``get_peft_model`` (every targeted linear layer), interleaved over ``--repeats`` rounds (the slow full-SVD methods
run ``--slow-repeats`` times); medians and ratios are reported. Then, untimed:

* quality of the fast path, per layer: captured energy ``||B0 A0||_F^2 / ||top-r of W_geo||_F^2`` against the exact
  top-r of the *same* ``W_geo`` (float64 Gram eigensolve), mask agreement with the exact masks (float64 top-k of
  ``W``, exact thresholds), whether each threshold is exactly the k-th smallest magnitude (checked against a sort),
  and whether the factors held by the model are reproduced bitwise by a second decomposition;
* peak memory during init above the model: on CUDA ``max_memory_allocated``; on CPU a fresh subprocess per method
  whose RSS is sampled every millisecond, with glibc told to return large blocks at once (``mallopt``) so that RSS
  follows live memory. Reported in MB and in units of the largest target weight in fp32 ("matrices").

Examples::

    python benchmarks/init_speed.py --out init_speed.json                      # SmolLM2-135M on CPU, ~5 min
    python benchmarks/init_speed.py --device cuda --shape qwen2.5-7b --layers 2 --out init_7b.json
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from tqdm import tqdm

import peft_geora  # noqa: F401  (registers GeoRA with PEFT)
from peft_geora import GeoRAConfig
from peft_geora.functional import geora_decompose, kth_smallest, quantile_rank

logger = logging.getLogger("init_speed")

FAST_METHODS = ("lora", "pissa_niter_4", "geora")
SLOW_METHODS = ("geora_exact", "pissa")
DESCRIPTIONS = {
    "lora": "PEFT LoRA, default init",
    "pissa_niter_4": "PEFT PiSSA, init_lora_weights='pissa_niter_4'",
    "pissa": "PEFT PiSSA, full SVD",
    "geora": "GeoRA, defaults (svd_solver='auto')",
    "geora_exact": "GeoRA, svd_solver='exact'",
    "geora_niter_N": "GeoRA, svd_niter=N (--extra-niter; a cheaper, less accurate setting, not the default)",
    "geora_oversample_N": "GeoRA, svd_oversample=N (--extra-oversample; Krylov blocks of N more vectors)",
}


def qwen7b_config(layers: int):
    """A Qwen2.5-7B-shaped decoder config (hidden 3584, MLP 18944, 28 heads, 4 KV heads), small vocabulary."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=1024,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=layers,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The base model of the run: SmolLM2 (or ``--model``) in fp32, or a random bf16 Qwen2.5-7B-shaped one."""
    from transformers import AutoModelForCausalLM

    if args.shape == "qwen2.5-7b":
        torch.manual_seed(0)
        with torch.device(args.device):  # initialised where it runs (a CPU init of 7B-wide layers takes ~40 s)
            model = AutoModelForCausalLM.from_config(qwen7b_config(args.layers or 2), dtype=torch.bfloat16)
        return model.eval()
    from peft_geora_apps.default_model import load_default_model

    model, _ = load_default_model(args.model, device=args.device)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    with torch.no_grad():  # own copies, not pages of the checkpoint's mmap: RSS then counts the whole model
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model.eval()


def method_config(method: str, r: int):
    """The PEFT config of one benchmarked method (rank ``r``, alpha ``2r``, all linear projections)."""
    from peft import LoraConfig

    common = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    if method == "lora":
        return LoraConfig(**common)
    if method in ("pissa", "pissa_niter_4"):
        return LoraConfig(**common, init_lora_weights=method)
    if method == "geora":
        return GeoRAConfig(**common)
    if method == "geora_exact":
        return GeoRAConfig(**common, svd_solver="exact")
    if method.startswith("geora_niter_"):
        return GeoRAConfig(**common, svd_niter=int(method.rsplit("_", 1)[1]))
    if method.startswith("geora_oversample_"):
        return GeoRAConfig(**common, svd_oversample=int(method.rsplit("_", 1)[1]))
    raise ValueError(method)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class DecomposeTimer:
    """Seconds spent inside ``geora_decompose`` (the torch-only math) while GeoRA layers initialise."""

    def __init__(self, device: str) -> None:
        self.device, self.seconds = device, 0.0

    def __enter__(self) -> DecomposeTimer:
        import peft_geora.tuner.layer as layer

        self._layer, self._original = layer, layer.geora_decompose

        def timed(*a, **kw):
            start = time.perf_counter()
            out = self._original(*a, **kw)
            _sync(self.device)
            self.seconds += time.perf_counter() - start
            return out

        layer.geora_decompose = timed
        return self

    def __exit__(self, *exc) -> None:
        self._layer.geora_decompose = self._original


def time_init(base: torch.nn.Module, method: str, args: argparse.Namespace) -> tuple[float, float, torch.nn.Module]:
    """Seconds ``get_peft_model`` takes on a fresh copy of ``base``, of which in ``geora_decompose``; the model."""
    from peft import get_peft_model

    model = copy.deepcopy(base)
    gc.collect()
    _sync(args.device)
    with DecomposeTimer(args.device) as timer:
        start = time.perf_counter()
        peft_model = get_peft_model(model, method_config(method, args.r))
        _sync(args.device)
        seconds = time.perf_counter() - start
    return seconds, timer.seconds, peft_model


def target_modules(peft_model: torch.nn.Module):
    """``(name, weight (out x in), A0, B0)`` for every GeoRA layer of ``peft_model``."""
    from peft.utils.other import transpose

    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is None or "default" not in lora_a or not hasattr(lora_a["default"], "anchor"):
            continue
        weight = transpose(module.get_base_layer().weight.detach(), getattr(module, "fan_in_fan_out", False))
        yield name, weight, lora_a["default"].anchor, module.lora_B["default"].anchor


def exact_topk_energy_and_wk(matrix: torch.Tensor, k: int, want_wk: bool):
    """Exact top-k energy of ``matrix`` and (optionally) its rank-k reconstruction, from a float64 Gram eigensolve."""
    a = matrix.double()
    tall = a.shape[0] >= a.shape[1]
    rows = a.T if tall else a  # short side x long side
    values, vecs = torch.linalg.eigh(rows @ rows.T)
    energy = float(values[-k:].sum())
    if not want_wk:
        return energy, None
    top = vecs[:, -k:]  # short-side singular vectors
    w_k = (a @ top) @ top.T if tall else top @ (top.T @ a)
    return energy, w_k


def layer_quality(weight: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor, config: GeoRAConfig) -> dict:
    """Quality of one layer's fast init (see the module docstring)."""
    w = weight.float()
    r = a0.shape[0]
    settings = {**config.prior_settings, **config.solver_settings}
    dec = geora_decompose(w, r, **settings)
    # the layer keeps the factors in its own dtype: compare after the same cast
    reproduced = torch.equal(dec.factors.A.to(a0.dtype).cpu(), a0.cpu()) and torch.equal(
        dec.factors.B.to(b0.dtype).cpu(), b0.cpu()
    )
    union = dec.masks.spectral | dec.masks.euclidean
    w_geo = w * union
    exact_energy, _ = exact_topk_energy_and_wk(w_geo, r, want_wk=False)
    # the solver's factors (fp32); the layer may store them rounded to the model's dtype
    captured = float((dec.factors.B.double() @ dec.factors.A.double()).square().sum()) / exact_energy
    k_spec = config.spectral_rank or r
    _, w_k = exact_topk_energy_and_wk(w, k_spec, want_wk=True)
    k = quantile_rank(config.rho, w.numel())
    mags = w.double().abs()
    exact_spec = w_k.abs() <= kth_smallest(w_k.abs(), k)
    exact_euc = mags <= kth_smallest(mags, k)
    exact_union = exact_spec | exact_euc

    def threshold_is_exact(values: torch.Tensor, mask: torch.Tensor) -> bool:
        """The kept entries are exactly those <= the k-th smallest value (checked against a full sort)."""
        tau = values.reshape(-1).sort().values[k - 1]
        return bool(torch.equal(mask, values <= tau))

    fast_u, fast_s, fast_vh = _spectral_svd(w, k_spec, settings)
    fast_wk_abs = ((fast_u * fast_s) @ fast_vh).abs()
    return {
        "shape": list(w.shape),
        "captured_energy": captured,
        "spectral_agreement": float((dec.masks.spectral == exact_spec).double().mean()),
        "euclidean_agreement": float((dec.masks.euclidean == exact_euc).double().mean()),
        "union_agreement": float((union == exact_union).double().mean()),
        "union_identical": bool(torch.equal(union, exact_union)),
        "euclidean_threshold_exact": threshold_is_exact(w.abs(), dec.masks.euclidean),
        "spectral_threshold_exact": threshold_is_exact(fast_wk_abs, dec.masks.spectral),
        "anchors_reproduced_bitwise": bool(reproduced),
    }


def _spectral_svd(w: torch.Tensor, k: int, settings: dict):
    """The fast truncated SVD of ``W`` the spectral prior used (same solver settings, so bitwise the same)."""
    from peft_geora.functional import truncated_svd

    return truncated_svd(
        w,
        k,
        solver=settings["svd_solver"],
        niter=settings["svd_niter"],
        oversample=settings["svd_oversample"],
        seed=settings["svd_seed"],
    )


def quality_report(peft_model: torch.nn.Module, max_layers: int | None) -> list[dict]:
    """Per-layer quality rows of a GeoRA model (at most ``max_layers`` of them)."""
    config = peft_model.peft_config["default"]
    rows = []
    modules = list(target_modules(peft_model))[:max_layers]
    for name, weight, a0, b0 in tqdm(modules, desc="quality", leave=False):
        rows.append({"name": name, **layer_quality(weight, a0, b0, config)})
    return rows


def summarize_quality(rows: list[dict]) -> dict:
    """Min / mean over layers of the per-layer quality rows."""
    out: dict = {"layers": len(rows)}
    for key in ("captured_energy", "spectral_agreement", "euclidean_agreement", "union_agreement"):
        values = [row[key] for row in rows]
        out[key] = {"min": min(values), "mean": statistics.fmean(values)}
    for key in (
        "union_identical",
        "euclidean_threshold_exact",
        "spectral_threshold_exact",
        "anchors_reproduced_bitwise",
    ):
        out[key + "_fraction"] = statistics.fmean(float(row[key]) for row in rows)
    return out


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Peak resident set size seen by a background thread sampling every ``interval`` seconds."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = _rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _return_memory_eagerly() -> None:
    """Make glibc serve and free blocks over 64 KiB with mmap, so RSS tracks live memory (probe processes only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)


def memory_probe(args: argparse.Namespace) -> dict:
    """Peak memory above the model while ``get_peft_model`` runs ``args.probe`` (CPU: in this fresh process)."""
    from peft import get_peft_model

    if args.device.startswith("cuda"):
        base = build_model(args)
        gc.collect()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        peft_model = get_peft_model(base, method_config(args.probe, args.r))
        torch.cuda.synchronize()
        peak, final = torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
        del peft_model
    else:
        _return_memory_eagerly()
        base = build_model(args)
        gc.collect()
        before = _rss_bytes()
        with RssSampler() as sampler:
            peft_model = get_peft_model(base, method_config(args.probe, args.r))
        gc.collect()
        peak, final = sampler.peak - before, _rss_bytes() - before
        del peft_model
    return {"peak_above_model_mb": peak / 2**20, "adapters_mb": final / 2**20, "transient_mb": (peak - final) / 2**20}


def run_probe_script(script: str, method: str, args: argparse.Namespace, extra: list[str] = ()) -> dict | None:
    """Run ``script --probe method`` (the common options of ``args`` plus ``extra``) in a fresh interpreter and
    return the JSON its last output line holds; ``None`` if it failed. Shared with ``step_speed.py``."""
    cmd = [sys.executable, script, "--probe", method, "--device", args.device, "--r", str(args.r), *extra]
    for flag in ("model", "shape", "layers", "threads"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        logger.warning("memory probe for %s failed:\n%s", method, done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_probe_subprocess(method: str, args: argparse.Namespace) -> dict | None:
    """Run :func:`memory_probe` for ``method`` in a fresh interpreter; ``None`` if it failed."""
    return run_probe_script(__file__, method, args)


def common_arguments(parser: argparse.ArgumentParser, shape_help: str = "random bf16 model of this shape") -> None:
    """The options every benchmark script takes: device, model, shape, rank, threads, JSON output."""
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="local model folder (default: built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--shape", default=None, choices=["qwen2.5-7b"], help=shape_help)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")


def machine_info(load_before: tuple[float, ...], load_after: tuple[float, ...], device: str) -> dict:
    """What the JSON results record about the machine, the device and the load (shared by the benchmark scripts)."""
    return {
        "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def largest_target_bytes(base: torch.nn.Module) -> tuple[int, int]:
    """fp32 bytes of the largest targeted weight and of the largest decoder layer's targeted weights."""
    largest, per_layer = 0, {}
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            n = module.weight.numel()
            largest = max(largest, n)
            layer = name.split(".mlp")[0].split(".self_attn")[0]
            per_layer[layer] = per_layer.get(layer, 0) + n
    return 4 * largest, 4 * max(per_layer.values())


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (7B shape: default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of the fast methods")
    parser.add_argument("--slow-repeats", type=int, default=1, help="timed rounds of the full-SVD methods")
    parser.add_argument("--with-full-svd", action="store_true", help="7B shape: also time the full-SVD methods")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--memory-full-svd", action="store_true", help="also probe memory of the full-SVD methods")
    parser.add_argument("--quality-layers", type=int, default=None, help="check at most this many layers' quality")
    parser.add_argument("--extra-niter", type=int, default=8, help="also run GeoRA with this svd_niter (0: no)")
    parser.add_argument("--extra-oversample", type=int, nargs="*", default=[], help="also run GeoRA with these")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("peft_geora").setLevel(logging.WARNING)
    if args.probe:
        print(json.dumps(memory_probe(args)))
        return 0

    slow = () if (args.shape and not args.with_full_svd) else SLOW_METHODS
    fast = FAST_METHODS + ((f"geora_niter_{args.extra_niter}",) if args.extra_niter else ())
    fast += tuple(f"geora_oversample_{n}" for n in args.extra_oversample)
    base = build_model(args)
    matrix_bytes, layer_bytes = largest_target_bytes(base)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {m: [] for m in fast + slow}
    decompose: dict[str, list[float]] = {m: [] for m in fast + slow}
    kept: dict[str, torch.nn.Module] = {}
    schedule = [  # interleaved rounds: the fast methods every round, the slow ones in the first rounds
        method
        for rep in range(max(args.repeats, args.slow_repeats))
        for method in (fast if rep < args.repeats else ()) + (slow if rep < args.slow_repeats else ())
    ]
    for method in tqdm(schedule, desc="timing"):
        seconds, in_decompose, peft_model = time_init(base, method, args)
        times[method].append(seconds)
        decompose[method].append(in_decompose)
        logger.info("%-14s %.2f s (geora_decompose %.2f s)", method, seconds, in_decompose)
        if method.startswith("geora") and method != "geora_exact" and method not in kept:
            kept[method] = peft_model
        else:
            del peft_model
        gc.collect()
    load_after = os.getloadavg()

    quality = {}
    for method, peft_model in kept.items():
        rows = quality_report(peft_model, args.quality_layers)
        quality[method] = {"summary": summarize_quality(rows), "layers": rows}
        del peft_model
    kept.clear()

    memory = {}
    if not args.no_memory:
        probe = list(FAST_METHODS) + (list(slow) if args.memory_full_svd else [])  # variants: same workspace
        for method in tqdm(probe, desc="memory"):
            memory[method] = run_probe_subprocess(method, args)

    median = {m: statistics.median(v) for m, v in times.items() if v}
    ref = median.get("pissa_niter_4")
    rows = [["method", "init s (median)", "in decompose", "runs", "x LoRA", "x PiSSA niter_4", "x PiSSA full"]]
    rows[0] += ["peak MB", "transient"]
    for method in fast + slow:
        if method not in median:
            continue
        mem = memory.get(method)
        rows.append(
            [
                method,
                f"{median[method]:.2f}",
                f"{statistics.median(decompose[method]):.2f}" if method.startswith("geora") else "-",
                str(len(times[method])),
                f"{median[method] / median['lora']:.1f}",
                f"{median[method] / ref:.2f}",
                f"{median[method] / median['pissa']:.3f}" if "pissa" in median else "-",
                f"{mem['peak_above_model_mb']:.1f}" if mem else "-",
                f"{mem['transient_mb'] / (matrix_bytes / 2**20):.2f} mat" if mem else "-",
            ]
        )
    print()
    print(format_table(rows))
    ratios = [g / p for g, p in zip(times["geora"], times["pissa_niter_4"])]
    print(f"\nGeoRA / PiSSA niter_4 per round: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(
        f"transient = peak - adapters, in units of the largest target weight in fp32 ({matrix_bytes / 2**20:.1f} MB);"
    )
    print(f"one decoder layer's targeted weights in fp32: {layer_bytes / 2**20:.1f} MB")
    qrows = [
        [
            "quality (vs exact)",
            "layers",
            "min E",
            "mean E",
            "spec agree",
            "euc agree",
            "union agree",
            "identical",
            "thresholds exact",
            "bitwise repro",
        ]
    ]
    for method, q in quality.items():
        s = q["summary"]
        qrows.append(
            [
                method,
                str(s["layers"]),
                f"{s['captured_energy']['min']:.5f}",
                f"{s['captured_energy']['mean']:.5f}",
                f"{s['spectral_agreement']['mean']:.4f} (min {s['spectral_agreement']['min']:.3f})",
                f"{s['euclidean_agreement']['mean']:.4f}",
                f"{s['union_agreement']['mean']:.4f} (min {s['union_agreement']['min']:.3f})",
                f"{s['union_identical_fraction']:.2f}",
                f"{min(s['euclidean_threshold_exact_fraction'], s['spectral_threshold_exact_fraction']):.2f}",
                f"{s['anchors_reproduced_bitwise_fraction']:.2f}",
            ]
        )
    print()
    print(format_table(qrows))
    print(
        f"\nload average before/after: {load_before[0]:.1f} / {load_after[0]:.1f}; "
        f"torch threads {torch.get_num_threads()}"
    )
    if args.out:
        result = {
            "args": vars(args),
            "machine": machine_info(load_before, load_after, args.device),
            "descriptions": DESCRIPTIONS,
            "seconds": times,
            "median_seconds": median,
            "seconds_in_geora_decompose": decompose,
            "geora_over_pissa_niter_4_per_round": ratios,
            "memory": memory,
            "largest_target_fp32_mb": matrix_bytes / 2**20,
            "decoder_layer_targets_fp32_mb": layer_bytes / 2**20,
            "quality": quality,
        }
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
