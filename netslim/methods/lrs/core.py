"""Low-rank + sparse decomposition (GreBdec): every Conv2d/Linear becomes U V + S fitted to its feature maps.

Per layer, im2col patches of a small calibration sample give G = X Xᵀ and Y Xᵀ (accumulated from a
forward pre-hook with a few random positions per image, never stored); netslim.methods.lrs.solver
fits U, V and S; netslim.surgery.factorized executes them. Budgets: per layer (`rank`, `rank_ratio`,
`sparsity`, overrides in `per_layer`), or a global `--target params=F | flops=F` split across layers greedily
by how fast each layer's feature-map error falls per parameter (or MAC) spent (from the eigenvalues of T G Tᵀ:
the error of the best rank-r fit in the feature-map metric), with a fixed share of each layer's budget
given to S under params (`sparse_share`) and none under flops, where S would run as a dense matrix.
Since a Plan holds no weights, the filled model is the MethodResult's `model`.
Attention: the analysis runs on a copy whose cuttable nn.MultiheadAttention are opened (netslim.surgery.attention),
so their `in_proj` and `out_proj` are Linear layers like the MLP's; the returned network opens those the Plan
factorizes, as apply_plan does.
The calibration moments are in moments.py, the report in report.py.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from typing import Any

import torch
from torch import nn

from netslim.data import batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import AnalysisCache, Context, MethodResult, register
from netslim.methods.common.heads import attentions
from netslim.methods.lrs.moments import compressed_moments, module_call_order, original_moments, positions
from netslim.methods.lrs.options import Config
from netslim.methods.lrs.report import report
from netslim.methods.lrs.solver import Moments, allocate, decompose, lowrank_curve, weighted_error
from netslim.surgery.attention import open_attentions
from netslim.surgery.factorized import build_factorized, layer_kind, matrix_shape

# ---------------------------------------------------------------- budgets


def opened(ctx: Context) -> Context:
    """`ctx` on a copy of its model whose cuttable attentions are opened: their projections become Linear layers
    that are called as modules, so the call order, the moment hooks and the solver see them as any Linear."""
    names = attentions(ctx)
    if not names:
        return ctx
    model = copy.deepcopy(ctx.model)
    open_attentions(model, [f"{n}.in_proj" for n in names])
    return dataclasses.replace(ctx, model=model, cache=AnalysisCache())


def candidate_layers(ctx: Context, cfg: Config) -> list[str]:
    """Conv2d (groups=1) and Linear layers in call order, minus the classifier (unless asked) and `skip`."""
    mods = dict(ctx.model.named_modules())
    unknown = [n for n in (*cfg.skip, *(cfg.per_layer or {})) if n not in mods]
    if unknown:
        raise NetslimError(f"lrs: unknown layer {unknown[0]!r} in skip/per_layer")
    order = module_call_order(ctx.model, ctx.example())
    out = [n for n in order if layer_kind(mods[n]) is not None and n not in cfg.skip
           and (cfg.include_classifier or n != ctx.classifier)]
    if not out:
        raise NetslimError("lrs: this model has no Conv2d/Linear layer to factorize")
    return out


def _entry(module: nn.Module, rank: int, nnz: int) -> dict[str, Any]:
    m, d = matrix_shape(module)
    rank, nnz = max(0, min(rank, m, d)), max(0, min(nnz, m * d))
    return {"rank": rank, "nnz": nnz, "kind": layer_kind(module)}


def _saves(module: nn.Module, e: dict[str, Any]) -> bool:
    m, d = matrix_shape(module)
    return (e["rank"] or e["nnz"]) and e["rank"] * (m + d) + e["nnz"] < m * d


def knob_budgets(ctx: Context, cfg: Config, names: list[str]) -> dict[str, dict[str, Any]]:
    """Per-layer (rank, nnz) from --rank/--rank-ratio/--sparsity, then the `layers` overrides."""
    mods = dict(ctx.model.named_modules())
    ratio, rank, sparsity = cfg.default_knobs()
    out = {}
    for n in names:
        m, d = matrix_shape(mods[n])
        r = int(rank) if rank is not None else int(round((ratio or 0.0) * min(m, d)))
        c = int(round((1.0 - sparsity) * m * d)) if sparsity is not None else 0
        out[n] = _entry(mods[n], r, c)
    return out | _overrides(ctx, cfg)


def _overrides(ctx: Context, cfg: Config) -> dict[str, dict[str, Any]]:
    from netslim.surgery.factorized import nnz_of

    mods = dict(ctx.model.named_modules())
    out = {}
    for n, e in (cfg.per_layer or {}).items():
        if layer_kind(mods[n]) is None:
            raise NetslimError(f"lrs per_layer: {n!r} is not a Conv2d (groups=1) or Linear layer")
        m, d = matrix_shape(mods[n])
        out[n] = _entry(mods[n], int(e.get("rank", 0)), nnz_of(e, m, d))
    return out


def target_budgets(ctx: Context, cfg: Config, names: list[str], moments: dict[str, Moments] | None,
                   targets: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Split a params or flops target across layers: greedy rank units (each with its share of S) by error per
    parameter or per MAC.

    Under flops a layer weighs its weight's size times its output positions (H·W, tokens) and S is not used:
    its non-zeros cost FLOPs as a dense matrix would. A layer too small for one unit, or whose allocation
    reaches its dense size, stays dense; the few values that rounding leaves over a params target come off the
    largest sparse parts.
    """
    from netslim.cost.size import count_flops, stored_params

    kind = ctx.target.kind
    mods = dict(ctx.model.named_modules())
    shape = {n: matrix_shape(mods[n]) for n in names}
    per = positions(ctx.model, names, ctx.example()) if kind == "flops" else dict.fromkeys(names, 1)
    size = {n: math.prod(shape[n]) * per[n] for n in names}
    share = cfg.share(kind)
    unit = {n: sum(shape[n]) * per[n] / (1.0 - share) for n in names}
    cap = {n: min(*shape[n], int(size[n] / unit[n])) for n in names}
    fixed = _overrides(ctx, cfg)
    free = [n for n in names if n not in fixed and cap[n] > 0]
    base = stored_params(ctx.model) if kind == "params" else count_flops(ctx.model, ctx.input_size).macs
    budget = ctx.target.fraction * base

    def cost(n: str, e: dict[str, Any]) -> int:  # stored values (or MACs) of a factorized layer's weight
        s = e["nnz"] if kind == "params" else (math.prod(shape[n]) if e["nnz"] else 0)
        return (e["rank"] * sum(shape[n]) + s) * per[n]

    # what is not allocated: everything but the free layers' weights, overrides at their factorized size
    rest = base - sum(size[n] for n in free) - sum(size[n] - cost(n, e) for n, e in fixed.items())
    need = rest + sum(unit[n] for n in free)
    what = "parameters" if kind == "params" else "MACs"
    if need > budget:
        raise NetslimError(f"target {ctx.target} is unreachable for lrs: rank 1 in every factorized layer already "
                           f"needs {need / base:.4f} of the {what}")
    curves = [lowrank_curve(targets[n], moments[n].gram if moments is not None else None, cfg.ridge) for n in free]
    ranks = allocate(curves, [unit[n] for n in free], [cap[n] for n in free], budget - rest)
    out = dict(fixed)
    for n, r in zip(free, ranks, strict=True):
        if r >= cap[n] and cap[n] * unit[n] >= 0.98 * size[n]:
            continue  # the budget reached the dense size: keep the layer as it is
        out[n] = _entry(mods[n], r, int(r * unit[n] * share / per[n]))
    excess = base - sum(size[n] - cost(n, e) for n, e in out.items()) - budget
    for n in sorted(out, key=lambda k: -out[k]["nnz"]):
        if excess <= 0 or kind != "params":
            break
        cut = min(out[n]["nnz"], math.ceil(excess))
        out[n]["nnz"] -= cut
        excess -= cut
    if excess > 0:
        raise NetslimError(f"target {ctx.target} is unreachable for lrs with these per-layer choices")
    return out


