"""GeoRA's rows for PEFT's ``tests/test_custom_models.py``, and the tests that cannot apply to GeoRA.

The rows use the file's own row formats and model ids: ``"MLP"`` (``lin0`` 10 -> 20, ``lin1`` 20 -> 2),
``"EmbConv1D"`` (an embedding, a transformers ``Conv1D`` ``conv1d`` 5 -> 1 and ``lin0`` 10 -> 2), ``"MLP2"``,
``"MLP_LayerNorm"`` and ``"Conv2d"`` (only its ``lin0`` is adapted; its ``nn.Conv2d`` can be in ``modules_to_save``).
Tests that need a non-identity adapter (merging, save/load round trips, ...) pass the row through PEFT's
``set_init_weights_false``. It sets ``init_lora_weights=False`` only for ``config_cls in (LoraConfig, AdaLoraConfig)``
(equality, so not for the ``GeoRAConfig`` subclass, which refuses that option) and ``init_weights=False`` for the
other classes: GeoRA's random, non-identity factors and anchors. Tests that need an identity at init (disabling
adapters, training) use the row as it is: GeoRA's decomposition, an exact identity at init. So the rows leave
``init_weights`` at its default; the configs of the other tests' lists set it to False, as theirs set
``init_lora_weights=False``.

The scalings of the TEST_CASES rows (``lora_alpha / r``) stay at most 4: ``test_parameters_after_loading_model``
takes 3 SGD steps at lr 0.5 on a loss that is unbounded below, and with an SVD-initialised adapter (GeoRA, and LoRA
with ``init_lora_weights="pissa"`` alike) a scaling of 16 overflows to NaN there.
"""

from __future__ import annotations

from peft_geora import GeoRAConfig

# (test name, model id, config class, config kwargs), as in TEST_CASES. Every name contains "GeoRA".
TEST_CASES = [
    # the default r=16 is above min(out, in)=10 of lin0: capped to 10, scaling kept (recorded in rank/alpha_pattern)
    ("Vanilla MLP 1 GeoRA", "MLP", GeoRAConfig, {"target_modules": "lin0"}),
    ("Vanilla MLP 2 GeoRA", "MLP", GeoRAConfig, {"target_modules": ["lin0"], "r": 8}),
    ("Vanilla MLP 3 GeoRA", "MLP", GeoRAConfig, {"target_modules": ["lin1"], "r": 2, "lora_alpha": 4, "rho": 0.5}),
    (
        "Vanilla MLP 4 GeoRA",
        "MLP",
        GeoRAConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 4, "rho": 0.1},
    ),
    (
        "Vanilla MLP 5 GeoRA",
        "MLP",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 4, "lora_alpha": 8, "modules_to_save": ["lin1"]},
    ),
    (
        "Vanilla MLP 6 GeoRA",
        "MLP",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 8, "lora_alpha": 4, "lora_dropout": 0.1},
    ),
    (
        "Vanilla MLP 7 GeoRA rslora",
        "MLP",
        GeoRAConfig,
        {"target_modules": ["lin0", "lin1"], "r": 4, "lora_alpha": 4, "use_rslora": True, "rho": 0.3},
    ),
    (
        "Vanilla MLP 8 GeoRA rank_pattern",
        "MLP",
        GeoRAConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "r": 4,
            "lora_alpha": 4,
            "rank_pattern": {"lin1": 1},
            "alpha_pattern": {"lin0": 2, "lin1": 1},
            "rho": 0.2,
        },
    ),
    (
        "Vanilla MLP 9 GeoRA pissa scale",
        "MLP",
        GeoRAConfig,
        {
            "target_modules": ["lin0", "lin1"],
            "r": 2,
            "lora_alpha": 2,
            "scale_convention": "pissa",
            "spectral_rank": 1,
            "lora_dropout": 0.2,
        },
    ),
    # at full rank (r = min(out, in)) the spectral prior equals the Euclidean one: r=4 keeps them apart
    (
        "Vanilla MLP 10 GeoRA spectral prior",
        "MLP",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 4, "lora_alpha": 8, "priors": "spectral"},
    ),
    (
        "Vanilla MLP 11 GeoRA MiLoRA-like tail",
        "MLP",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 3, "lora_alpha": 6, "priors": "none", "components": "tail"},
    ),
    (
        "Vanilla MLP 12 GeoRA randomized solver",
        "MLP",
        GeoRAConfig,
        {
            "target_modules": ["lin0"],
            "r": 4,
            "lora_alpha": 8,
            "priors": "euclidean",
            "svd_solver": "randomized",
            "svd_seed": 3,
        },
    ),
    ("Vanilla MLP 13 GeoRA all-linear", "MLP", GeoRAConfig, {"r": 2, "lora_alpha": 2}),
    ("MLP2 GeoRA", "MLP2", GeoRAConfig, {"target_modules": ["lin0", "lin1"], "r": 2, "lora_alpha": 2}),
    (
        "MLP_LayerNorm GeoRA",
        "MLP_LayerNorm",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 4, "lora_alpha": 8, "modules_to_save": ["layernorm0", "layernorm1"]},
    ),
    (
        "Embedding + transformers Conv1D 1 GeoRA",
        "EmbConv1D",
        GeoRAConfig,
        {"target_modules": ["conv1d"], "r": 1, "lora_alpha": 2},
    ),
    # default r=16 capped to 1 on conv1d, to 2 on lin0
    ("Embedding + transformers Conv1D 2 GeoRA", "EmbConv1D", GeoRAConfig, {"target_modules": ["conv1d", "lin0"]}),
    (
        "Embedding + transformers Conv1D 3 GeoRA",
        "EmbConv1D",
        GeoRAConfig,
        {"target_modules": ["conv1d"], "r": 1, "modules_to_save": ["lin0"], "use_rslora": True, "lora_alpha": 3},
    ),
    (
        "Embedding + transformers Conv1D 4 GeoRA trainable_tokens",
        "EmbConv1D",
        GeoRAConfig,
        {"target_modules": ["conv1d"], "r": 1, "lora_alpha": 2, "trainable_token_indices": {"emb": [0, 10]}},
    ),
    (
        "Conv2d 1 GeoRA",
        "Conv2d",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 2, "lora_alpha": 4, "modules_to_save": ["conv2d"]},
    ),
]

