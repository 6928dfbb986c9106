"""timm-style attention: one `qkv` Linear (E → 3 × heads × head_dim, rows q, k, v) and a `proj` it calls on the
concatenated head outputs, as timm's ViT, DeiT and MobileViT blocks are built.

Unlike nn.MultiheadAttention, its out-projection is a module called on the head outputs, so they could be
hooked; netslim still recomputes them from the call's input (as for nn.MultiheadAttention, netslim.probe.heads)
so that one rule serves both kinds, and the check that out-projection of them is the module's own output holds
for both. Which such modules netslim may cut is surgery's decision (netslim.surgery.heads.qkv_cuttable).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def is_qkv(m: nn.Module) -> bool:
    """Whether `m` is a timm-style attention: `qkv` Linear of 3 × num_heads × head_dim rows, `proj`, and both
    counts as attributes."""
    qkv, heads, dim = getattr(m, "qkv", None), getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    return (isinstance(qkv, nn.Linear) and isinstance(getattr(m, "proj", None), nn.Module)
            and isinstance(heads, int) and isinstance(dim, int) and qkv.out_features == 3 * heads * dim)


def qkv_heads(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The concatenated head outputs (batch, tokens, num_heads × head_dim) of an unmasked call on `x`, in eval;
    a module that computes its own (`head_outputs`, e.g. a window attention) gives them in its output's layout."""
    own = getattr(attn, "head_outputs", None)
    if callable(own):
        return own(x)
    b, n, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = _norm(attn, "q_norm", q), _norm(attn, "k_norm", k)
    out = F.scaled_dot_product_attention(q, k, v, scale=getattr(attn, "scale", None))
    return out.transpose(1, 2).reshape(b, n, h * d)


def _norm(attn: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """x through the attention's per-head norm `name` (timm's q_norm, k_norm), where it has one."""
    norm = getattr(attn, name, None)
    return norm(x) if norm is not None else x
