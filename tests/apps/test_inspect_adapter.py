"""``peft-geora inspect``: saved GeoRA and LoRA adapters, base weights read from safetensors, table + PNG + JSON."""

from __future__ import annotations

import json

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config

from peft_geora import GeoRAConfig
from peft_geora.diagnostics import s_head, update_diagnostics
from peft_geora_apps.cli import main
from peft_geora_apps.inspect_adapter import inspect_adapter

from ..conftest import tiny_inputs
from ..moe_models import build, geora_config, perturb, wrappers
from .conftest import expected_diagnostics, saved_adapter, table_rows


def test_geora_table_png_and_json_match_direct_diagnostics(geora_adapter, tmp_path, capsys):
    model, base_dir, adapter_dir = geora_adapter
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    png, js = tmp_path / "heat.png", tmp_path / "rows.json"
    assert main(["inspect", str(adapter_dir), "--png", str(png), "--json", str(js)]) == 0  # base from the config
    expected = expected_diagnostics(model)
    table = table_rows(capsys.readouterr().out)
    assert set(table) == set(expected) and len(table) == 14
    for module, cells in table.items():
        assert cells[1] == "geora"
        assert float(cells[6]) == pytest.approx(expected[module]["s_head"], rel=1e-4)
        assert float(cells[7]) == pytest.approx(expected[module]["spectral_shift"], rel=1e-4)
        assert float(cells[4]) == pytest.approx(expected[module]["delta_norm"], rel=1e-4)
    assert table["model.layers.0.self_attn.q_proj"][3] == "2"  # rank_pattern honoured
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    for row in json.loads(js.read_text()):
        for key in ("s_head", "spectral_shift", "principal_angle", "relative_norm"):
            assert row[key] == pytest.approx(expected[row["module"]][key], rel=1e-5, abs=1e-7), (row["module"], key)


def test_lora_adapter_with_explicit_base_and_top_k(lora_adapter, capsys):
    model, base_dir, adapter_dir = lora_adapter
    assert main(["inspect", str(adapter_dir), "--base", str(base_dir), "--top-k", "1"]) == 0
    expected = expected_diagnostics(model, top_k=1)
    table = table_rows(capsys.readouterr().out)
    assert set(table) == set(expected)
    for module, cells in table.items():
        assert cells[1] == "lora"
        assert float(cells[6]) == pytest.approx(expected[module]["s_head"], rel=1e-4)
        assert float(cells[7]) == pytest.approx(expected[module]["spectral_shift"], rel=1e-4)


def test_gpt2_conv1d_adapter_is_transposed_right(tmp_path):
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config)
    geora = GeoRAConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    model, base_dir, adapter_dir = saved_adapter(tmp_path, base, geora, ("delta",), 0.01, "gpt2")
    rows, _ = inspect_adapter(adapter_dir, base=base_dir)
    expected = expected_diagnostics(model)
    assert {r["module"] for r in rows} == set(expected) and rows[0]["shape"] in {(96, 32), (128, 32)}
    for row in rows:
        assert row["s_head"] == pytest.approx(expected[row["module"]]["s_head"], rel=1e-5, abs=1e-7)


def test_pissa_adapter_gets_a_note(lora_adapter):
    _, base_dir, adapter_dir = lora_adapter
    config_path = adapter_dir / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["init_lora_weights"] = "pissa_niter_4"
    config_path.write_text(json.dumps(config))
    rows, notes = inspect_adapter(adapter_dir, base=base_dir)
    assert rows and any("RESIDUAL" in note for note in notes)
    with pytest.raises(KeyError, match="no weight"):
        inspect_adapter(adapter_dir, base=_other_base(adapter_dir.parent))