# (test name, tuner method, config class, kwargs of adapter 1, kwargs of adapter 2), as in
# MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES; the tuner method picks the model (anything but "ia3" / "lora+trainable_tokens":
# MLP with biases).
MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = [
    (
        "GeoRA Same",
        "geora",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
    ),
    (
        "GeoRA Different",
        "geora",
        GeoRAConfig,
        {"target_modules": ["lin0"], "r": 4, "init_weights": False},
        {"target_modules": ["lin1"], "r": 2, "init_weights": False},
    ),
    (
        "GeoRA Same, ranks and rslora differ",
        "geora",
        GeoRAConfig,
        {"target_modules": ["lin0", "lin1"], "r": 2, "init_weights": False},
        {"target_modules": ["lin0"], "r": 8, "use_rslora": True, "init_weights": False},
    ),
]

# (test name, config 0, config 1), as in MIXED_ADAPTER_TEST_CASES (model: MLP, adapters on lin0).
MIXED_ADAPTER_TEST_CASES = [
    (
        "GeoRA mixed adapter",
        GeoRAConfig(target_modules=["lin0"], r=4, init_weights=False),
        GeoRAConfig(target_modules=["lin0"], r=8, init_weights=False),
    ),
    (
        "GeoRA mixed adapter, rslora",
        GeoRAConfig(target_modules=["lin0"], r=2, init_weights=False, use_rslora=True),
        GeoRAConfig(target_modules=["lin0", "lin1"], r=2, init_weights=False),
    ),
]


def _geora(**kwargs) -> GeoRAConfig:
    """A non-identity GeoRA config, as the upstream configs of these tests are (``init_lora_weights=False``)."""
    return GeoRAConfig(init_weights=False, **kwargs)


