"""The initialisation report's summary per layer type and its printed table."""

from __future__ import annotations

import pytest

from peft_geora.diagnostics.report import REPORT_KEYS, format_table, layer_type, summarize


def stats(value: float, seconds: float) -> dict[str, float]:
    return {**{key: value for key in REPORT_KEYS}, "seconds": seconds}


def test_summary_averages_per_layer_type_sums_time_and_prints_every_group():
    per_module = {
        "model.layers.0.self_attn.q_proj": stats(0.2, 1.0),
        "model.layers.1.self_attn.q_proj": stats(0.4, 2.0),
        "model.layers.0.mlp.down_proj": stats(0.9, 4.0),
    }
    assert layer_type("model.layers.11.mlp.down_proj") == "mlp.down_proj" and layer_type("lm_head") == "lm_head"
    table = summarize(per_module)
    assert set(table) == {"self_attn.q_proj", "mlp.down_proj", "all"}
    assert table["self_attn.q_proj"]["jaccard"] == pytest.approx(0.3) and table["self_attn.q_proj"]["modules"] == 2
    assert table["self_attn.q_proj"]["seconds"] == 3.0 and table["all"]["seconds"] == 7.0
    assert table["all"]["captured_energy"] == pytest.approx(0.5)
    lines = format_table(table).splitlines()
    assert lines[0].split()[:2] == ["layer", "type"] and lines[-1].split()[0] == "all"  # "all" comes last
    q_proj = next(line.split() for line in lines if line.startswith("self_attn.q_proj"))
    assert q_proj == ["self_attn.q_proj", "2", *["0.300"] * (len(REPORT_KEYS) - 1), "3.00"]
