"""Per-head outputs of nn.MultiheadAttention, streamed into statistics like any layer's response.

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


def _batch_first(mha: nn.Module, out: torch.Tensor) -> torch.Tensor:
    return out.unsqueeze(0) if out.dim() == 2 else out if mha.batch_first else out.transpose(0, 1)


def masked(bound: dict[str, Any]) -> bool:
    """Whether an attention call (its arguments bound to nn.MultiheadAttention.forward) applies a mask."""
    return any(bound.get(k) is not None for k in ("key_padding_mask", "attn_mask")) or bool(bound.get("is_causal"))


def bind_call(mha: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A hook's args and kwargs bound to nn.MultiheadAttention.forward's parameters (CutAttention's too)."""
    return _MHA_CALL.bind(mha, *args, **kwargs).arguments


def call_heads(mha: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The head outputs (batch, tokens, embed) of one call of an attention, from a hook's args and kwargs; None
    for a masked call (the recomputation applies no mask)."""
    bound = bind_call(mha, args, kwargs)
    if masked(bound):
        return None
    return head_outputs(mha, bound["query"], bound["key"], bound["value"])  # type: ignore[arg-type]


def reproduces(mha: nn.Module, heads: torch.Tensor, output: Any) -> bool:
    """Whether out_proj of the recomputed `heads` is the attention's own `output`: only then do the heads
    measure what the module computes."""
    proj = mha.out_proj  # a Linear, or a module standing for one (an opened attention's factorized out_proj)
    mine = F.linear(heads, proj.weight, proj.bias) if isinstance(proj, nn.Linear) else proj(heads)
    theirs = _batch_first(mha, output[0] if isinstance(output, tuple) else output)
    return mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=1e-3,
                                                         atol=1e-4 * (1 + float(theirs.abs().max())))


class _HeadProbe:
    """Forward hook of one attention: its head outputs, checked against the module's output, into `stats`."""

    def __init__(self, name: str, mha: nn.MultiheadAttention, mode: str, device: torch.device) -> None:
        self.name, self.mode, self.fired = name, mode, 0
        self.stats = LayerStats.zeros(mha.embed_dim, None, device)

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
    """Statistics (embed_dim features: head h is features h·head_dim … (h+1)·head_dim − 1) of the concatenated
    head outputs of each nn.MultiheadAttention in `names`, over `batches` in eval mode. Results on the CPU."""
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
