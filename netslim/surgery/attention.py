"""Opened attention: nn.MultiheadAttention with its in- and out-projection as Linear modules it calls, so that
each can be replaced (factorized) like any other Linear layer.

nn.MultiheadAttention keeps its in-projection as a bare packed Parameter and applies out_proj functionally: no
hook sees their inputs and no surgery can swap them. An OpenAttention computes the same function with `in_proj`
(Linear E → 3 × inner, rows q, k, v as in in_proj_weight) and `out_proj` called as modules. A Plan that factorizes
`<attn>.in_proj` or `<attn>.out_proj` of an nn.MultiheadAttention names no module the base has (in_proj) or one
the base uses functionally (out_proj); surgery opens that attention first (after any head cut, so a CutAttention
is opened), on the meta device too, so such Plans are sized and reloaded like any other.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.surgery.heads import CutAttention, UnmaskedAttention, attention_calls, cuttable

PROJECTIONS = ("in_proj", "out_proj")


class OpenAttention(UnmaskedAttention):
    """Multi-head attention (all the heads of an nn.MultiheadAttention, or a CutAttention's) whose projections
    are Linear submodules it calls; called as nn.MultiheadAttention is, without masks."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(embed_dim, num_heads, head_dim, bias, dropout, batch_first, device, dtype)
        self.in_proj = nn.Linear(embed_dim, 3 * num_heads * head_dim, bias=bias, device=device, dtype=dtype)

    @classmethod
    def of(cls, attn: nn.MultiheadAttention | CutAttention) -> OpenAttention:
        """`attn` opened: the same weights, moved from in_proj_weight/in_proj_bias into `in_proj`."""
        if not isinstance(attn, CutAttention | nn.MultiheadAttention) or not openable(attn):
            raise NetslimError(f"cannot open a {type(attn).__name__} (separate key/value widths, bias_k/bias_v or "
                               "add_zero_attn)")
        w = attn.in_proj_weight
        out = cls(attn.embed_dim, attn.num_heads, attn.head_dim, attn.in_proj_bias is not None, attn.dropout,
                  attn.batch_first, w.device, w.dtype)
        with torch.no_grad():
            out.in_proj.weight.copy_(w)
            out.out_proj.weight.copy_(attn.out_proj.weight)
            if attn.in_proj_bias is not None:
                out.in_proj.bias.copy_(attn.in_proj_bias)
            if out.out_proj.bias is not None:
                out.out_proj.bias.copy_(attn.out_proj.bias)
        return out.train(attn.training)


def openable(attn: nn.Module) -> bool:
    """Whether OpenAttention can stand for `attn`: a CutAttention, or an nn.MultiheadAttention CutAttention can
    stand for (one embed width for q, k and v, no bias_k/bias_v, no zero attention) whose out_proj has a bias
    exactly when its in-projection has."""
    if isinstance(attn, CutAttention):
        return True
    return isinstance(attn, nn.MultiheadAttention) and cuttable(attn) \
        and (attn.in_proj_bias is None) == (attn.out_proj.bias is None)


def attention_of(name: str, modules: dict[str, nn.Module]) -> str | None:
    """The attention whose projection `name` is (`<attn>.in_proj` or `<attn>.out_proj` of an nn.MultiheadAttention
    or CutAttention), None for any other name."""
    parent, _, leaf = name.rpartition(".")
    if leaf in PROJECTIONS and isinstance(modules.get(parent), nn.MultiheadAttention | CutAttention):
        return parent
    return None


def check_projections(names: Iterable[str], modules: dict[str, nn.Module]) -> None:
    """A NetslimError for a factorized projection of an attention that cannot be opened."""
    for name in names:
        attn = attention_of(name, modules)
        if attn is not None and not openable(modules[attn]):
            raise NetslimError(f"plan factorize: {name!r} belongs to an attention netslim cannot open (separate "
                               "key/value widths, bias_k/bias_v or add_zero_attn)")


def check_open_calls(model: nn.Module, names: Iterable[str], example: torch.Tensor) -> None:
    """Refuse to open attention the forward calls with a mask (OpenAttention applies none)."""
    modules = dict(model.named_modules())
    attns = sorted({a for n in names if (a := attention_of(n, modules)) is not None})
    calls = attention_calls(model, attns, example) if attns else {}
    for attn in attns:
        if calls.get(attn, (0, False))[1]:
            raise NetslimError(f"plan factorize: attention {attn!r} is called with a mask; netslim factorizes the "
                               "projections only of unmasked attention")


def open_attentions(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Replace (in place) every attention one of `names` is a projection of by its OpenAttention; their names."""
    modules = dict(model.named_modules())
    attns = sorted({a for n in names if (a := attention_of(n, modules)) is not None})
    for attn in attns:
        model.set_submodule(attn, OpenAttention.of(modules[attn]))
    return attns