# ---------------------------------------------------------------- the method


def _solve(cfg: Config, weight: torch.Tensor, mom: Moments | None, entry: dict[str, Any]) -> Any:
    weight = weight.detach()
    t = mom.target(weight, cfg.ridge) if mom is not None else weight.reshape(weight.shape[0], -1).double()
    return decompose(t, entry["rank"], entry["nnz"], mom.gram if mom is not None else None, stages=int(cfg.stages),
                     sweeps=int(cfg.sweeps), final_sweeps=int(cfg.final_sweeps), power_iters=int(cfg.power_iters),
                     ridge=float(cfg.ridge), seed=int(cfg.seed))


def calib_batches(ctx: Context, cfg: Config, batch_size: int = 32) -> tuple[Any, int]:
    """Batches of at most `images` calibration images, and how many there are."""
    if ctx.calib is None or len(ctx.calib.labels) == 0:
        raise NetslimError("lrs needs calibration images (feature-map reconstruction); none were given")
    data = ctx.calib
    if len(data.labels) > int(cfg.images):
        data = calibration_subset(data, int(cfg.images), seed=int(cfg.seed))
    return batches(data, batch_size, device=ctx.device), len(data.labels)


@register("lrs", "GreBdec: each layer -> low-rank U V + sparse S fitted to its feature maps "
                 "(--opt rank=R | rank_ratio=F, --opt sparsity=F, or --target params=F | flops=F)", options=Config)
