"""Save, load, export as LoRA, push to the Hub, merge: exact where the math allows, clear errors otherwise."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

import peft_geora
import peft_geora_apps.cli
from peft_geora import BaseModelMismatchError, BaseModelMismatchWarning, GeoRAConfig, base_check
from peft_geora.format.checkpoint import FORMAT_VERSION

from .conftest import assert_bitwise_equal, make_tiny_model, state_snapshot, tiny_inputs

ROOT = Path(__file__).resolve().parent.parent


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def trained_geora(config: GeoRAConfig | None = None, seed: int = 0, dtype=torch.float32):
    """A GeoRA model whose factors moved away from the anchors (as after training)."""
    model = get_peft_model(make_tiny_model("llama", dtype=dtype), config or GeoRAConfig(r=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
    return model.eval()


@pytest.fixture
def no_decomposition(monkeypatch):
    """Make every SVD entry point raise: loading must not decompose anything."""
    import peft_geora.functional as functional
    import peft_geora.tuner.layer as layer

    def boom(*args, **kwargs):
        raise AssertionError("a decomposition ran during loading")

    for module, name in [(layer, "geora_decompose"), (functional, "geora_decompose"), (functional, "truncated_svd")]:
        monkeypatch.setattr(module, name, boom)
    monkeypatch.setattr(torch.linalg, "svd", boom)


@pytest.fixture
def saved(tmp_path):
    model = trained_geora(GeoRAConfig(r=4, lora_dropout=0.1))
    inputs = tiny_inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", inputs, expected


def test_saved_files_hold_every_geora_field_and_both_factor_kinds(saved):
    folder, _, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "GEORA"
    for name in GeoRAConfig.__dataclass_fields__:
        assert name in config or name == "runtime_config", name  # PEFT never saves runtime options
    assert config["init_from_checkpoint"] is True and config["geora_format_version"] == FORMAT_VERSION
    assert len(config["base_fingerprints"]) == 14
    keys = load_file(folder / "adapter_model.safetensors").keys()
    for suffix in ("lora_A.delta", "lora_A.anchor", "lora_B.delta", "lora_B.anchor"):
        assert sum(k.endswith(suffix) for k in keys) == 14


def test_reload_in_a_fresh_process_is_bit_identical_without_any_svd(saved, tmp_path):
    folder, inputs, expected = saved
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
        import torch, peft_geora, peft_geora.tuner.layer, peft_geora.functional
        def boom(*a, **k): raise AssertionError("decomposition during load")
        peft_geora.tuner.layer.geora_decompose = peft_geora.functional.truncated_svd = torch.linalg.svd = boom
        from peft import PeftModel
        from tests.conftest import make_tiny_model
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        for low_cpu_mem_usage in (False, True):
            model = PeftModel.from_pretrained(make_tiny_model(), {str(folder)!r}, low_cpu_mem_usage=low_cpu_mem_usage)
            with torch.no_grad():
                torch.save(model(**inputs).logits, {str(tmp_path)!r} + f"/out_{{low_cpu_mem_usage}}.pt")
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=ROOT)
    for flag in (False, True):
        assert torch.equal(torch.load(tmp_path / f"out_{flag}.pt"), expected)


def test_every_loader_restores_exactly_without_svd(saved, no_decomposition, tmp_path):
    folder, inputs, expected = saved
    peft_model = PeftModel.from_pretrained(make_tiny_model(), folder, low_cpu_mem_usage=True)
    assert torch.equal(logits(peft_model, inputs), expected)
    # transformers' own adapter loader assigns tensors directly, bypassing load_state_dict
    plain = make_tiny_model()
    plain.load_adapter(str(folder))
    assert torch.equal(logits(plain, inputs), expected)
    # AutoPeftModel reads the base model from the adapter config
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    auto = AutoPeftModelForCausalLM.from_pretrained(folder)
    assert torch.equal(logits(auto, inputs), expected)
    # a trainable reload keeps training only the factors
    trainable = PeftModel.from_pretrained(make_tiny_model(), folder, is_trainable=True)
    names = [n for n, p in trainable.named_parameters() if p.requires_grad]
    assert names and all(n.endswith(".delta") for n in names)


def test_wrong_base_warns_with_module_names_and_can_raise(saved):
    folder, inputs, _ = saved
    with pytest.warns(BaseModelMismatchWarning, match=r"14 adapted module\(s\) differ.*model\.layers\.0\."):
        PeftModel.from_pretrained(make_tiny_model(seed=7), folder)
    other = make_tiny_model(seed=7)
    other.load_adapter(str(folder))
    with pytest.warns(BaseModelMismatchWarning, match="differ"):
        logits(other, inputs)  # transformers' loader: checked before the first forward
    with base_check("raise"), pytest.raises(BaseModelMismatchError, match="model.layers.0.mlp.up_proj"):
        PeftModel.from_pretrained(make_tiny_model(seed=7), folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BaseModelMismatchWarning)
        PeftModel.from_pretrained(make_tiny_model(), folder)  # the right base: silent
        PeftModel.from_pretrained(make_tiny_model(dtype=torch.bfloat16), folder)  # same base in bf16: silent


def test_a_saved_config_reused_for_a_new_adapter(saved):
    folder, inputs, _ = saved
    config = GeoRAConfig.from_pretrained(folder)
    model = get_peft_model(make_tiny_model(), config)
    with pytest.raises(RuntimeError, match="init_from_checkpoint=False"):
        logits(model, inputs)
    config = GeoRAConfig.from_pretrained(folder)
    config.init_from_checkpoint = False
    base = make_tiny_model()
    expected = logits(base, inputs)
    assert torch.equal(logits(get_peft_model(base, config), inputs), expected)


# ---- bad input: clear errors naming the file and module, the base model left as it was ----


def assert_fails_untouched(folder, model, error, match):
    before = state_snapshot(model)
    with pytest.raises(error, match=match):
        PeftModel.from_pretrained(model, folder)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert_bitwise_equal(before, state_snapshot(model))


def test_missing_weights_file(saved, tmp_path):
    folder, _, _ = saved
    (folder / "adapter_model.safetensors").unlink()
    assert_fails_untouched(folder, make_tiny_model(), FileNotFoundError, "adapter_model.safetensors is missing")


def test_corrupt_weights_file(saved):
    folder, _, _ = saved
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_fails_untouched(folder, make_tiny_model(), ValueError, "cannot read the adapter weights .*safetensors")


def test_config_from_a_newer_incompatible_version(saved):
    folder, _, _ = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config["geora_format_version"] = FORMAT_VERSION + 1
    (folder / "adapter_config.json").write_text(json.dumps(config))
    newer = f"format version {FORMAT_VERSION + 1}.*upgrade peft-geora"
    assert_fails_untouched(folder, make_tiny_model(), ValueError, newer)


V1_FIXTURE = Path(__file__).parent / "fixtures" / "geora_v1"


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter"])
def test_a_format_1_adapter_loads_exactly_and_saves_as_format_2(loader, no_decomposition, tmp_path):
    """An adapter written by format version 1 (``lora_A.factor``: the whole factor) is converted on load and its
    logits are those the old code computed, to float32 rounding; saving it again writes format 2.

    Not bit for bit: format 1's forward used both ``B`` and ``B - B0``; format 2 stores ``dB = B - B0`` and uses
    ``B0 + dB``, which differs from ``B`` by one float32 ulp where ``|B0|`` is small against the update (7 of the
    fixture's 256 entries of one matrix, none where the subtraction is exact)."""
    assert json.loads((V1_FIXTURE / "adapter_config.json").read_text())["geora_format_version"] == 1
    expected = load_file(V1_FIXTURE / "expected_logits.safetensors")["logits"]
    with base_check("raise"):
        if loader == "from_pretrained":
            model = PeftModel.from_pretrained(make_tiny_model(), V1_FIXTURE)
        else:
            model = get_peft_model(
                make_tiny_model(), GeoRAConfig(r=2, target_modules=["k_proj"], init_weights=False), "other"
            )
            model.load_adapter(V1_FIXTURE, adapter_name="default")
            model.set_adapter("default")
        torch.testing.assert_close(logits(model, tiny_inputs()), expected, rtol=1e-6, atol=1e-6)
    old = load_file(V1_FIXTURE / "adapter_model.safetensors")
    layer = model.base_model.model.model.layers[0].mlp.down_proj
    b, b0 = old["base_model.model.model.layers.0.mlp.down_proj.lora_B.factor"], layer.lora_B["default"].anchor
    assert torch.equal(layer.lora_B["default"].delta, b - b0)
    exact = (b * b0 > 0) & (b.abs() <= 2 * b0.abs()) & (b0.abs() <= 2 * b.abs())  # Sterbenz: B - B0 is exact ...
    assert exact.float().mean() > 0.8
    assert torch.equal((b0 + layer.lora_B["default"].delta)[exact], b[exact])  # ... so B0 + dB gives B back
    model.save_pretrained(tmp_path / "v2", selected_adapters=["default"])
    keys = load_file(tmp_path / "v2" / "adapter_model.safetensors").keys()
    assert keys and all(k.endswith((".delta", ".anchor")) for k in keys)
    assert json.loads((tmp_path / "v2" / "adapter_config.json").read_text())["geora_format_version"] == FORMAT_VERSION


def test_shape_mismatch(saved):
    folder, _, _ = saved
    model = make_tiny_model(intermediate_size=128)
    assert_fails_untouched(folder, model, ValueError, r"64 x 96 weight at module 'model.layers.0.mlp.down_proj'")


def test_adapter_for_another_architecture(saved):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder, _, _ = saved
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    assert_fails_untouched(folder, gpt2, ValueError, "another architecture")


# ---- export as a stock LoRA ----

EXPORT_CONFIGS = {
    "plain": GeoRAConfig(r=4),
    "rslora": GeoRAConfig(r=4, lora_alpha=12, use_rslora=True),
    "patterns": GeoRAConfig(r=4, rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 20}),
}


