"""torch-pruning's own criteria (L1 magnitude, random, Taylor) at a uniform ratio, as netslim methods.

They are the peers every netslim method is compared against, run through the same Plan, surgery and
fine-tuning pipeline, so a comparison differs only in which channels are kept.

Attention heads are cut as torch-pruning cuts them (MetaPruner with prune_num_heads): a head's score is its
criterion summed over the head's weights (its q, k and v rows, their biases, its out_proj columns), and the
same ratio of heads is kept as of channels. torch-pruning's nn.MultiheadAttention pruner cuts embed_dim, the
residual width, not heads (and a timm-style attention's head count must be kept in step by hand), so these sums
are taken here, on the same formulas (|w|, |w ∂L/∂w|, random).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from netslim.data import batches
from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodOptions, MethodResult, register
from netslim.methods.common.heads import attentions
from netslim.methods.common.ranking import Scores, uniform_plan
from netslim.probe.heads import head_indices, in_projection, out_projection
from netslim.surgery.graph import build_graph, out_channel_group


@dataclass
class UniformOptions(MethodOptions):
    """One kept fraction for every layer: `ratio`, or bisected to --target."""

    ratio: float = field(default=0.5, metadata={"help": "fraction of every layer's channels kept, in (0, 1] "
                                                        "(without --target)"})
    heads: bool = field(default=True, metadata={"help": "also keep the same ratio of whole heads of each "
                                                        "attention (ViT, DeiT): true | false"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.ratio <= 1:
            raise NetslimError(f"option ratio must be in (0, 1], not {self.ratio}")


@dataclass
class RandomOptions(UniformOptions):
    seed: int = field(default=0, metadata={"help": "seed of the random scores"})


@dataclass
class TaylorOptions(UniformOptions):
    taylor_images: int = field(default=2048, metadata={"help": "labelled calibration images the gradients "
                                                                "are accumulated over"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.taylor_images < 1:
            raise NetslimError(f"option taylor_images must be at least 1, not {self.taylor_images}")


def _head_parts(attn: nn.Module, h: int, grad: bool = False) -> list[torch.Tensor]:
    """The weights only head `h` uses (or their gradients): its q, k, v rows and biases, its out-projection's
    columns."""
    def take(p: torch.Tensor) -> torch.Tensor:
        return (p.grad if p.grad is not None else torch.zeros_like(p)) if grad else p.detach()

    weight, bias = in_projection(attn)
    cols, rows = head_indices([h], attn.head_dim, attn.num_heads, weight.device)
    parts = [take(weight)[rows], take(out_projection(attn).weight)[:, cols]]
    return parts + ([take(bias)[rows]] if bias is not None else [])


def _head_scores(ctx: Context, kind: str) -> dict[str, torch.Tensor]:
    """Per cuttable attention one score per head: Σ|w| (l1), Σ|w ∂L/∂w| (taylor, gradients already there)."""
    out: dict[str, torch.Tensor] = {}
    for name in attentions(ctx) if ctx.option("heads", True) else []:
        mha = ctx.model.get_submodule(name)
        if kind == "random":
            out[name] = torch.rand(mha.num_heads)
        elif kind == "taylor":
            out[name] = torch.tensor([sum(float((w * g).abs().sum()) for w, g in
                                          zip(_head_parts(mha, h), _head_parts(mha, h, grad=True), strict=True))
                                      for h in range(mha.num_heads)])
        else:
            out[name] = torch.tensor([sum(float(w.abs().sum()) for w in _head_parts(mha, h))
                                      for h in range(mha.num_heads)])
    return out


def _tp_scores(ctx: Context, importance: tp.importance.Importance) -> dict[str, torch.Tensor]:
    model = ctx.model
    graph = build_graph(model, ctx.example())
    out: dict[str, torch.Tensor] = {}
    for g in ctx.groups():
        module = model.get_submodule(g.root)
        group = out_channel_group(graph, module, list(range(g.width)))
        score = importance(group)
        out[g.root] = torch.zeros(g.width) if score is None else score.detach().float().cpu()
    return out


def _l1(ctx: Context) -> Scores:
    return _tp_scores(ctx, tp.importance.GroupMagnitudeImportance(p=1)), _head_scores(ctx, "l1")


def _random(ctx: Context) -> Scores:
    torch.manual_seed(int(ctx.option("seed", 0)))
    return _tp_scores(ctx, tp.importance.RandomImportance()), _head_scores(ctx, "random")


def _taylor(ctx: Context) -> Scores:
    data = ctx.calib if ctx.calib is not None else ctx.train
    if data is None or data.labels is None:
        raise NetslimError("Taylor importance needs labelled calibration data")
    n = int(ctx.option("taylor_images", 2048))
    model = ctx.model
    model.zero_grad()
    seen = 0
    with torch.enable_grad():
        for x, y in batches(data, ctx.batch_size, device=ctx.device):
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum") / n
            loss.backward()
            seen += len(y)
            if seen >= n:
                break
    scores = _tp_scores(ctx, tp.importance.GroupTaylorImportance()), _head_scores(ctx, "taylor")
    model.zero_grad()
    return scores


@register("l1", "L1 weight magnitude per filter (torch-pruning), one uniform ratio meeting the target",
          options=UniformOptions)
def l1(ctx: Context) -> MethodResult:
    return MethodResult(uniform_plan(ctx, "l1", _l1))


@register("tp-l1", "torch-pruning GroupMagnitudeImportance(p=1), uniform ratio (peer baseline)",
          options=UniformOptions)
def tp_l1(ctx: Context) -> MethodResult:
    return MethodResult(uniform_plan(ctx, "tp-l1", _l1))


@register("tp-random", "torch-pruning RandomImportance, uniform ratio (peer baseline)", options=RandomOptions)
def tp_random(ctx: Context) -> MethodResult:
    return MethodResult(uniform_plan(ctx, "tp-random", _random))


@register("tp-taylor", "torch-pruning GroupTaylorImportance on calibration batches, uniform ratio (peer)",
          needs_labels=True, options=TaylorOptions)
def tp_taylor(ctx: Context) -> MethodResult:
    return MethodResult(uniform_plan(ctx, "tp-taylor", _taylor))
