"""Sharing: a model card that says how to load a GeoRA adapter, and ``push_to_hub`` in GeoRA or LoRA format.

``PeftModel.save_pretrained`` already writes PEFT's card; GeoRA adds the ``geora`` tags, the base model and a usage
snippet to it. ``PeftModel.push_to_hub`` (transformers') uploads the same files but replaces the card with the Hub's,
so :func:`push_to_hub` here is the one that keeps it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData

CARD_MARKER = "<!-- peft-geora usage -->"
CARD_END = "<!-- /peft-geora usage -->"
TAGS = ("geora", "peft-geora")

_GEORA_USAGE = """{marker}
## Using this GeoRA adapter

A [GeoRA](https://arxiv.org/abs/2601.09361) adapter (PEFT type `GEORA`, anchored: the base weights are unchanged and
the frozen initial factors are stored with the adapter){base_sentence}. Load it with `peft-geora` installed:

```python
import peft_geora  # registers GeoRA with PEFT
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{location}")
```

Without `peft-geora` (stock PEFT, transformers `load_adapter`, vLLM), export it as a plain rank-2r LoRA first:
`peft-geora export-lora {location} exported-lora`.
{end}
"""

_LORA_USAGE = """{marker}
## Using this adapter

A plain rank-2r LoRA exported from a [GeoRA](https://arxiv.org/abs/2601.09361) adapter with `peft-geora`
(`B' = [B, -B0]`, `A' = [A; A0]`){base_sentence}. It loads with stock PEFT, transformers' `load_adapter` and LoRA
serving engines, no extra package needed:

```python
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("{location}")
```
{end}
"""


def write_model_card(
    folder: str | os.PathLike, base_model: str | None, export: bool = False, location: str | None = None
) -> Path:
    """Create or update ``folder/README.md`` with the GeoRA tags, the base model and a usage snippet.

    The snippet sits between two markers at the top of the card and is replaced on every call.
    """
    path = Path(folder) / "README.md"
    card = ModelCard.load(path) if path.exists() else ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    tags = set(card.data.tags or []) | set(TAGS) | ({"lora"} if export else set())
    card.data.tags = sorted(tags)
    if base_model:
        card.data.base_model = base_model
    text = card.text
    if CARD_MARKER in text and CARD_END in text:
        text = text[: text.index(CARD_MARKER)] + text[text.index(CARD_END) + len(CARD_END) :].lstrip("\n")
    template = _LORA_USAGE if export else _GEORA_USAGE
    base_sentence = f" for `{base_model}`" if base_model else ""
    usage = template.format(
        marker=CARD_MARKER, end=CARD_END, base_sentence=base_sentence, location=location or str(folder)
    )
    card.text = usage + "\n" + text
    card.save(path)
    return path


def push_to_hub(
    peft_model,  # noqa: ANN001
    repo_id: str,
    *,
    export_lora: bool = False,
    adapter_name: str = "default",
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    create_pr: bool = False,
):
    """Upload ``adapter_name`` of a GeoRA model: GeoRA format by default, the rank-2r LoRA export if asked.

    Returns the ``CommitInfo`` of the upload.
    """
    from . import __version__
    from .export import save_as_lora

    api = HfApi(library_name="peft-geora", library_version=__version__)
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    config = peft_model.peft_config[adapter_name]
    with tempfile.TemporaryDirectory() as tmp:
        if export_lora:
            save_as_lora(peft_model, tmp, adapter_name)
        else:
            peft_model.save_pretrained(tmp, selected_adapters=[adapter_name])
            if adapter_name != "default":  # PEFT puts a non-default adapter in a subfolder
                for item in (Path(tmp) / adapter_name).iterdir():
                    item.replace(Path(tmp) / item.name)
                (Path(tmp) / adapter_name).rmdir()
        write_model_card(tmp, config.base_model_name_or_path, export=export_lora, location=repo_id)
        message = commit_message or ("Upload GeoRA adapter as LoRA" if export_lora else "Upload GeoRA adapter")
        operations = [
            CommitOperationAdd(path_or_fileobj=str(path), path_in_repo=path.relative_to(tmp).as_posix())
            for path in sorted(Path(tmp).rglob("*"))
            if path.is_file()
        ]
        return api.create_commit(
            repo_id=repo_id,
            operations=operations,
            commit_message=message,
            token=token,
            revision=revision,
            create_pr=create_pr,
        )