@pytest.mark.parametrize("name", sorted(EXPORT_CONFIGS))
def test_lora_export_loads_without_peft_geora(name, tmp_path):
    model = trained_geora(EXPORT_CONFIGS[name])
    inputs = tiny_inputs()
    expected = logits(model, inputs)
    base_dir = tmp_path / "base"
    make_tiny_model().save_pretrained(base_dir)
    peft_geora.save_as_lora(model, tmp_path / "api")
    model.save_pretrained(tmp_path / "geora")
    assert peft_geora_apps.cli.main(["export-lora", str(tmp_path / "geora"), str(tmp_path / "cli")]) == 0
    config = json.loads((tmp_path / "cli" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and not config["use_rslora"]
    torch.save(inputs, tmp_path / "inputs.pt")
    script = f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        from peft import PeftModel
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        for name in ("api", "cli"):
            base = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            model = PeftModel.from_pretrained(base, {str(tmp_path)!r} + "/" + name)
            plain = AutoModelForCausalLM.from_pretrained({str(base_dir)!r})
            plain.load_adapter({str(tmp_path)!r} + "/" + name)
            with torch.no_grad():
                torch.save([model(**inputs).logits, plain(**inputs).logits], {str(tmp_path)!r} + f"/{{name}}.pt")
        assert "peft_geora" not in sys.modules
    """
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=tmp_path)
    for name in ("api", "cli"):
        for out in torch.load(tmp_path / f"{name}.pt"):
            assert ((out - expected).norm() / expected.norm()).item() < 1e-5


def test_rank_k_export_is_the_best_rank_k_update_and_reports_its_error(tmp_path, capsys):
    """``rank=k`` writes, per module, the Eckart-Young optimum of the update at rank k (checked against a dense SVD of
    ``dW``), its relative error in ``geora_export.json``, and a plain LoraConfig that stock PEFT reads silently."""
    model = trained_geora(GeoRAConfig(r=4, rank_pattern={"q_proj": 2}))
    model.save_pretrained(tmp_path / "geora")
    peft_geora.save_as_lora(model, tmp_path / "api", rank=3)
    assert (
        peft_geora_apps.cli.main(["export-lora", str(tmp_path / "geora"), str(tmp_path / "cli"), "--rank", "3"]) == 0
    )
    assert "--max-lora-rank 3" in capsys.readouterr().out
    for name in ("api", "cli"):
        folder = tmp_path / name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 3 and config["peft_type"] == "LORA" and not config["use_rslora"]
        assert set(config) <= set(LoraConfig.__dataclass_fields__) | {"peft_type"}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            LoraConfig.from_pretrained(folder)
        errors = json.loads((folder / "geora_export.json").read_text())["relative_error"]
        tensors = load_file(folder / "adapter_model.safetensors")
        assert len(errors) == 14
        for module, layer in model.base_model.model.named_modules():
            if not hasattr(layer, "lora_A"):
                continue
            key = f"base_model.model.{module}"
            delta = layer.get_delta_weight("default").double()
            sigma = torch.linalg.svdvals(delta)
            k = min(3, 2 * layer.r["default"])
            optimum = float(sigma[k:].square().sum().sqrt() / sigma.square().sum().sqrt())
            scaling = config["alpha_pattern"].get(re.escape(module), config["lora_alpha"]) / a_rank(tensors, key)
            approx = scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()
            assert a_rank(tensors, key) == k
            assert math.isclose(errors[key], optimum, rel_tol=1e-6, abs_tol=1e-9)
            assert math.isclose(float((delta - approx).norm() / delta.norm()), optimum, rel_tol=1e-4, abs_tol=1e-7)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        peft_geora.save_as_lora(model, tmp_path / "bad", rank=0)


def a_rank(tensors: dict, key: str) -> int:
    return tensors[f"{key}.lora_A.weight"].shape[0]


def test_export_refuses_a_non_geora_folder(tmp_path):
    get_peft_model(make_tiny_model(), LoraConfig(r=2)).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="'LORA' adapter, not GEORA"):
        peft_geora.export_lora(tmp_path / "lora", tmp_path / "out")


# ---- the Hub ----


@pytest.fixture
def hub_calls(monkeypatch):
    """Intercept the Hub API: record repo creation and the files of each commit, no network."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoUrl

    calls = {"repos": [], "files": {}}

    def create_repo(self, repo_id, **kwargs):
        calls["repos"].append(repo_id)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            source = op.path_or_fileobj
            calls["files"][op.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else source
        return "commit"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def _card_and_config(files):
    card = files["README.md"].decode()
    config = json.loads(files["adapter_config.json"])
    return card, config


@pytest.mark.parametrize("export_lora", [False, True])
def test_push_to_hub(hub_calls, export_lora):
    model = trained_geora()
    model.peft_config["default"].base_model_name_or_path = "org/base-model"
    peft_geora.push_to_hub(model, "user/my-geora", export_lora=export_lora)
    assert hub_calls["repos"] == ["user/my-geora"]
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= hub_calls["files"].keys()
    card, config = _card_and_config(hub_calls["files"])
    assert config["peft_type"] == ("LORA" if export_lora else "GEORA")
    assert "- geora" in card and "base_model: org/base-model" in card
    assert 'from_pretrained("user/my-geora")' in card
    assert ("import peft_geora" in card) != export_lora


def test_save_pretrained_writes_the_geora_card(saved):
    folder, _, _ = saved
    card = (folder / "README.md").read_text()
    assert "- geora" in card and "import peft_geora" in card and str(folder) in card


# ---- merge / unmerge / unload ----


def test_merge_unmerge_unload_are_exact_where_the_math_allows():
    base = make_tiny_model()
    inputs = tiny_inputs()
    before = state_snapshot(base)
    base_logits = logits(base, inputs)
    model = trained_geora()
    adapted = logits(model, inputs)
    for safe in (False, True):
        model.merge_adapter(safe_merge=safe) if not safe else model.base_model.merge_adapter(safe_merge=True)
        torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)
        model.unmerge_adapter()
        torch.testing.assert_close(logits(model, inputs), adapted, rtol=1e-5, atol=1e-5)
    merged = trained_geora().merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    torch.testing.assert_close(logits(merged, inputs), adapted, rtol=1e-5, atol=1e-5)
    unloaded = trained_geora().unload()
    assert_bitwise_equal(before, state_snapshot(unloaded))
    assert torch.equal(logits(unloaded, inputs), base_logits)


def _merge_cycle_drift(model, cycles: int = 100) -> float:
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer.weight" in n}
    for _ in range(cycles):
        model.merge_adapter()
        model.unmerge_adapter()
    params = dict(model.named_parameters())
    return sum((params[n].float() - w.float()).abs().sum().item() for n, w in weights.items())


def test_bf16_merge_cycles_drift_no_more_than_lora():
    geora = trained_geora(GeoRAConfig(r=4), dtype=torch.bfloat16)
    lora = get_peft_model(make_tiny_model(dtype=torch.bfloat16), LoraConfig(r=4, target_modules="all-linear"))
    # give LoRA a delta of the same size as GeoRA's in every layer
    with torch.no_grad():
        for g, lo in zip(
            (m for m in geora.modules() if isinstance(m, LoraLayer)),
            (m for m in lora.modules() if isinstance(m, LoraLayer)),
        ):
            lo.lora_B["default"].weight.normal_()
            ratio = g.get_delta_weight("default").float().norm() / lo.get_delta_weight("default").float().norm()
            lo.lora_B["default"].weight.mul_(ratio)
    geora_drift, lora_drift = _merge_cycle_drift(geora), _merge_cycle_drift(lora)
    assert lora_drift > 0
    assert geora_drift <= 1.1 * lora_drift, (geora_drift, lora_drift)


# ---- several adapters ----


def test_several_adapters_each_exact():
    model = trained_geora()
    inputs = tiny_inputs()
    first = logits(model, inputs)
    with model.disable_adapter():
        base = logits(model, inputs)
    model.add_adapter("second", GeoRAConfig(r=4))
    model.set_adapter("second")
    assert torch.equal(logits(model, inputs), base)  # fresh adapter: exact at init
    model.set_adapter("default")
    assert torch.equal(logits(model, inputs), first)
    model.delete_adapter("second")
    assert torch.equal(logits(model, inputs), first)
    assert all(set(m.lora_A) == {"default"} for m in model.modules() if isinstance(m, LoraLayer))


def test_saved_non_default_adapter_round_trip(tmp_path):
    model = trained_geora()
    model.add_adapter("other", GeoRAConfig(r=2, rho=0.3))
    inputs = tiny_inputs()
    model.set_adapter("other")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".other." in n:
                p.add_(0.05)
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    loaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "other")
    assert torch.equal(logits(loaded, inputs), expected)


def test_readme_snippets_for_saving_and_sharing(tmp_path, monkeypatch, hub_calls):
    """Run the README's "Saving, sharing and serving" code blocks as written."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Saving, sharing and serving", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace = {"model": trained_geora(), "base_model": make_tiny_model(), "make_base_model": make_tiny_model}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert (tmp_path / "my-geora-adapter" / "adapter_config.json").exists()
    assert (tmp_path / "my-geora-as-lora" / "adapter_config.json").exists()
    assert (tmp_path / "my-geora-rank16" / "geora_export.json").exists()
    shutil.rmtree(tmp_path / "my-geora-adapter")


def test_a_loaded_adapter_no_longer_needs_its_folder(saved):
    """TRL's GRPOTrainer (beta > 0) and DPOTrainer (ref_model=None) call ``add_adapter("ref", peft_config["default"])``
    on a loaded adapter and copy "default"'s parameters into it; the source folder may be gone by then."""
    folder, inputs, expected = saved
    model = PeftModel.from_pretrained(make_tiny_model(), folder, is_trainable=True)
    shutil.rmtree(folder)
    model.add_adapter("ref", model.peft_config["default"])
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, param in params.items():
            if ".default." in name:
                params[name.replace(".default.", ".ref.")].copy_(param)
    model.eval()
    model.set_adapter("ref")
    assert torch.equal(logits(model, inputs), expected)  # same anchors (reused), same deltas: the same policy


def test_bin_serialization_round_trips_and_exports(saved, tmp_path, no_decomposition):
    """``save_pretrained(..., safe_serialization=False)`` writes ``adapter_model.bin``: it loads bit for bit, and the
    LoRA export and ``inspect`` read it too."""
    folder, inputs, expected = saved
    model = PeftModel.from_pretrained(make_tiny_model(), folder)
    model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    with base_check("raise"):
        reloaded = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "bin")
    assert torch.equal(logits(reloaded, inputs), expected)
    peft_geora.export_lora(tmp_path / "bin", tmp_path / "lora")
    lora = PeftModel.from_pretrained(make_tiny_model(), tmp_path / "lora")
    torch.testing.assert_close(logits(lora, inputs), expected, rtol=1e-5, atol=1e-5)
    from peft_geora_apps.inspect_adapter import load_adapter

    config, modules = load_adapter(tmp_path / "bin")
    assert config["peft_type"] == "GEORA" and len(modules) == 14 and all("A_delta" in m for m in modules.values())
