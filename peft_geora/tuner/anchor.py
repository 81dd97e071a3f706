"""The anchored factor modules that stand in for LoRA's ``lora_A`` / ``lora_B`` linears.

GeoRA keeps the base weight ``W`` untouched and subtracts the frozen initial product instead:
``h = W x + s (B A x - B0 A0 x)``. The trainable tensors are the *updates* of the factors, ``dA = A - A0`` and
``dB = B - B0`` (both exactly zero at initialisation), over the frozen initial factors ``A0``, ``B0``, because

    B A - B0 A0 = B0 dA + dB A0 + dB dA = (B0 + dB) dA + dB A0.

An RL update is small: kept as the difference of two large products (``A`` and ``A0`` stored in full), any rounding
to bf16 (a cast, a bf16 working copy, a bf16 export) rounds it at the scale of ``A`` and loses it. Kept as ``dA``,
``dB`` it is rounded at its own scale, as a LoRA's ``B A`` is. In float32 the gradients and optimizer steps are those
of training ``A`` and ``B`` directly; decoupled weight decay pulls towards the initial adapter instead of towards zero.

Putting the anchor inside the two factor modules makes every PEFT LoRA layer type compute the update, since they
all evaluate ``lora_B(lora_A(dropout(x))) * scaling``:

* :class:`AnchoredA` maps ``x`` to ``[dA x ; A0 x]`` (last dim ``2r``), one matmul.
* :class:`AnchoredB` maps ``[d ; h0]`` to ``(B0 + dB) d + dB h0``, one matmul.

At initialisation both ``d`` and ``dB`` are exactly zero, so the adapter's output is exactly zero in any dtype. The
forward costs what a rank-2r LoRA's does; the backward (:class:`_AnchoredProduct`) computes the rank-r weight
gradients of ``dA`` and ``dB`` only. The effective weights, for merging and export, are ``[dA; A0]`` (2r x in) and
``[B0 + dB, dB]`` (out x 2r): ``lora_B.weight @ lora_A.weight == B A - B0 A0``, a rank-2r LoRA on the original
``W`` in which each block is rounded relative to itself.

``dA``, ``dB`` are trainable parameters (``delta``); ``A0``, ``B0`` are persistent buffers (``anchor``), saved with
the adapter and never trained. Anchors are kept in float32 through every dtype cast of the model (``model.to``,
``.half()``, PEFT's placement on a bf16 base): a cast moves them to the new device but never rounds them, and they
are used in the delta's dtype. So loading a float32-saved adapter onto a bf16 base keeps it exactly.
Format version 1 stored ``A`` and ``B`` themselves (``factor``);
:func:`peft_geora.format.checkpoint.upgrade_state_dict` converts such state dicts on load.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ANCHOR_DTYPE = torch.float32


class _AnchoredProduct(torch.autograd.Function):
    """``u -> F.linear(u, weight)`` with ``weight`` built from a trainable ``delta`` and its frozen ``anchor``.

    ``kind="A"``: ``weight = [delta; anchor]`` (2r x in), so ``d delta = g[:, :r]^T u``.
    ``kind="B"``: ``weight = [anchor + delta, delta]`` (out x 2r), so ``d delta = g^T (u[:, :r] + u[:, r:])``.

    The forward is the plain ``F.linear`` (same values, autocast applies as usual); the backward computes the input
    gradient and an (r x in) / (out x r) delta gradient instead of the full rank-2r weight gradient, a third less
    backward work on the adapter. The concatenated weight is rebuilt in the backward rather than kept from the forward
    (autograd would keep one per layer, 2r x (in + out) values), and the backward runs under the forward's autocast
    state, like autograd's own. Under bf16 autocast ``d + h0`` is rounded to bf16 before B's gradient product, one
    rounding more than autograd's two products: B's gradient error is ~1.1x autograd's, at bf16's precision.
    """

    @staticmethod
    def weight(delta: torch.Tensor, anchor: torch.Tensor, kind: str) -> torch.Tensor:
        """The rank-2r weight the product applies: ``[delta; anchor]`` or ``[anchor + delta, delta]``."""
        if kind == "A":
            return torch.cat([delta, anchor], dim=0)
        return torch.cat([anchor + delta, delta], dim=1)

    @staticmethod
    def forward(ctx, u: torch.Tensor, delta: torch.Tensor, anchor: torch.Tensor, kind: str) -> torch.Tensor:  # noqa: ANN001
        device_type = u.device.type
        ctx.kind, ctx.autocast = kind, None  # None: a device without autocast (meta, ...)
        if torch.amp.is_autocast_available(device_type):
            enabled = torch.is_autocast_enabled(device_type)
            ctx.autocast = dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type), enabled=enabled)
        ctx.save_for_backward(u, delta, anchor)  # not the concatenated weight: rebuilt in backward, never stored
        return F.linear(u, _AnchoredProduct.weight(delta, anchor, kind))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:  # noqa: ANN001
        u, delta, anchor = ctx.saved_tensors
        rank = delta.shape[0] if ctx.kind == "A" else delta.shape[1]
        grad_u = grad_delta = None
        with torch.autocast(**ctx.autocast) if ctx.autocast else contextlib.nullcontext():
            if ctx.needs_input_grad[0]:
                grad_u = grad @ _AnchoredProduct.weight(delta, anchor, ctx.kind)
            if ctx.needs_input_grad[1]:
                g, inputs = grad.reshape(-1, grad.shape[-1]), u.reshape(-1, u.shape[-1])
                if ctx.kind == "A":
                    grad_delta = g[:, :rank].T @ inputs
                else:
                    grad_delta = g.T @ (inputs[:, :rank] + inputs[:, rank:])
        return grad_u, grad_delta, None, None


def effective_weight(delta: torch.Tensor, anchor: torch.Tensor, kind: str, experts: int = 1) -> torch.Tensor:
    """The rank-2r LoRA factor a GeoRA factor stands for: ``A' = [dA; A0]`` (``kind="A"``), ``B' = [B0 + dB, dB]``
    (``kind="B"``), with ``B' A' = B A - B0 A0``; in the delta's dtype.

    With ``experts > 1`` the tensors are laid out as PEFT's ``ParamWrapper`` lays out a LoRA on ``E`` stacked
    experts: ``A`` (E r x in) with the experts' blocks of r rows one after the other, ``B`` (out x r E) with column
    ``j E + e`` for rank ``j`` of expert ``e``; the result is the same layout at rank 2r per expert, so PEFT's own
    per-expert products apply to it unchanged.
    """
    if experts == 1:
        return _AnchoredProduct.weight(delta, anchor, kind)
    if kind == "A":
        d, a = (t.reshape(experts, -1, t.shape[-1]) for t in (delta, anchor))
        return torch.cat([d, a], dim=1).reshape(-1, delta.shape[-1])
    d, a = (t.reshape(t.shape[0], -1, experts) for t in (delta, anchor))
    return torch.cat([a + d, d], dim=1).reshape(delta.shape[0], -1)


class _Anchored(nn.Module):
    """A trainable ``delta`` (the update of a factor, zero at init) and its frozen float32 ``anchor``, one shape.

    ``awaiting_checkpoint`` marks NaN placeholders created for an adapter whose values come from a checkpoint (so no
    decomposition runs on load). Whatever loader fills them (PEFT's ``load_state_dict``, transformers' own loader),
    the first use notices real values and clears the mark; using unfilled placeholders raises.
    ``loaded_unchecked`` asks the base-weight fingerprint check (:mod:`peft_geora.format.fingerprint`) to look at this
    module once.
    """

    def __init__(
        self, delta: torch.Tensor, anchor: torch.Tensor, awaiting_checkpoint: bool = False, experts: int = 1
    ) -> None:
        super().__init__()
        if delta.shape != anchor.shape:
            raise ValueError(f"delta {tuple(delta.shape)} and anchor {tuple(anchor.shape)} must have one shape")
        # contiguous, like a tensor read from a checkpoint: the matmul kernel (and so the rounding) depends on layout
        self.delta = nn.Parameter(delta.contiguous())
        self.register_buffer("anchor", anchor.to(ANCHOR_DTYPE).contiguous(), persistent=True)
        self.awaiting_checkpoint = awaiting_checkpoint
        self.loaded_unchecked = False
        self.experts = experts  # > 1: the factors of E stacked experts, in PEFT's ParamWrapper layout

    def _no_expert_forward(self) -> None:
        if self.experts > 1:
            raise RuntimeError(
                "GeoRA: the factors of stacked experts are applied by their ParamWrapper (through the weight), not "
                "called on activations"
            )

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> _Anchored:
        """Apply a device/dtype move, keeping the anchor in float32 (it is moved, never rounded)."""
        anchor = self.anchor
        super()._apply(fn, recurse)
        if self.anchor.dtype != ANCHOR_DTYPE and anchor.dtype == ANCHOR_DTYPE:
            self.anchor = anchor.to(self.anchor.device)
        return self

    def anchor_like_delta(self) -> torch.Tensor:
        """The anchor in the delta's dtype, the dtype the products run in."""
        return self.anchor.to(self.delta.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "delta" in state_dict and prefix + "anchor" in state_dict:
            self.awaiting_checkpoint = False
            self.loaded_unchecked = True

    def resolve_checkpoint(self) -> bool:
        """Clear ``awaiting_checkpoint`` if a loader has filled the placeholders; True when ready."""
        filled = not (torch.isnan(self.anchor).any() or torch.isnan(self.delta).any())
        if self.awaiting_checkpoint and self.anchor.device.type != "meta" and filled:
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
    """``lora_A`` of GeoRA: ``x -> [dA x ; A0 x]``, with ``dA = A - A0`` and ``A0`` of shape (r x in).

    Its ``weight`` (for merging and export) is ``[dA; A0]`` (2r x in), the rank-2r LoRA A that pairs with
    ``[B0 + dB, dB]``.
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
        """Effective rank-2r LoRA A: ``[dA; A0]`` (2r x in), in the delta's dtype (see :func:`effective_weight`)."""
        return effective_weight(self.delta, self.anchor_like_delta(), "A", self.experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[dA x ; A0 x]``: exactly zero in the first half while ``dA == 0``."""
        self.check_ready()
        self._no_expert_forward()
        return _AnchoredProduct.apply(x, self.delta, self.anchor_like_delta(), "A")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank} (+{self.rank} anchored)"


class AnchoredB(_Anchored):
    """``lora_B`` of GeoRA: ``[d ; h0] -> (B0 + dB) d + dB h0``, with ``dB = B - B0`` and ``B0`` of shape (out x r).

    Its ``weight`` (for merging and export) is ``[B0 + dB, dB]`` (out x 2r), the rank-2r LoRA B that pairs with
    ``[dA; A0]``.
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
        """Effective rank-2r LoRA B: ``[B0 + dB, dB]`` (out x 2r), in the delta's dtype (:func:`effective_weight`)."""
        return effective_weight(self.delta, self.anchor_like_delta(), "B", self.experts)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """``[d ; h0] -> (B0 + dB) d + dB h0``; with ``d = dA x``, ``h0 = A0 x`` that is ``B A x - B0 A0 x``."""
        self._no_expert_forward()
        return _AnchoredProduct.apply(h, self.delta, self.anchor_like_delta(), "B")

    def extra_repr(self) -> str:
        return f"rank={self.rank} (+{self.rank} anchored), out_features={self.out_features}"
