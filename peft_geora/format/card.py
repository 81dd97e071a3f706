"""The model card of a saved adapter: GeoRA's tags, the base model and a usage snippet.

``PeftModel.save_pretrained`` writes PEFT's card; :meth:`peft_geora.GeoRAConfig.save_pretrained` then adds GeoRA's
part to it, and the LoRA export and :func:`peft_geora.push_to_hub` write it for their folders.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

CARD_MARKER = "<!-- peft-geora usage -->"
CARD_END = "<!-- /peft-geora usage -->"
TAGS = ("geora", "peft-geora")  # on the card and on the model (transformers' add_model_tags)

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