def lrs(ctx: Context) -> MethodResult:
    cfg = Config.from_ctx(ctx)
    view = opened(ctx)
    names = candidate_layers(view, cfg)
    mods = dict(view.model.named_modules())
    features = cfg.objective == "features"
    data, images = calib_batches(ctx, cfg) if features else (None, 0)
    t0 = time.perf_counter()
    moments = original_moments(view.model, names, data, int(cfg.positions), int(cfg.seed)) if features else None
    seconds_moments = time.perf_counter() - t0
    if ctx.target is not None:
        targets = {n: (moments[n].target(mods[n].weight.detach(), cfg.ridge) if moments else
                       mods[n].weight.detach().reshape(mods[n].weight.shape[0], -1).double()) for n in names}
        spec = target_budgets(view, cfg, names, moments, targets)
    else:
        spec = knob_budgets(view, cfg, names)
    spec = {n: spec[n] for n in names if n in spec and _saves(mods[n], spec[n])}
    model = copy.deepcopy(ctx.model)
    open_attentions(model, spec)  # the structure apply_plan builds from the Plan
    rows = []
    for n in spec:
        t1 = time.perf_counter()
        mom = moments[n] if moments is not None else None
        if features and cfg.inputs == "compressed" and any(k in spec for k in names[:names.index(n)]):
            mom = compressed_moments(view.model, model, n, data, int(cfg.positions), int(cfg.seed))
        dec = _solve(cfg, mods[n].weight, mom, spec[n])
        layer = build_factorized(mods[n], spec[n]["rank"], spec[n]["nnz"])
        dt = mods[n].weight.dtype
        layer.set_factors(dec.u.to(dt), dec.v.to(dt), dec.s.to(dt) if spec[n]["nnz"] else None,
                          dec.mask if spec[n]["nnz"] else None, mods[n].bias)
        layer.train(mods[n].training)
        model.set_submodule(n, layer)
        rows.append(_row(n, mods[n], layer, dec, moments[n] if moments is not None else None, mom,
                         time.perf_counter() - t1))
    plan = ctx.base_plan("lrs")
    plan.factorize = spec
    plan.meta = {"objective": cfg.objective, "inputs": cfg.inputs, "calibration_images": images,
                 "positions_per_image": int(cfg.positions), "sparse_share": cfg.share(ctx.target.kind)
                 if ctx.target is not None else None, "target": str(ctx.target) if ctx.target else None,
                 "moments_seconds": round(seconds_moments, 2), "layers": rows}
    return MethodResult(plan, model=model, report=report(rows, images, cfg.objective, cfg.inputs, int(cfg.positions)))


def _row(name: str, dense: nn.Module, layer: Any, dec: Any, mom: Moments | None, fit_mom: Moments | None,
         seconds: float) -> dict[str, Any]:
    m, d = matrix_shape(dense)
    w_hat = dec.weight()
    b = layer.storage_bytes()
    row = {"layer": name, "m": m, "d": d, "rank": dec.rank, "nnz": dec.nnz, "params": layer.stored_params(),
           "dense_params": m * d + (m if dense.bias is not None else 0), "bytes": b["total"],
           "dense_bytes": b["dense_original"], "weight_error": weighted_error(w_hat, dense.weight, None),
           "feature_error": weighted_error(w_hat, dense.weight, mom) if mom is not None else None,
           "seconds": round(seconds, 2)}
    if fit_mom is not None and fit_mom is not mom:  # compressed inputs: error of the layer in the chain
        row["feature_error_chained"] = weighted_error(w_hat, dense.weight, fit_mom)
    return row


__all__ = ["lrs", "Config", "candidate_layers", "knob_budgets", "target_budgets"]
