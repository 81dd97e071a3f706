"""The anchored factor modules that stand in for LoRA's ``lora_A`` / ``lora_B`` linears.

GeoRA keeps the base weight ``W`` untouched and subtracts the frozen initial product instead:
``h = W x + s (B A x - B0 A0 x)``. Putting the anchor inside the two factor modules makes every PEFT LoRA layer
type compute that, since they all evaluate ``lora_B(lora_A(dropout(x))) * scaling``:

* :class:`AnchoredA` maps ``x`` to ``[(A - A0) x ; A0 x]`` (last dim ``2r``), one matmul.
* :class:`AnchoredB` maps ``[d ; h0]`` to ``B d + (B - B0) h0``, one matmul.

Together that is ``B A x - B0 A0 x``. At initialisation (``A == A0``, ``B == B0``) both differences are exactly zero,
so the adapter's output is exactly zero in any dtype, and no full-size subtraction is spent on the activations (the
forward costs what a rank-2r LoRA's does). The backward (:class:`_AnchoredProduct`) computes the weight gradient of
``A`` and ``B`` only, rank r each, where autograd through the concatenated rank-2r weights would also compute the
frozen anchors' share and throw it away. The effective weights, for export and inspection, are ``[A; A0]`` and
``[B, -B0]``: ``lora_B.weight @ lora_A.weight == B A - B0 A0``, so the adapter *is* a rank-2r LoRA on the original
``W``, which is how it is exported. ``A`` and ``B`` are trainable parameters (``factor``); ``A0`` and ``B0`` are
persistent buffers (``anchor``), saved with the adapter and never trained.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


class _AnchoredProduct(torch.autograd.Function):
    """``u -> F.linear(u, weight)`` with ``weight`` built from a trainable ``factor`` and its frozen ``anchor``.

    ``kind="A"``: ``weight = [factor - anchor; anchor]`` (2r x in), so ``d factor = g[:, :r]^T u``.
    ``kind="B"``: ``weight = [factor, factor - anchor]`` (out x 2r), so ``d factor = g^T (u[:, :r] + u[:, r:])``.

    The forward is the plain ``F.linear`` (same values, autocast applies as usual); the backward computes the input
    gradient and an (r x in) / (out x r) factor gradient instead of the full rank-2r weight gradient, a third less
    backward work on the adapter. The concatenated weight is rebuilt in the backward rather than kept from the forward
    (autograd would keep one per layer, 2r x (in + out) values), and the backward runs under the forward's autocast
    state, like autograd's own. Under bf16 autocast ``d + h0`` is rounded to bf16 before B's gradient product, one
    rounding more than autograd's two products: B's gradient error is ~1.1x autograd's, at bf16's precision.
    """

    @staticmethod
    def weight(factor: torch.Tensor, anchor: torch.Tensor, kind: str) -> torch.Tensor:
        """The rank-2r weight the product applies: ``[factor - anchor; anchor]`` or ``[factor, factor - anchor]``."""
        if kind == "A":
            return torch.cat([factor - anchor, anchor], dim=0)
        return torch.cat([factor, factor - anchor], dim=1)

    @staticmethod
    def forward(ctx, u: torch.Tensor, factor: torch.Tensor, anchor: torch.Tensor, kind: str) -> torch.Tensor:  # noqa: ANN001
        device_type = u.device.type
        ctx.kind, ctx.autocast = kind, None  # None: a device without autocast (meta, ...)
        if torch.amp.is_autocast_available(device_type):
            enabled = torch.is_autocast_enabled(device_type)
            ctx.autocast = dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type), enabled=enabled)
        ctx.save_for_backward(u, factor, anchor)  # not the concatenated weight: rebuilt in backward, never stored
        return F.linear(u, _AnchoredProduct.weight(factor, anchor, kind))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:  # noqa: ANN001
        u, factor, anchor = ctx.saved_tensors
        rank = factor.shape[0] if ctx.kind == "A" else factor.shape[1]
        grad_u = grad_factor = None
        with torch.autocast(**ctx.autocast) if ctx.autocast else contextlib.nullcontext():
            if ctx.needs_input_grad[0]:
                grad_u = grad @ _AnchoredProduct.weight(factor, anchor, ctx.kind)
            if ctx.needs_input_grad[1]:
                g, inputs = grad.reshape(-1, grad.shape[-1]), u.reshape(-1, u.shape[-1])
                if ctx.kind == "A":
                    grad_factor = g[:, :rank].T @ inputs
                else:
                    grad_factor = g.T @ (inputs[:, :rank] + inputs[:, rank:])
        return grad_u, grad_factor, None, None


class _Anchored(nn.Module):
    """A trainable ``factor`` and a frozen ``anchor`` of the same shape.

    ``awaiting_checkpoint`` marks NaN placeholders created for an adapter whose values come from a checkpoint (so no
    decomposition runs on load). Whatever loader fills them (PEFT's ``load_state_dict``, transformers' own loader),
    the first use notices real values and clears the mark; using unfilled placeholders raises.
    ``loaded_unchecked`` asks the base-weight fingerprint check (:mod:`peft_geora.fingerprint`) to look at this
    module once.
    """

    def __init__(self, factor: torch.Tensor, anchor: torch.Tensor, awaiting_checkpoint: bool = False) -> None:
        super().__init__()
        if factor.shape != anchor.shape:
            raise ValueError(f"factor {tuple(factor.shape)} and anchor {tuple(anchor.shape)} must have one shape")
        # contiguous, like a tensor read from a checkpoint: the matmul kernel (and so the rounding) depends on layout
        self.factor = nn.Parameter(factor.contiguous())
        self.register_buffer("anchor", anchor.contiguous(), persistent=True)
        self.awaiting_checkpoint = awaiting_checkpoint
        self.loaded_unchecked = False

    def anchor_like_factor(self) -> torch.Tensor:
        """The anchor in the factor's dtype (PEFT may upcast parameters but not buffers)."""
        return self.anchor.to(self.factor.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "factor" in state_dict and prefix + "anchor" in state_dict:
            self.awaiting_checkpoint = False
            self.loaded_unchecked = True

    def resolve_checkpoint(self) -> bool:
        """Clear ``awaiting_checkpoint`` if a loader has filled the placeholders; True when ready."""
        if self.awaiting_checkpoint and self.anchor.device.type != "meta" and not torch.isnan(self.anchor).any():
            self.awaiting_checkpoint = False
            self.loaded_unchecked = True
        return not self.awaiting_checkpoint

    def check_ready(self) -> None:
        if self.awaiting_checkpoint and not self.resolve_checkpoint():
            raise RuntimeError(
                "GeoRA: this adapter was created from a saved config (init_from_checkpoint=True) to receive its "
                "factors from a checkpoint, but none were loaded. Load it with PeftModel.from_pretrained / "
                "load_adapter, or set config.init_from_checkpoint=False to initialise a new adapter."
            )


class AnchoredA(_Anchored):
    """``lora_A`` of GeoRA: ``x -> [(A - A0) x ; A0 x]``, with ``A`` and ``A0`` of shape (r x in).

    Its ``weight`` (for export and inspection) is ``[A; A0]``, the rank-2r LoRA A that pairs with ``[B, -B0]``.
    """

    # shapes are read from the anchor: a buffer, never emptied by ZeRO-3's parameter partitioning

    @property
    def rank(self) -> int:
        return self.anchor.shape[0]

    @property
    def in_features(self) -> int:
        return self.anchor.shape[1]

    @property
    def out_features(self) -> int:
        return 2 * self.rank

    @property
    def weight(self) -> torch.Tensor:
        """Effective rank-2r LoRA A: ``[A; A0]`` (2r x in)."""
        return torch.cat([self.factor, self.anchor_like_factor()], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[(A - A0) x ; A0 x]``: exactly zero in the first half while ``A == A0``."""
        self.check_ready()
        return _AnchoredProduct.apply(x, self.factor, self.anchor_like_factor(), "A")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank} (+{self.rank} anchored)"


class AnchoredB(_Anchored):
    """``lora_B`` of GeoRA: ``[d ; h0] -> B d + (B - B0) h0``, with ``B`` and ``B0`` of shape (out x r).

    Its ``weight`` (for export and inspection) is ``[B, -B0]``, the rank-2r LoRA B that pairs with ``[A; A0]``.
    """

    @property
    def rank(self) -> int:
        return self.anchor.shape[1]

    @property
    def in_features(self) -> int:
        return 2 * self.rank

    @property
    def out_features(self) -> int:
        return self.anchor.shape[0]

    @property
    def bias(self) -> None:
        return None

    @property
    def weight(self) -> torch.Tensor:
        """Effective rank-2r LoRA B: ``[B, -B0]`` (out x 2r)."""
        return torch.cat([self.factor, -self.anchor_like_factor()], dim=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[d ; h0] -> B d + (B - B0) h0``: with ``d = (A - A0) x`` from AnchoredA, ``B A x - B0 A0 x``."""
        return _AnchoredProduct.apply(h, self.factor, self.anchor_like_factor(), "B")

    def extra_repr(self) -> str:
        return f"rank={self.rank} (+{self.rank} anchored), out_features={self.out_features}"
