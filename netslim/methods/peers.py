"""torch-pruning's own criteria (L1 magnitude, random, Taylor) at a uniform ratio, as netslim methods.

They are the peers every netslim method is compared against, run through the same Plan, surgery and
fine-tuning pipeline, so a comparison differs only in which channels are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from netslim.data import batches
from netslim.errors import NetslimError
from netslim.methods.base import Context, MethodOptions, MethodResult, register
from netslim.methods.common.ranking import uniform_plan
from netslim.surgery.graph import build_graph, out_channel_group


@dataclass
class UniformOptions(MethodOptions):
    """One kept fraction for every layer: `ratio`, or bisected to --target."""

    ratio: float = field(default=0.5, metadata={"help": "fraction of every layer's channels kept, in (0, 1] "
                                                        "(without --target)"})

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


def _l1(ctx: Context) -> dict[str, torch.Tensor]:
    return _tp_scores(ctx, tp.importance.GroupMagnitudeImportance(p=1))


def _random(ctx: Context) -> dict[str, torch.Tensor]:
    torch.manual_seed(int(ctx.option("seed", 0)))
    return _tp_scores(ctx, tp.importance.RandomImportance())


def _taylor(ctx: Context) -> dict[str, torch.Tensor]:
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
    scores = _tp_scores(ctx, tp.importance.GroupTaylorImportance())
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
