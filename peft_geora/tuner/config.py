"""``GeoRAConfig``: a ``LoraConfig`` with the GeoRA initialisation settings, paper defaults."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from peft import LoraConfig
from peft.utils.other import get_pattern_key

from ..format.card import write_model_card
from ..format.checkpoint import CONFIG_NAME, FORMAT_VERSION
from ..functional import COMPONENTS, DEFAULT_NITER, DEFAULT_OVERSAMPLE, PRIORS, SOLVERS
from .init_runtime import check_init_device
from .registry import geora_peft_type

SCALE_CONVENTIONS: tuple[str, ...] = ("paper", "pissa", "orthonormal")

# LoRA options that change what the adapter computes or how it is initialised: GeoRA defines both, so these are
# refused rather than silently ignored. Maps field -> the value that means "off".
_REFUSED_LORA_OPTIONS: dict[str, object] = {
    "use_dora": False,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "lora_bias": False,
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "alora_invocation_tokens": None,
    "velora_config": None,
    "monteclora_config": None,
    "kasa_config": None,
    "megatron_config": None,
    "layer_replication": None,
}


def pattern_value(patterns: dict, module: str, default: float) -> float:
    """``module``'s value in a ``rank_pattern`` / ``alpha_pattern`` (PEFT's ``get_pattern_key``), else ``default``."""
    return patterns.get(get_pattern_key(list(patterns), module), default) if patterns else default


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """LoRA's scaling of a module: ``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r`` (PEFT's ``update_layer``)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def lora_alpha_for(scaling: float, r: int, use_rslora: bool) -> float:
    """The ``lora_alpha`` that gives ``scaling`` at rank ``r`` (the inverse of :func:`lora_scaling`)."""
    return scaling * math.sqrt(r) if use_rslora else scaling * r


def exact_pattern(module: str) -> str:
    """A ``rank_pattern`` / ``alpha_pattern`` key that matches ``module`` (PEFT matches keys as regexes against the
    end of a module's name)."""
    return re.escape(module)


