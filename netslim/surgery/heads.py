"""Whole attention heads as a unit to cut: the Plan's `heads` section, applied to nn.MultiheadAttention and to
timm-style attention (netslim.probe.qkv).

torch-pruning's attention pruner cuts `embed_dim`, which is also the residual width the attention reads and
writes; a head cut must leave that width alone and shrink only the inner width num_heads × head_dim.
nn.MultiheadAttention cannot hold an inner width other than its input width, so a cut module is replaced by a
CutAttention: the same forward signature and state-dict keys (in_proj_weight, in_proj_bias, out_proj.*), the
kept heads' rows of q, k and v and the kept heads' columns of out_proj. A checkpoint reloads by replaying the
Plan on the base model (the cut works on the meta device), then loading the tensors. A timm-style attention
already holds its inner width apart from its input width (qkv E → 3 × inner, proj inner → E), so it is cut in
place: the kept heads' rows of qkv and columns of proj, and its head count, keeping its class and state-dict keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from netslim.errors import NetslimError
from netslim.probe.heads import bind_call, from_heads, head_indices, head_qkv, masked
from netslim.probe.qkv import is_qkv

_QKV_PARTS = {"qkv", "proj", "q_norm", "k_norm", "attn_drop", "proj_drop", "norm"}


class UnmaskedAttention(nn.Module):
    """What netslim's attention modules share: nn.MultiheadAttention's call signature, without masks (a mask is
    shaped for the attention as it was), computed by `attend`. It holds the widths and out_proj (inner width
    num_heads × head_dim -> embed_dim); a subclass adds its in-projection."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.out_proj = nn.Linear(num_heads * head_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NetslimError(f"netslim's {type(self).__name__} takes no masks")
        return attend(self, query, key, value, need_weights, average_attn_weights)


