"""Whole attention heads as CAR's units: the accuracy lost when one head's output is zeroed.

"Without head h" means h's head_dim-wide slice of the concatenated head outputs (out_proj's input) is zero,
the same as deleting h's rows of q, k, v and its columns of out_proj (out_proj's bias stays, as a cut
attention keeps it). nn.MultiheadAttention applies out_proj functionally, or in one fused kernel in eval,
so no hook on out_proj sees that input (timm-style attention, qkv and proj, is treated the same way).
HeadEngine's private copy of the model therefore has each studied attention replaced by a _MaskedAttention
that recomputes the head outputs (netslim.probe.heads), scales each replicated image's heads by its row of the
mask and applies the out-projection; that the replacement computes what the attention computed is checked on
the evaluation images before any ablation is trusted. The mask batching, counting and greedy loop are the
filter engine's (engine.py, greedy.py): one slot per attention, one mask column per head.
"""

from __future__ import annotations

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.methods.car.engine import AblationEngine, Slot
from netslim.probe.heads import call_heads, from_heads, head_indices, out_projection
from netslim.surgery.heads import head_cuttable


class _MaskedAttention(nn.Module):
    """An attention whose head outputs are multiplied by `mask` ((batch, num_heads) or None)."""

    def __init__(self, mha: nn.Module) -> None:
        super().__init__()
        self.mha = mha
        self.mask: torch.Tensor | None = None

    def forward(self, *args: object, **kwargs: object) -> object:
        heads = call_heads(self.mha, args, kwargs)
        if heads is None:
            raise NetslimError("CAR ablates heads only of attention called without a mask")
        if self.mask is not None:
            per_feature = self.mask.repeat_interleave(self.mha.head_dim, dim=1)
            shape = (per_feature.shape[0],) + (1,) * (heads.dim() - 2) + (per_feature.shape[1],)
            heads = heads * per_feature.view(shape).to(heads.dtype)  # (batch, tokens or H, W, features)
        first = args[0] if args else next(iter(kwargs.values()))
        return from_heads(self.mha, heads, unbatched=isinstance(first, torch.Tensor) and first.dim() == 2)


class HeadEngine(AblationEngine):
    """Correct counts and cross-entropy on a fixed labelled set for many head masks at once.

    `attentions` names attention modules (nn.MultiheadAttention, timm-style); a mask has one column per head
    of each, in order (1 keeps the head, 0 ablates it). Every pass runs the whole network, each of the M masks
    on its own copy of the image batch."""

    def __init__(self, model: nn.Module, attentions: list[str], images: torch.Tensor, labels: torch.Tensor,
                 num_classes: int, *, device: str | torch.device = "cpu", batch_size: int = 256,
                 masks_per_pass: int = 32, precision: str = "fp32") -> None:
        self._load(model, images, labels, num_classes, device, batch_size, masks_per_pass, False, precision)
        reference = self._logits(self.images[:min(self.n, 16)])
        self.wrappers: list[_MaskedAttention] = []
        self.slots: list[Slot] = []
        start = 0
        for name in attentions:
            mha = self.model.get_submodule(name)
            if not head_cuttable(mha):
                raise NetslimError(f"{name!r} is a {type(mha).__name__}, not an attention netslim cuts heads of")
            wrapper = _MaskedAttention(mha)
            parent, _, leaf = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, leaf, wrapper)
            self.wrappers.append(wrapper)
            self.slots.append(Slot((name,), (name,), start, start + mha.num_heads))
            start += mha.num_heads
        self.width = start
        self.split, self._cache = None, None
        self.path = "full network per pass, head outputs recomputed and masked in each attention"
        mine = self._logits(self.images[:min(self.n, 16)])
        if not torch.allclose(mine, reference, rtol=1e-3, atol=1e-4 * (1 + float(reference.abs().max()))):
            raise NetslimError(f"the head outputs of {', '.join(attentions)} cannot be recomputed from their "
                               "weights (a variant netslim does not follow); leave heads whole (--opt heads=false)")

    @torch.inference_mode()
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()

    def _hooked(self, x: torch.Tensor, m: int, rows: torch.Tensor) -> torch.Tensor:
        x = x.repeat(m, *([1] * (x.dim() - 1)))
        for slot, wrapper in zip(self.slots, self.wrappers, strict=True):
            wrapper.mask = rows[:, slot.start:slot.end]
        try:
            return self.model(x)
        finally:
            for wrapper in self.wrappers:
                wrapper.mask = None


def zero_heads(model: nn.Module, attention: str, heads: list[int]) -> None:
    """Make `heads` of `attention` contribute nothing: their columns of the out-projection set to zero (exact,
    and it holds in nn.MultiheadAttention's fused path, which reads out_proj's weight)."""
    if not heads:
        return
    mha = model.get_submodule(attention)
    cols, _ = head_indices(heads, mha.head_dim, mha.num_heads)
    with torch.no_grad():
        out_projection(mha).weight[:, cols] = 0