@dataclass
class GeoRAConfig(LoraConfig):
    """Configuration of a GeoRA adapter (Geometry-Aware Low-Rank Adaptation, arXiv 2601.09361).

    GeoRA initialises LoRA factors from the top-r SVD of ``W * (M_spec | M_euc)`` (the weight restricted to its
    low-magnitude entries and to the entries its principal reconstruction leaves small) and subtracts the frozen
    initial product in the forward, so the model is unchanged at initialisation and ``W`` is never modified.

    All :class:`peft.LoraConfig` options that only choose *where* adapters go (``target_modules``,
    ``exclude_modules``, ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform``, ``use_rslora``,
    ``lora_dropout``, ``modules_to_save`` ...) work as in LoRA. Options that define another adapter or another
    initialisation (DoRA, LoftQ, EVA, CorDA, ``init_lora_weights``, ...) raise a ``ValueError``.
    """

    r: int = field(default=16, metadata={"help": "Adapter rank (paper default 16)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha; scaling is alpha / r (paper default 32)."})
    target_modules: list[str] | str | None = field(
        default="all-linear",
        metadata={
            "help": "Modules to adapt. Default 'all-linear': every linear projection except the output head, as in "
            "the paper (q, k, v, o, gate, up, down for Llama-style decoders)."
        },
    )
    rho: float = field(
        default=0.2,
        metadata={"help": "Quantile in (0, 1) for both priors: each mask keeps the rho share of smallest entries."},
    )
    spectral_rank: int | None = field(
        default=None,
        metadata={"help": "Rank of the reconstruction that defines the spectral prior. Default: the adapter rank r."},
    )
    priors: Literal["union", "spectral", "euclidean", "none"] = field(
        default="union",
        metadata={
            "help": "Which entries of W are decomposed: 'union' (GeoRA), 'spectral' or 'euclidean' (one prior only, "
            "the paper's ablations), 'none' (all of W: PiSSA's head, or MiLoRA's tail with components='tail')."
        },
    )
    components: Literal["head", "tail"] = field(
        default="head",
        metadata={"help": "Take the largest ('head', GeoRA/PiSSA) or smallest ('tail', MiLoRA) singular triplets."},
    )
    scale_convention: Literal["paper", "pissa", "orthonormal"] = field(
        default="paper",
        metadata={
            "help": "'paper': A0 = sqrt(S) V^T, B0 = U sqrt(S). 'pissa': sqrt(S / scaling) as in PEFT's PiSSA. "
            "'orthonormal': A0 = c V^T, B0 = U c with one constant c = sqrt(mean(S)) per layer (the paper's factor "
            "norms, no direction weighted by its singular value). All leave the model unchanged at init; they differ "
            "in the size of A, B and so in the effective step size of each direction."
        },
    )
    svd_solver: Literal["auto", "exact", "randomized"] = field(
        default="auto",
        metadata={
            "help": "'exact' (LAPACK SVD), 'randomized' (seeded randomized block Krylov solver that stops once the "
            "top-r energy has converged; see peft_geora.functional.krylov_svd) or 'auto' (LAPACK for tail "
            "components, an exact Gram-matrix eigensolve when min(out, in) <= 256, randomized otherwise). On "
            "SmolLM2 'auto' captures >= 0.9998 of the exact top-r energy of every layer's masked matrix."
        },
    )
    svd_niter: int = field(
        default=DEFAULT_NITER,
        metadata={
            "help": "Most Krylov steps of the randomized solver (each costs two products of the weight with a block "
            "of max(8, r/2) + svd_oversample vectors). A cap: the solver stops once the captured top-r energy has "
            "converged, after 8 to 20 steps on SmolLM2. Lower it to trade accuracy for speed (8 steps: 0.976 to "
            "0.99 of the exact top-r energy, init ~35% faster)."
        },
    )
    svd_oversample: int = field(
        default=DEFAULT_OVERSAMPLE,
        metadata={
            "help": "Extra vectors per Krylov block of the randomized solver (block = max(8, ceil(r/2)) + "
            "svd_oversample). Measured on SmolLM2: blocks of r/2 reach the target energy fastest; blocks of r took "
            "1.9x longer."
        },
    )
    svd_seed: int = field(default=0, metadata={"help": "Seed of the randomized solver (init is reproducible)."})
    init_device: str = field(
        default="auto",
        metadata={
            "help": "Device of the decomposition: 'auto' uses the current GPU when the weight sits on the CPU and a "
            "GPU is present (layer by layer, factors moved back), else the weight's device; or a torch device "
            "('cpu', 'cuda', 'cuda:1'). Results agree across devices to rounding, not bitwise."
        },
    )
    init_weights: bool = field(
        default=True,
        metadata={
            "help": "True: GeoRA initialisation. False: random, non-identity factors and anchors, no SVD (PEFT's "
            "testing convention)."
        },
    )

    init_from_checkpoint: bool = field(
        default=False,
        metadata={
            "help": "Written as True by save_pretrained: the factors and frozen anchors of this adapter are stored "
            "in its checkpoint, so loading never runs a decomposition. Set it to False to start a new adapter from "
            "a saved config."
        },
    )
    base_fingerprints: dict = field(
        default_factory=dict,
        repr=False,
        metadata={
            "help": "Per target module, a cheap fingerprint of the base weight the adapter was initialised on; "
            "loading onto a base whose weights differ warns (or raises, see peft_geora.base_check)."
        },
    )
    parameter_targets: dict = field(
        default_factory=dict,
        metadata={
            "help": "Written at injection: per module path of an adapted parameter (target_parameters), "
            "[parameter name, number of experts E]. The saved factors (E r x in, out x r E) are keyed by module "
            "path, which tells neither; the LoRA export and inspect read them here."
        },
    )
    geora_format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Version of the peft-geora checkpoint format."}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.geora_format_version, int) or self.geora_format_version > FORMAT_VERSION:
            raise ValueError(
                f"GeoRAConfig: this adapter was saved in peft-geora format version {self.geora_format_version!r}, "
                f"but this peft-geora reads versions <= {FORMAT_VERSION}; upgrade peft-geora to load it"
            )
        self._validate_geora_fields()
        super().__post_init__()
        self.peft_type = geora_peft_type()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs: Any):
        """Load a saved config; for a local folder, remember it so that its weights are checked before loading."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        folder = os.path.join(pretrained_model_name_or_path, subfolder or "")
        if os.path.isdir(folder):
            config._checkpoint_dir = folder
        return config

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save like any PEFT config, marked ``init_from_checkpoint`` (the factors are saved beside it)."""
        super().save_pretrained(save_directory, **kwargs)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path) as fh:
            data = json.load(fh)
        data["init_from_checkpoint"] = True
        data["geora_format_version"] = FORMAT_VERSION
        with open(path, "w") as fh:
            fh.write(json.dumps(data, indent=2, sort_keys=True))
        if os.path.exists(os.path.join(save_directory, "README.md")):  # written by PeftModel.save_pretrained
            write_model_card(save_directory, self.base_model_name_or_path)

    def _validate_geora_fields(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"GeoRAConfig: r must be a positive int, got {self.r!r}")
        if (
            isinstance(self.lora_alpha, bool)
            or not isinstance(self.lora_alpha, (int, float))
            or not self.lora_alpha > 0
        ):
            raise ValueError(f"GeoRAConfig: lora_alpha must be a positive number, got {self.lora_alpha!r}")
        for key, rank in (self.rank_pattern or {}).items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise ValueError(f"GeoRAConfig: rank_pattern[{key!r}] must be a positive int, got {rank!r}")
        for key, alpha in (self.alpha_pattern or {}).items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
                raise ValueError(f"GeoRAConfig: alpha_pattern[{key!r}] must be a positive number, got {alpha!r}")
        if isinstance(self.rho, bool) or not isinstance(self.rho, (int, float)) or not 0.0 < self.rho < 1.0:
            raise ValueError(f"GeoRAConfig: rho must lie in the open interval (0, 1), got {self.rho!r}")
        if self.spectral_rank is not None and (not isinstance(self.spectral_rank, int) or self.spectral_rank < 1):
            raise ValueError(f"GeoRAConfig: spectral_rank must be a positive int or None, got {self.spectral_rank!r}")
        choices = {"priors": PRIORS, "components": COMPONENTS, "svd_solver": SOLVERS}
        choices["scale_convention"] = SCALE_CONVENTIONS
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GeoRAConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.svd_solver == "randomized" and self.components == "tail":
            raise ValueError(
                "GeoRAConfig: components='tail' needs svd_solver='exact' or 'auto' (a randomized solver finds leading "
                "components only), got svd_solver='randomized'"
            )
        check_init_device(self.init_device)
        for name in ("svd_niter", "svd_oversample"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"GeoRAConfig: {name} must be a non-negative int, got {value!r}")
        if self.init_lora_weights is not True:
            raise ValueError(
                "GeoRAConfig: init_lora_weights is LoRA's initialisation switch and must stay True; GeoRA's own "
                f"initialisation is chosen with init_weights (and priors/components), got {self.init_lora_weights!r}"
            )
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"GeoRAConfig: init_weights must be True or False, got {self.init_weights!r}")
        for name, off in _REFUSED_LORA_OPTIONS.items():
            value = getattr(self, name, off)
            if value != off and not (off is None and value in ({}, [])):
                raise ValueError(
                    f"GeoRAConfig: the LoRA option {name}={value!r} is not supported by GeoRA (it defines another "
                    "adapter or initialisation); leave it unset"
                )

    @property
    def prior_settings(self) -> dict:
        """The keyword arguments of :func:`peft_geora.functional.geora_decompose` that choose what is decomposed."""
        return {name: getattr(self, name) for name in ("rho", "spectral_rank", "priors", "components")}

    def scale_settings(self, scaling: float) -> dict:
        """The keyword arguments of :func:`peft_geora.functional.geora_decompose` that size the factors, for a layer
        whose LoRA scaling is ``scaling``: ``scale_divisor`` (``scaling`` for 'pissa', else 1) and ``uniform_scale``
        (True for 'orthonormal')."""
        divisor = scaling if self.scale_convention == "pissa" else 1.0
        return {"scale_divisor": divisor, "uniform_scale": self.scale_convention == "orthonormal"}

    @property
    def solver_settings(self) -> dict:
        """The keyword arguments of :func:`peft_geora.functional.geora_decompose` that choose the SVD solver."""
        return {name: getattr(self, name) for name in ("svd_solver", "svd_niter", "svd_oversample", "svd_seed")}

    @property
    def init_settings(self) -> dict:
        """The fields that determine the initial factors of a layer (same settings => same decomposition)."""
        others = ("scale_convention", "init_weights", "fan_in_fan_out")
        return {**self.prior_settings, **self.solver_settings, **{name: getattr(self, name) for name in others}}
