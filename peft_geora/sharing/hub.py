"""``push_to_hub``: upload a GeoRA adapter, in GeoRA format or as its LoRA export, with GeoRA's model card.

``PeftModel.push_to_hub`` (transformers') uploads the same files but replaces the card with the Hub's, so
:func:`push_to_hub` here is the one that keeps it.
"""

from __future__ import annotations

import tempfile
from importlib.metadata import version
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi

from ..format.card import write_model_card
from .export import save_as_lora


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
    api = HfApi(library_name="peft-geora", library_version=version("peft-geora"))
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