class CutAttention(UnmaskedAttention):
    """Multi-head attention whose inner width (num_heads × head_dim) is below its input and output width
    `embed_dim`; called as nn.MultiheadAttention is, without masks (a mask is shaped for the uncut heads)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = False, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(embed_dim, num_heads, head_dim, bias, dropout, batch_first, device, dtype)
        inner = num_heads * head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim, device=device, dtype=dtype))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner, device=device, dtype=dtype)) if bias else None

    @classmethod
    def of(cls, mha: nn.MultiheadAttention | CutAttention, kept: list[int]) -> CutAttention:
        """`mha` with only the heads `kept`: the same head slices of q, k and v, and of out_proj's inputs (a
        CutAttention can be cut again, so a network pruned step by step loses heads step by step)."""
        w, d, e = mha.in_proj_weight, mha.head_dim, mha.embed_dim
        cols, rows = head_indices(kept, d, mha.num_heads, w.device)
        cut = cls(e, len(kept), d, mha.in_proj_bias is not None, mha.dropout, mha.batch_first, w.device, w.dtype)
        with torch.no_grad():
            cut.in_proj_weight.copy_(w.index_select(0, rows))
            cut.out_proj.weight.copy_(mha.out_proj.weight.index_select(1, cols))
            if cut.in_proj_bias is not None:
                cut.in_proj_bias.copy_(mha.in_proj_bias.index_select(0, rows))
                cut.out_proj.bias.copy_(mha.out_proj.bias)
        return cut.train(mha.training)



def attend(attn: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, need_weights: bool = True,
           average_attn_weights: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """nn.MultiheadAttention's unmasked forward for a module holding its parts (`num_heads`, `head_dim`, `dropout`,
    `batch_first`, `out_proj` and an in-projection head_qkv reads): CutAttention's and OpenAttention's forward."""
    batched = query.dim() == 3
    q, k, v = head_qkv(attn, query, key, value)
    p = attn.dropout if attn.training else 0.0
    weights = None
    if need_weights:  # the weights are asked for: the attention is computed in the open
        weights = torch.softmax(q @ k.transpose(-2, -1) * attn.head_dim ** -0.5, dim=-1)
        out = F.dropout(weights, p) @ v
        weights = weights.mean(1) if average_attn_weights else weights
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    out, _ = from_heads(attn, out.transpose(1, 2).flatten(2), unbatched=not batched)
    return out, weights if weights is None or batched else weights.squeeze(0)


def check_heads(heads: dict[str, list[int]], modules: dict[str, nn.Module], arch: str) -> None:
    """A NetslimError for a `heads` entry that cannot apply: not an attention netslim cuts, or bad indices."""
    for name, kept in heads.items():
        mha = modules.get(name) if name else None
        if mha is None:
            raise NetslimError(f"plan heads: unknown layer {name!r} in {arch}")
        if is_qkv(mha):
            if not qkv_cuttable(mha):
                raise NetslimError(f"plan heads: netslim cannot cut the heads of {name!r} ({type(mha).__name__} "
                                   "holds more than its projections: a position bias, a gate or a norm over its "
                                   "heads)")
        elif not isinstance(mha, nn.MultiheadAttention):
            raise NetslimError(f"plan heads: {name!r} is a {type(mha).__name__}, not an nn.MultiheadAttention or a "
                               "timm-style attention (qkv, proj, num_heads)")
        elif not cuttable(mha):
            raise NetslimError(f"plan heads: netslim cannot cut the heads of {name!r} (it has separate key/value "
                               "widths, bias_k/bias_v or add_zero_attn)")
        if not kept:
            raise NetslimError(f"plan heads: attention {name!r} would have no heads left (keep at least one)")
        if len(set(kept)) != len(kept) or min(kept) < 0 or max(kept) >= mha.num_heads:
            raise NetslimError(f"plan heads: head indices for {name!r} must be distinct and in 0..{mha.num_heads - 1}")


def cuttable(mha: nn.MultiheadAttention) -> bool:
    """Whether CutAttention can stand for `mha`: one embed width for q, k and v, no bias_k/bias_v, no zero attn."""
    return bool(mha._qkv_same_embed_dim) and mha.bias_k is None and not mha.add_zero_attn


def head_cuttable(m: nn.Module) -> bool:
    """Whether netslim can cut whole heads of `m`: a cuttable nn.MultiheadAttention or timm-style attention."""
    return (isinstance(m, nn.MultiheadAttention) and cuttable(m)) or qkv_cuttable(m)


def qkv_cuttable(m: nn.Module) -> bool:
    """Whether a head cut of `m` is qkv's rows and proj's columns (and the columns of the tensors it names
    `per_head`): no tensor of its own but those and the ones it names `head_free` (e.g. a position index), no part
    but the projections, per-head q/k norms and dropouts, no norm over the inner width, no gate. A module with
    tensors of its own must compute its head outputs itself (`head_outputs`), so that they are measured as it
    uses them."""
    children = dict(m.named_children())
    undeclared = {*m._parameters, *m._buffers} - {*getattr(m, "per_head", ()), *getattr(m, "head_free", ())}
    ours = callable(getattr(m, "head_outputs", None)) or not (m._parameters or m._buffers)
    return (is_qkv(m) and ours and not undeclared and set(children) <= _QKV_PARTS
            and isinstance(children.get("norm", nn.Identity()), nn.Identity) and getattr(m, "gate", None) is None
            and isinstance(m.proj, nn.Linear) and m.proj.in_features == m.num_heads * m.head_dim)



@torch.no_grad()
def cut_qkv(attn: nn.Module, kept: list[int]) -> None:
    """`attn` (changed in place) with only the heads `kept`: their rows of q, k and v, their columns of proj and
    of the tensors it names `per_head`."""
    d, w = attn.head_dim, attn.qkv.weight
    cols, rows = head_indices(kept, d, attn.num_heads, w.device)
    qkv = nn.Linear(w.shape[1], rows.numel(), bias=attn.qkv.bias is not None, device=w.device, dtype=w.dtype)
    qkv.weight.copy_(w.index_select(0, rows))
    if qkv.bias is not None:
        qkv.bias.copy_(attn.qkv.bias.index_select(0, rows))
    p = attn.proj
    proj = nn.Linear(cols.numel(), p.out_features, bias=p.bias is not None, device=w.device, dtype=w.dtype)
    proj.weight.copy_(p.weight.index_select(1, cols))
    if proj.bias is not None:
        proj.bias.copy_(p.bias)
    attn.qkv, attn.proj = qkv.train(attn.qkv.training), proj.train(p.training)
    for name in getattr(attn, "per_head", ()):  # one column per head, e.g. a relative position bias table
        t = getattr(attn, name)
        setattr(attn, name, nn.Parameter(t.index_select(-1, torch.tensor(kept, device=t.device)).clone(),
                                         requires_grad=t.requires_grad))
    attn.num_heads = len(kept)
    if hasattr(attn, "attn_dim"):  # timm ≥ 1.0 reshapes the head outputs to attn_dim
        attn.attn_dim = len(kept) * d


def attention_calls(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, tuple[int, bool]]:
    """Per attention of `names` the forward calls: (how many, whether any had a mask); uncalled ones are absent."""
    calls: dict[str, tuple[int, bool]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            n, before = calls.get(name, (0, False))
            calls[name] = (n + 1, before or masked(bind_call(module, args, kwargs)))
        return hook

    hooks = [model.get_submodule(n).register_forward_pre_hook(record(n), with_kwargs=True) for n in names]
    was = model.training
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return calls


def check_head_calls(model: nn.Module, heads: dict[str, list[int]], example: torch.Tensor) -> None:
    """Refuse attention the forward never calls, or calls with a mask (shaped for the uncut heads)."""
    calls = attention_calls(model, list(heads), example)
    for name in heads:
        if name not in calls:
            raise NetslimError(f"plan heads: attention {name!r} is never called by the forward pass")
        if calls[name][1]:
            raise NetslimError(f"plan heads: attention {name!r} is called with a mask; netslim cuts heads only of "
                               "unmasked attention")


def cut_heads(model: nn.Module, heads: dict[str, list[int]]) -> None:
    """Replace every nn.MultiheadAttention of `heads` that loses a head by its CutAttention, cut a timm-style
    one in place (checked beforehand)."""
    for name, kept in heads.items():
        mha = model.get_submodule(name)
        if len(kept) == mha.num_heads:
            continue
        if is_qkv(mha):
            cut_qkv(mha, sorted(kept))
            continue
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, CutAttention.of(mha, sorted(kept)))
