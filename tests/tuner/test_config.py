"""GeoRAConfig: paper defaults, the fast solver by default, validation, and reading a saved config back."""

from __future__ import annotations

import dataclasses

import pytest
from peft import LoraConfig, PeftConfig, PeftType

import peft_geora
import peft_geora.functional as F
from peft_geora import GeoRAConfig

GEORA_FIELDS = {
    "rho",
    "spectral_rank",
    "priors",
    "components",
    "scale_convention",
    "svd_solver",
    "svd_niter",
    "svd_oversample",
    "svd_seed",
    "init_weights",
}


def test_paper_defaults():
    config = GeoRAConfig()
    assert isinstance(config, LoraConfig)
    assert config.peft_type == PeftType.GEORA
    assert (config.r, config.lora_alpha, config.rho) == (16, 32, 0.2)
    assert config.target_modules == "all-linear"
    assert (config.priors, config.components, config.scale_convention) == ("union", "head", "paper")
    assert config.spectral_rank is None and config.init_weights is True and config.init_lora_weights is True


def test_config_defaults_are_the_fast_path():
    config = GeoRAConfig()
    assert config.svd_solver == "auto"
    assert (config.svd_niter, config.svd_oversample) == (F.DEFAULT_NITER, F.DEFAULT_OVERSAMPLE)


def test_geora_fields_have_help_metadata():
    fields = {f.name: f for f in dataclasses.fields(GeoRAConfig)}
    for name in GEORA_FIELDS:
        assert fields[name].metadata.get("help"), name


def test_peft_config_from_pretrained_returns_geora_config(tmp_path):
    GeoRAConfig(r=8, rho=0.3, priors="spectral").save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is GeoRAConfig
    assert (loaded.r, loaded.rho, loaded.priors, loaded.peft_type) == (8, 0.3, "spectral", PeftType.GEORA)
    assert peft_geora.GeoRAConfig.from_pretrained(tmp_path).rho == 0.3


@pytest.mark.parametrize("rho", [0.0, 1.0, -0.2, 1.2, float("nan"), "0.2", True])
def test_rho_outside_open_interval(rho):
    with pytest.raises(ValueError, match=r"rho must lie in the open interval \(0, 1\), got"):
        GeoRAConfig(rho=rho)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"use_dora": True}, "use_dora"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights"),
        ({"init_lora_weights": False}, "init_lora_weights"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "init_lora_weights"),
        ({"loftq_config": {"loftq_bits": 4}}, "loftq_config"),
        ({"eva_config": {"rho": 2.0}}, "eva_config"),
        ({"corda_config": {"corda_method": "kpm"}}, "corda_config"),
        ({"lora_bias": True}, "lora_bias"),
    ],
)
def test_lora_options_that_make_no_sense_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GeoRAConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"priors": "intersection"}, "priors"),
        ({"components": "middle"}, "components"),
        ({"scale_convention": "sqrt"}, "scale_convention"),
        ({"svd_solver": "lanczos"}, "svd_solver"),
        ({"svd_solver": "randomized", "components": "tail"}, "components='tail'"),
        ({"spectral_rank": 0}, "spectral_rank"),
        ({"svd_niter": -1}, "svd_niter"),
        ({"init_weights": "yes"}, "init_weights"),
        ({"r": 0}, r"r must be a positive int, got 0"),
        ({"r": -4}, r"r must be a positive int, got -4"),
        ({"r": 2.5}, r"r must be a positive int, got 2.5"),
        ({"lora_alpha": 0}, r"lora_alpha must be a positive number, got 0"),
        ({"lora_alpha": -8}, r"lora_alpha must be a positive number, got -8"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive int, got 0"),
        ({"alpha_pattern": {"v_proj": -1}}, r"alpha_pattern\['v_proj'\] must be a positive number, got -1"),
    ],
)
def test_bad_geora_fields(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GeoRAConfig(**kwargs)