def _other_base(tmp_path):
    folder = tmp_path / "other_base"
    AutoModelForCausalLM.from_config(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    return folder


def test_s_head_column_changes_with_top_k(geora_adapter):
    model, base_dir, adapter_dir = geora_adapter
    rows, _ = inspect_adapter(adapter_dir, base=base_dir, top_k=1)
    layer = dict(model.named_modules())["base_model.model.model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        direct = s_head(layer.get_base_layer().weight, layer.get_delta_weight("default"), 1)
    row = next(r for r in rows if r["module"] == "model.layers.0.mlp.up_proj")
    assert row["s_head"] == pytest.approx(direct, rel=1e-5)
    rows, _ = inspect_adapter(adapter_dir, base=base_dir, top_k=None)  # each module's adapter rank
    layer = dict(model.named_modules())["base_model.model.model.layers.0.self_attn.q_proj"]  # rank_pattern: 2
    with torch.no_grad():
        direct = s_head(layer.get_base_layer().weight, layer.get_delta_weight("default"), 2)
    row = next(r for r in rows if r["module"] == "model.layers.0.self_attn.q_proj")
    assert row["s_head"] == pytest.approx(direct, rel=1e-5)


def test_png_without_matplotlib_says_what_to_install_before_any_work(geora_adapter, tmp_path, monkeypatch):
    import importlib.util

    import peft_geora_apps.inspect_adapter as inspect_adapter

    _, base_dir, adapter_dir = geora_adapter
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real_find_spec(name, *a)
    )
    monkeypatch.setattr(inspect_adapter, "inspect_adapter", pytest.fail)  # refused before reading anything
    args = ["inspect", str(adapter_dir), "--base", str(base_dir), "--png", str(tmp_path / "x.png")]
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'peft-geora\[demo\]'"):
        main(args)


# ---- stacked mixture-of-experts parameters: analysed expert by expert ----


def _train_a_little(model: torch.nn.Module, steps: int = 3) -> None:
    """A few AdamW steps on a language-model loss (every expert sees tokens with top-2 routing of 4 experts)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for step in range(steps):
        ids = tiny_inputs(batch=4, seq=16, seed=step)["input_ids"]
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def _per_expert_expected(model, top_k: int = 16) -> dict[str, dict[str, float]]:
    """update_diagnostics on each expert's W_e, dW_e (out x in), from the in-memory PeftModel, by hand."""
    out = {}
    for key, wrapper in wrappers(model).items():
        if wrapper.num_experts == 1:
            continue
        with torch.no_grad():
            weight, delta = wrapper.get_param().detach(), wrapper.get_delta_weight("default").detach()
        if not wrapper._did_swap_in_out_features:  # gpt-oss: stored (E, in, out)
            weight, delta = weight.transpose(1, 2), delta.transpose(1, 2)
        for e in range(weight.shape[0]):
            out[f"{key}[{e}]"] = update_diagnostics(weight[e], delta[e], top_k)
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "mixtral"])
def test_stacked_experts_are_analysed_per_expert(arch, tmp_path, capsys, monkeypatch):
    import peft_geora_apps.inspect_adapter as inspect_module

    build(arch).save_pretrained(tmp_path / "base")  # Qwen3-MoE / Mixtral: saved per expert, gpt-oss: stacked
    model = get_peft_model(build(arch), geora_config(arch))
    if arch == "mixtral":
        perturb(model)
    else:
        _train_a_little(model)
    model.save_pretrained(tmp_path / "adapter")
    expected = _per_expert_expected(model)
    assert len(expected) == 2 * 2 * 4  # layers x (gate_up, down) x experts
    rows, notes = inspect_adapter(tmp_path / "adapter", base=tmp_path / "base")
    by_module = {row["module"]: row for row in rows}
    for module, stats in expected.items():
        row = by_module[module]
        assert row["kind"] == "geora" and row["expert"] == int(module[-2])
        for key in ("s_head", "spectral_shift", "principal_angle", "relative_norm", "delta_norm"):
            assert row[key] == pytest.approx(stats[key], rel=1e-4, abs=1e-6), (module, key)
    for parameter in {m.rsplit("[", 1)[0] for m in expected}:  # the parameter's row: the mean over its experts
        members = [by_module[f"{parameter}[{e}]"] for e in range(4)]
        assert by_module[parameter]["experts"] == 4 and len(by_module[parameter]["shape"]) == 3
        for key in ("s_head", "spectral_shift", "relative_norm"):
            assert by_module[parameter][key] == pytest.approx(sum(m[key] for m in members) / 4, rel=1e-9)
    # the attention projections are read as before
    for name, module in model.named_modules():
        if name.endswith("self_attn.q_proj"):
            with torch.no_grad():
                stats = update_diagnostics(module.get_base_layer().weight, module.get_delta_weight("default"), 16)
            row = by_module[name.removeprefix("base_model.model.")]
            assert row["s_head"] == pytest.approx(stats["s_head"], rel=1e-4, abs=1e-7)
    assert any("expert by expert" in note for note in notes)
    if arch != "gpt_oss":  # the router, a 2-D parameter (Mixtral's is saved as block_sparse_moe.gate.weight)
        router = wrappers(model)["model.layers.1.mlp.gate.weight"]
        with torch.no_grad():
            stats = update_diagnostics(router.get_param(), router.get_delta_weight("default"), 16)
        for key in ("s_head", "spectral_shift", "delta_norm"):
            assert by_module["model.layers.1.mlp.gate"][key] == pytest.approx(stats[key], rel=1e-4, abs=1e-7)

    # the printed table shows at most EXPERTS_SHOWN experts per parameter and says so; --json holds all of them
    monkeypatch.setattr(inspect_module, "EXPERTS_SHOWN", 2)
    js = tmp_path / "rows.json"
    assert main(["inspect", str(tmp_path / "adapter"), "--base", str(tmp_path / "base"), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    table = table_rows(out)
    gate_up = "model.layers.0.mlp.experts.gate_up_proj"
    assert gate_up in table and f"{gate_up}[1]" in table and f"{gate_up}[2]" not in table
    assert "at most 2 experts per parameter" in out and "mean mlp.experts.gate_up_proj" in out
    assert {row["module"] for row in json.loads(js.read_text())} == set(by_module)


def test_inspect_analyses_the_stacked_experts(tmp_path, capsys):
    build("qwen3_moe").save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(build("qwen3_moe"), geora_config("qwen3_moe"))
    perturb(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    assert main(["inspect", str(tmp_path / "adapter"), "--base", str(tmp_path / "base")]) == 0
    out = capsys.readouterr().out
    assert "4 parameters of stacked experts analysed expert by expert" in out and "model.layers.0.mlp.gate " in out
    assert "model.layers.0.mlp.experts.gate_up_proj[3] " in out  # per expert: see the test above


def test_square_experts_orientation_comes_from_the_model_type():
    from peft_geora_apps.inspect_adapter import experts_as_out_in

    stored = torch.randn(3, 5, 5)
    same, note = experts_as_out_in(stored, 5, 5, "qwen3_moe", "p")
    assert same is stored and "(E, out, in)" in note
    flipped, note = experts_as_out_in(stored, 5, 5, "gpt_oss", "p")
    assert torch.equal(flipped, stored.transpose(1, 2)) and "(E, in, out)" in note
    rect = torch.randn(3, 4, 6)
    assert experts_as_out_in(rect, 6, 4, None, "p")[0].shape == (3, 6, 4)  # stored (E, in, out)
    assert experts_as_out_in(rect, 4, 6, None, "p")[0] is rect
    with pytest.raises(ValueError, match="does not fit"):
        experts_as_out_in(rect, 5, 6, None, "p")
