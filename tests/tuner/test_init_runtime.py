"""Where the decomposition runs (``init_device``) and the progress bar over layers."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model

import peft_geora.tuner.init_runtime as init_runtime
from peft_geora import GeoRAConfig
from peft_geora.tuner.layer import GeoRALayer

from ..conftest import make_tiny_model


class RecordingBar:
    """Stands in for tqdm: remembers its total, its updates and whether it was closed."""

    made: list[RecordingBar] = []

    def __init__(self, total=None, **kwargs) -> None:  # noqa: ANN001
        self.total, self.kwargs, self.n, self.names, self.closed = total, kwargs, 0, [], False
        RecordingBar.made.append(self)

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.names.append(text)

    def update(self, n: int = 1) -> None:
        self.n += n

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    RecordingBar.made = []
    monkeypatch.setattr(init_runtime, "tqdm", RecordingBar)
    return RecordingBar.made


def geora_layers(model) -> list[str]:  # noqa: ANN001
    return [name for name, module in model.named_modules() if isinstance(module, GeoRALayer)]


@pytest.mark.parametrize("targets", [None, "all-linear", ["q_proj", "down_proj"]])
def test_progress_bar_counts_every_decomposed_layer(bars, targets):
    model = get_peft_model(make_tiny_model("llama"), GeoRAConfig(r=4, target_modules=targets))
    (bar,) = bars
    assert bar.total == bar.n == len(geora_layers(model)) > 0
    assert bar.closed and bar.kwargs["delay"] > 0
    assert {name.split(".")[-1] for name in bar.names} == {name.split(".")[-1] for name in geora_layers(model)}


def test_second_adapter_gets_its_own_bar_and_reused_layers_count(bars):
    model = get_peft_model(make_tiny_model("llama"), GeoRAConfig(r=4))
    model.add_adapter("other", GeoRAConfig(r=4))
    n = len(geora_layers(model))
    assert [bar.total for bar in bars] == [bar.n for bar in bars] == [n, n]
    assert "other" in bars[1].kwargs["desc"]


def test_no_bar_when_nothing_is_decomposed(bars, tmp_path):
    model = get_peft_model(make_tiny_model("llama"), GeoRAConfig(r=4, init_weights=False))
    assert bars == []
    model.save_pretrained(tmp_path)  # loading never decomposes either
    from peft import PeftModel

    PeftModel.from_pretrained(make_tiny_model("llama"), tmp_path)
    assert bars == []


def test_bar_is_closed_when_injection_fails(bars):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_peft_model(model, GeoRAConfig(r=4))
    assert all(bar.closed for bar in bars)


@pytest.mark.parametrize("bad", ["gpu0", 3, "cuda:x"])
def test_bad_init_device_is_refused(bad):
    with pytest.raises(ValueError, match=f"init_device must be 'auto' or a torch device.*{bad!r}"):
        GeoRAConfig(init_device=bad)


def test_auto_on_a_cpu_machine_is_the_cpu_path_bit_for_bit():
    if torch.cuda.is_available():
        pytest.skip("'auto' means the GPU here")
    auto = get_peft_model(make_tiny_model("llama"), GeoRAConfig(r=4))
    cpu = get_peft_model(make_tiny_model("llama"), GeoRAConfig(r=4, init_device="cpu"))
    auto_buffers, cpu_buffers = dict(auto.named_buffers()), dict(cpu.named_buffers())
    assert auto_buffers.keys() == cpu_buffers.keys() and sum(n.endswith(".anchor") for n in auto_buffers) == 2 * 14
    for name, anchor in auto_buffers.items():
        assert torch.equal(anchor, cpu_buffers[name]), name


def test_cuda_init_device_without_cuda_names_the_module_and_rolls_back():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    model = make_tiny_model("llama")
    with pytest.raises(RuntimeError, match=r"init_device='cuda' for target module 'model\.layers\.0\..*not available"):
        get_peft_model(model, GeoRAConfig(r=4, init_device="cuda"))
    assert not any(isinstance(m, GeoRALayer) for m in model.modules())


def test_auto_picks_the_gpu_for_a_cpu_weight_when_there_is_one(monkeypatch):
    from peft_geora.tuner.init_runtime import resolve_init_device

    cpu_weight, meta_weight = torch.zeros(2, 2), torch.zeros(2, 2, device="meta")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_init_device("auto", cpu_weight, "m") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_init_device("auto", cpu_weight, "m") == torch.device("cuda", 1)
    assert resolve_init_device("auto", meta_weight, "m") == torch.device("meta")  # not a CPU weight: its device
    assert resolve_init_device("cpu", cpu_weight, "m") == torch.device("cpu")
    assert resolve_init_device("cuda:0", cpu_weight, "m") == torch.device("cuda", 0)