# Tests parametrized with their own list of configs (one per PEFT method, not one of the shared lists above) whose
# bodies work for any method of that list: test name -> (argument names, GeoRA's rows), in the upstream row format.
_MIXED = "test_name, config0, config1"
EXTRA_ROWS = {
    "test_multiple_adapters_mixed_modules_to_save": ("config_cls", [GeoRAConfig]),
    "test_multiple_adapters_mixed_modules_to_save_order_switched": ("config_cls", [GeoRAConfig]),
    "test_adapter_name_makes_no_difference": ("config0", [_geora(target_modules=["lin0"], r=4)]),
    "test_mixed_adapter_batches_different_target_layers": (
        _MIXED,
        [
            (
                "GeoRA mixed adapter with different target layers",
                _geora(target_modules=["lin0"], r=4),
                _geora(target_modules=["lin1"], r=2),
            )
        ],
    ),
    "test_mixed_adapter_batches_multiple_modules_to_save": (
        _MIXED,
        [
            (
                "GeoRA mixed adapter with modules to save",
                _geora(target_modules=["lin0"], r=4, modules_to_save=["lin1"]),
                _geora(target_modules=["lin0"], r=2, modules_to_save=["lin1"]),
            )
        ],
    ),
    "test_mixed_adapter_batches_unsupported_layer_raises": (
        _MIXED,
        [
            (
                "GeoRA mixed adapter with unsupported layer",
                _geora(target_modules=["lin0"], r=4, modules_to_save=["gru"]),
                _geora(target_modules=["lin0"], r=4, modules_to_save=["gru"]),
            )
        ],
    ),
    "test_mixed_adapter_batches_partly_overlapping_target_layers": (
        _MIXED,
        [
            (
                "GeoRA mixed adapter with overlapping layers",
                _geora(target_modules=["lin0"], r=4),
                _geora(target_modules=["lin0", "lin1"], r=2),
            )
        ],
    ),
    # GeoRA cannot adapt the embedding: its rows adapt the transformers Conv1D (and lin0) only
    "test_mixed_adapter_batches_lora_conv1d_emb": (
        _MIXED,
        [
            (
                "GeoRA mixed adapter with conv1d",
                _geora(target_modules=["conv1d"], r=1),
                _geora(target_modules=["conv1d", "lin0"], r=16),
            )
        ],
    ),
    "test_mixed_adapter_batches_lora_conv1d_emb_multiple_modules_to_save": (
        _MIXED,
        [
            (
                "GeoRA mixed adapter with conv1d and modules to save",
                _geora(target_modules=["conv1d"], r=1, modules_to_save=["lin0"]),
                _geora(target_modules=["conv1d"], r=1, modules_to_save=["lin0"]),
            )
        ],
    ),
    "test_mixed_adapter_batches_lora_wrong_adapter_name_raises": (
        "test_name, config",
        [("GeoRA mixed batch wrong adapter name", _geora(target_modules=["lin0"], r=4))],
    ),
}

# Tests re-parametrized with GeoRA's rows that still cannot apply to GeoRA: test name -> reason (none so far: every
# such test passes or is skipped by PEFT's own code). A reason starting "known GeoRA bug:" marks a GeoRA bug.
SKIPS: dict[str, str] = {}

NOT_APPLICABLE_PREFIX = "not applicable to GeoRA: "  # starts the skip reason of each upstream test without rows
_LINEAR_ONLY = "GeoRA adapts nn.Linear and transformers Conv1D layers only"
_LORA_NAMES = (
    "hard-codes LoRA's parameter names (lora_A.<adapter>.weight); GeoRA's trainable ones are lora_A.<adapter>.delta "
    "(lora_A[...].weight is a computed property)"
)

# The upstream tests that take no GeoRA rows, matched by name (re.search, first match wins) -> why GeoRA has no row
# for them. They are collected as one skipped item each. A test matched by none of these is classified by the
# PEFT config classes its body and parametrization build (it tests those methods, not GeoRA); a test that builds none
# stops the run, so that a new upstream test is looked at rather than dropped.
NOT_APPLICABLE: list[tuple[str, str]] = [
    (r"dora", "DoRA (use_dora=True) is another adapter; GeoRAConfig refuses it"),
    (
        r"conv2d|grouped_conv|mha|multihead_attention",
        f"targets nn.Conv2d/Conv3d or nn.MultiheadAttention; {_LINEAR_ONLY}",
    ),
    (r"embedding|_emb_conv1d$", f"targets an nn.Embedding; {_LINEAR_ONLY}"),
    (r"lora_bias", "lora_bias=True is refused by GeoRAConfig"),
    (r"paramwrapper", "target_parameters is refused by GeoRAConfig"),
    (r"monteclora", "MonteCLoRA (monteclora_config) is refused by GeoRAConfig"),
    (r"^test_requires_grad_(lora|modules_to_save)_", _LORA_NAMES),
    (
        r"^test_default_target_modules_(list_of_str|str|not_set)",
        "GeoRA's default target_modules is 'all-linear' (the paper's setting), not None: the per-model-type "
        "default lookup these tests check is not used",
    ),
    (r"_opt_timing$", "needs a GPU and the facebook/opt-125m model from the Hub"),
    (
        r"^test_add_weighted_adapter_cat_with_rank_pattern$",
        "its config_cls parameter is unused: it always builds LoraConfig (GeoRA's add_weighted_adapter is tested in "
        "tests/integration/test_combination.py)",
    ),
]
