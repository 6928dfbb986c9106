"""Per-head outputs of multi-head attention (nn.MultiheadAttention, or timm-style: netslim.probe.qkv), streamed
into statistics like any layer's response.

A head's response is its `head_dim`-wide slice of the concatenated head outputs, the input of out_proj. That
input cannot be hooked: nn.MultiheadAttention applies out_proj functionally (or in a fused kernel in eval).
A forward hook on the attention recomputes it from the call's query, key and value and the in_proj weights,
and checks that out_proj of it is the module's own output, so an attention this recomputation does not
follow is refused instead of mis-measured. Tokens are reduced per image as for a Linear on tokens
(reduce_response): max or mean over them, or every token a sample.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netslim.errors import NetslimError
from netslim.probe.collect import REDUCE_MODES, _split, reduce_response
from netslim.probe.qkv import is_qkv, qkv_heads
from netslim.probe.stats import LayerStats

_MHA_CALL = inspect.signature(nn.MultiheadAttention.forward)


def head_qkv(mha: nn.Module, query: torch.Tensor, key: torch.Tensor,
             value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (batch, heads, tokens, head_dim) from an attention's in-projection, for a batched or unbatched
    call: the packed `in_proj_weight`, `in_proj_bias` (nn.MultiheadAttention, surgery's CutAttention) or a module
    `in_proj` (E → 3 × inner, rows q, k, v; surgery's OpenAttention), called once for self-attention so that its
    hooks see each input once; also `num_heads`, `head_dim`, `batch_first`."""
    same = query is key and key is value
    if query.dim() == 2:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    elif not mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    proj = getattr(mha, "in_proj", None)
    if isinstance(proj, nn.Module):
        parts = proj(query).chunk(3, -1) if same else [proj(x).chunk(3, -1)[i] for i, x in
                                                        enumerate((query, key, value))]
    else:
        biases = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
        parts = [F.linear(x, w, b) for x, w, b in zip((query, key, value), mha.in_proj_weight.chunk(3), biases,
                                                      strict=True)]
    q, k, v = (x.unflatten(-1, (mha.num_heads, mha.head_dim)).transpose(1, 2) for x in parts)
    return q, k, v


