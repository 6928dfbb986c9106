"""One statistics pass per (reduction, per-class) over the calibration data, shared by every method
that asks for it in the same Context (the bench runs several methods on one Context)."""

from __future__ import annotations

from netslim.data import batches
from netslim.errors import NetslimError
from netslim.methods.base import Context
from netslim.probe import LayerStats, collect


def response_stats(ctx: Context, reduce: str = "max", per_class: bool = False) -> dict[str, LayerStats]:
    key = f"stats:{reduce}:{int(per_class)}"
    cache = ctx.cache
    if key not in cache.stats:
        data = ctx.calib
        if data is None or len(data.labels) == 0:
            raise NetslimError("this method needs calibration data, and none was given")
        layers = [n for g in ctx.groups() for n in g.layers]
        cache.stats[key] = collect(ctx.model, batches(data, ctx.batch_size, device=ctx.device), layers=layers,
                                   reduce=reduce, per_class=per_class,
                                   num_classes=ctx.num_classes if per_class else None, device=ctx.device)
        cache.passes.append(key)
    return cache.stats[key]
