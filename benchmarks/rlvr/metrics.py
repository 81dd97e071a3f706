"""Metrics of the RLVR benchmark: forgetting (KL to the base model), effective weight updates and their geometry.

Every method is measured the same way, on the *effective* weights: the merged weight of each adapted linear layer
after training minus the original base weight. That is fair to methods that mutate the base (PEFT's PiSSA writes
``W - s B0 A0`` into it) and to full fine-tuning alike.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from peft_geora.diagnostics import update_diagnostics


def token_kl(policy_logits: torch.Tensor, base_logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of KL(policy || base) between next-token distributions."""
    logp = torch.log_softmax(policy_logits.float(), dim=-1)
    logq = torch.log_softmax(base_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    mask = mask.to(kl.dtype)
    return float((kl * mask).sum() / mask.sum().clamp_min(1))


@torch.no_grad()
def continuation_batch(model, tokenizer, prompts: list[str], new_tokens: int = 16) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """The base model's greedy continuations of chat prompts, as a batch with a mask over the continuation tokens.

    Computed once with the base model; KL is then measured on exactly these tokens for every method.
    """
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(
        **batch,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    attention = torch.cat([batch["attention_mask"], torch.ones_like(out[:, batch["input_ids"].shape[1] :])], dim=1)
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask[:, batch["input_ids"].shape[1] - 1 : -1] = True  # positions whose next token is a continuation token
    return {"input_ids": out, "attention_mask": attention, "kl_mask": mask}


@torch.no_grad()
def logits_on(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:  # noqa: ANN001
    was_training = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was_training)
    return logits


def effective_linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of every ``nn.Linear`` as the model computes them: adapters merged into a copy, names without PEFT's
    wrappers, the output head excluded."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = copy.deepcopy(model).merge_and_unload()
    return {
        name: module.weight.detach().float().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not name.endswith("lm_head")
    }


def update_geometry(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], k: int = 16) -> dict[str, float]:
    """Mean S_head (share of the update along W's top-k directions) and normalised spectral shift over layers."""
    rows = [update_diagnostics(before[name], after[name] - before[name], k) for name in before]
    moved = [row for row in rows if row["delta_norm"] > 0]
    if not moved:
        return {"s_head": 0.0, "spectral_shift": 0.0, "layers": 0}
    return {
        "s_head": sum(row["s_head"] for row in moved) / len(moved),
        "spectral_shift": sum(row["spectral_shift"] for row in moved) / len(moved),
        "layers": len(moved),
    }


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (the benchmark runs each method in its own process)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