def head_outputs(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> torch.Tensor:
    """The concatenated head outputs (batch, tokens, num_heads × head_dim) of an unmasked call, in eval."""
    out = F.scaled_dot_product_attention(*head_qkv(mha, query, key, value))
    return out.transpose(1, 2).flatten(2)


def batch_first(attn: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """An attention's output (or a signal shaped like it) as (batch, tokens, features), whatever its layout."""
    if is_qkv(attn):
        return t
    return t.unsqueeze(0) if t.dim() == 2 else t if attn.batch_first else t.transpose(0, 1)


def out_projection(attn: nn.Module) -> nn.Module:
    """The module mapping an attention's concatenated head outputs to its output: out_proj, or timm's proj."""
    return attn.proj if is_qkv(attn) else attn.out_proj


def in_projection(attn: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An attention's packed q/k/v weight and bias (rows: q, k, v blocks of num_heads × head_dim each)."""
    proj = attn.qkv if is_qkv(attn) else getattr(attn, "in_proj", None)
    if isinstance(proj, nn.Linear):
        return proj.weight, proj.bias
    return attn.in_proj_weight, attn.in_proj_bias


def head_indices(heads: list[int], head_dim: int, num_heads: int,
                 device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cols, rows) of `heads`: their features in the concatenated head outputs (the out-projection's columns)
    and their rows of the packed q/k/v in-projection (q, k and v blocks of num_heads × head_dim each)."""
    cols = torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long, device=device)
    return cols, torch.cat([cols + part * num_heads * head_dim for part in range(3)])


def masked(bound: dict[str, Any]) -> bool:
    """Whether an attention call (its arguments bound to the module's forward) applies a mask."""
    return any(bound.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or bool(bound.get("is_causal"))


def bind_call(attn: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A hook's args and kwargs bound to the attention's forward parameters (nn.MultiheadAttention's for it and
    netslim's attention modules, the module's own for a timm-style one)."""
    call = inspect.signature(type(attn).forward) if is_qkv(attn) else _MHA_CALL
    return call.bind(attn, *args, **kwargs).arguments


def call_heads(attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The head outputs (batch, tokens, inner) of one call of an attention, from a hook's args and kwargs; None
    for a masked call (the recomputation applies no mask)."""
    bound = bind_call(attn, args, kwargs)
    if masked(bound):
        return None
    if is_qkv(attn):
        return qkv_heads(attn, bound["x"])
    return head_outputs(attn, bound["query"], bound["key"], bound["value"])  # type: ignore[arg-type]


def from_heads(attn: nn.Module, heads: torch.Tensor, unbatched: bool = False) -> Any:
    """What the attention returns (in eval) for the head outputs `heads` (batch, tokens, inner): out-projection
    of them, in the module's layout and return type."""
    out = out_projection(attn)(heads)
    if is_qkv(attn):
        return out
    if unbatched:
        return out.squeeze(0), None
    return (out if attn.batch_first else out.transpose(0, 1)), None


def reproduces(attn: nn.Module, heads: torch.Tensor, output: Any) -> bool:
    """Whether out-projection of the recomputed `heads` is the attention's own `output`: only then do the heads
    measure what the module computes."""
    proj = out_projection(attn)  # a Linear, or a module standing for one (a factorized out-projection)
    mine = F.linear(heads, proj.weight, proj.bias) if isinstance(proj, nn.Linear) else proj(heads)
    theirs = batch_first(attn, output[0] if isinstance(output, tuple) else output)
    return mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-3,
                                                         atol=1e-4 * (1 + float(theirs.abs().max())))


class _HeadProbe:
    """Forward hook of one attention: its head outputs, checked against the module's output, into `stats`."""

    def __init__(self, name: str, attn: nn.Module, mode: str, device: torch.device) -> None:
        self.name, self.mode, self.fired = name, mode, 0
        self.stats = LayerStats.zeros(attn.num_heads * attn.head_dim, None, device)

    def __call__(self, mha: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        self.fired += 1
        heads = call_heads(mha, args, kwargs)
        if heads is None:
            raise NetslimError(f"attention {self.name!r} is called with a mask: its heads are not probed")
        if not reproduces(mha, heads, output):
            raise NetslimError(f"attention {self.name!r}: its head outputs cannot be recomputed from its weights "
                               "(a variant netslim does not follow); leave its heads whole (--opt heads=false)")
        zt = reduce_response(heads, "linear", self.mode)
        if not bool(torch.isfinite(zt).all()):
            raise NetslimError(f"attention {self.name!r} produced NaN or Inf head outputs")
        s = self.stats
        s.count.add_(zt.shape[1])
        s.sum.add_(zt.sum(dim=1))
        s.outer.addmm_(zt, zt.T)


def head_stats(model: nn.Module, batches: Iterable, names: list[str], reduce: str = "max",
               device: str | torch.device = "cpu") -> dict[str, LayerStats]:
    """Statistics (num_heads × head_dim features: head h is features h·head_dim … (h+1)·head_dim − 1) of the
    concatenated head outputs of each attention in `names`, over `batches` in eval mode. Results on the CPU."""
    if reduce not in REDUCE_MODES:
        raise NetslimError(f"reduce must be one of {', '.join(REDUCE_MODES)}, got {reduce!r}")
    device = torch.device(device)
    model.to(device)
    probes = {n: _HeadProbe(n, model.get_submodule(n), reduce, device) for n in names}
    handles = [model.get_submodule(n).register_forward_hook(p, with_kwargs=True) for n, p in probes.items()]
    was = model.training
    seen = False
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                x, _ = _split(batch)
                for p in probes.values():
                    p.fired = 0
                model(x.to(device, non_blocking=True))
                seen = True
                for p in probes.values():
                    if p.fired != 1:
                        raise NetslimError(f"attention {p.name!r} ran {p.fired} times in one forward pass, "
                                           "expected 1")
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    if not seen:
        raise NetslimError("no calibration batches: the data set is empty")
    return {n: p.stats.to("cpu") for n, p in probes.items()}
