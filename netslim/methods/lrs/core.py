"""Low-rank + sparse decomposition (GreBdec): every Conv2d/Linear becomes U V + S fitted to its feature maps.

Per layer, im2col patches of a small calibration sample give G = X Xᵀ and Y Xᵀ (accumulated from a
forward pre-hook with a few random positions per image, never stored); netslim.methods.lrs.solver
fits U, V and S; netslim.surgery.factorized executes them. Budgets: per layer (`rank`, `rank_ratio`,
`sparsity`, overrides in `per_layer`), or a global `--target params=F` split across layers greedily by how
fast each layer's feature-map error falls per parameter spent (from the eigenvalues of T G Tᵀ: the
error of the best rank-r fit in the feature-map metric), with a fixed share of each layer's budget
given to S (`sparse_share`). Since a Plan holds no weights, the filled model goes to ctx.cache["model"].
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netslim.data import batches, calibration_subset
from netslim.errors import NetslimError
from netslim.methods.base import Context, register
from netslim.methods.lrs.solver import Moments, allocate, decompose, lowrank_curve, weighted_error
from netslim.plan import Plan
from netslim.surgery.factorized import build_factorized, layer_kind, matrix_shape

OBJECTIVES = ("features", "weights")
INPUTS = ("original", "compressed")


@dataclass
class Config:
    objective: str = "features"
    inputs: str = "original"  # "compressed": fit each layer to the inputs the already-compressed layers give
    rank: int | None = None
    rank_ratio: float | None = None
    sparsity: float | None = None  # fraction of S's entries that are zero
    sparse_share: float = 0.5  # with --target: fraction of each layer's budget spent on S
    images: int = 1024  # calibration images used
    positions: int = 8  # random output positions per image and layer
    stages: int = 4
    sweeps: int = 2
    final_sweeps: int = 4
    power_iters: int = 2
    ridge: float = 1e-4  # fraction of mean diag(G) added to G (dead inputs, fewer patches than d)
    include_classifier: bool = False
    per_layer: dict[str, dict[str, Any]] | None = None  # per-layer overrides {name: {"rank", "nnz"|"sparsity"}}
    skip: tuple[str, ...] = ()
    seed: int = 0

    @classmethod
    def from_ctx(cls, ctx: Context) -> Config:
        c = cls()
        for name in c.__dataclass_fields__:
            value = ctx.options.get(name)
            if value is not None:
                setattr(c, name, value)
        c.skip = tuple([c.skip] if isinstance(c.skip, str) else c.skip)
        c.check(ctx)
        return c

    def check(self, ctx: Context) -> None:
        if self.objective not in OBJECTIVES:
            raise NetslimError(f"lrs objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")
        if self.inputs not in INPUTS:
            raise NetslimError(f"lrs inputs must be one of {', '.join(INPUTS)}, not {self.inputs!r}")
        if self.rank is not None and (int(self.rank) != self.rank or self.rank < 0):
            raise NetslimError(f"--rank must be a non-negative integer, not {self.rank}")
        if self.rank_ratio is not None and not 0 <= self.rank_ratio <= 1:
            raise NetslimError(f"--rank-ratio must be in [0, 1], not {self.rank_ratio}")
        if self.sparsity is not None and not 0 <= self.sparsity <= 1:
            raise NetslimError(f"--sparsity (fraction of zeros in S) must be in [0, 1], not {self.sparsity}")
        if not 0 <= self.sparse_share < 1:
            raise NetslimError(f"lrs sparse_share must be in [0, 1), not {self.sparse_share}")
        if self.rank is not None and self.rank_ratio is not None:
            raise NetslimError("give --rank or --rank-ratio, not both")
        if ctx.target is not None and (self.rank is not None or self.rank_ratio is not None
                                       or self.sparsity is not None):
            raise NetslimError("--target splits the budget across layers itself; drop --rank/--rank-ratio/--sparsity "
                               "(tune the split with --opt sparse_share=F, per-layer choices with --opt per_layer=...)")
        if ctx.target is not None and ctx.target.kind != "params":
            raise NetslimError(f"lrs meets a storage target (--target params=F), not {ctx.target}: its sparse part "
                               "saves FLOPs or time only with a sparse kernel")
        if int(self.images) < 1 or int(self.positions) < 1:
            raise NetslimError("lrs images and positions must be positive")

    def default_knobs(self) -> tuple[float | None, int | None, float | None]:
        """(rank_ratio, rank, sparsity); what is not given is 0, both missing gives the defaults."""
        if self.rank is None and self.rank_ratio is None and self.sparsity is None:
            return 0.125, None, 0.97
        return (self.rank_ratio if self.rank is None else None), self.rank, self.sparsity


# ---------------------------------------------------------------- calibration moments


class _Stop(Exception):
    """Raised by a hook once the last needed input was seen: the rest of the forward is skipped."""


def call_order(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the model's modules in the order they are called."""
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return list(dict.fromkeys(order))


def patches(module: nn.Module, x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Input patches (rows × d, im2col order) of a Conv2d at output positions `idx` (N × p), or a Linear's rows.

    Only the sampled windows are gathered (a strided view of the padded input), not the whole im2col.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    xp = F.pad(x, (pw, pw, ph, ph)).contiguous()
    n, c, h, w = xp.shape
    ho, wo = (h - dh * (kh - 1) - 1) // sh + 1, (w - dw * (kw - 1) - 1) // sw + 1
    st = xp.stride()
    win = xp.as_strided((n, c, ho, wo, kh, kw), (st[0], st[1], st[2] * sh, st[3] * sw, st[2] * dh, st[3] * dw))
    if idx is None:
        idx = torch.arange(ho * wo, device=x.device).expand(n, -1)
    rows = torch.arange(n, device=x.device).unsqueeze(1).expand_as(idx).reshape(-1)
    flat = idx.reshape(-1)
    return win[rows, :, flat // wo, flat % wo].reshape(rows.numel(), c * kh * kw)


def _positions(module: nn.Module, x: torch.Tensor, p: int, gen: torch.Generator) -> torch.Tensor | None:
    if not isinstance(module, nn.Conv2d):
        return None
    h, w = x.shape[-2:]
    k, s, pad, dil = module.kernel_size, module.stride, module.padding, module.dilation
    ho = (h + 2 * pad[0] - dil[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w + 2 * pad[1] - dil[1] * (k[1] - 1) - 1) // s[1] + 1
    if ho * wo <= p:
        return None
    return torch.rand(x.shape[0], ho * wo, generator=gen).argsort(1)[:, :p].to(x.device)


class _Accumulator:
    """Sums of patch outer products: float32 partial sums (fast GEMMs), flushed into float64 every few batches."""

    FLUSH = 8192  # rows summed in float32 before moving into the float64 total

    def __init__(self, module: nn.Module) -> None:
        m, d = matrix_shape(module)
        self.weight = module.weight.detach().reshape(m, d).float()
        self.total = torch.zeros(d, d, dtype=torch.float64)
        self.cross: torch.Tensor | None = None
        self.yy = 0.0
        self.n = 0
        self._part: torch.Tensor | None = None
        self._rows = 0

    def add(self, xhat: torch.Tensor, x: torch.Tensor | None = None) -> None:
        """Patches the layer sees (xhat) and, when they differ, the original network's (x)."""
        xhat = xhat.float()
        if self._part is None:
            self._part = xhat.T @ xhat
        else:
            self._part.addmm_(xhat.T, xhat)
        self._rows += xhat.shape[0]
        if self._rows >= self.FLUSH:
            self._flush()
        if x is not None:  # original inputs differ: Y = W X is needed (with them, ‖Y‖² = tr(W G Wᵀ) at the end)
            y = x.float() @ self.weight.T
            part = (y.T @ xhat).double().cpu()
            self.cross = part if self.cross is None else self.cross + part
            self.yy += float(y.double().pow(2).sum())
        self.n += xhat.shape[0]

    def _flush(self) -> None:
        if self._part is not None:
            self.total += self._part.double().cpu()
            self._part, self._rows = None, 0

    def moments(self) -> Moments:
        self._flush()
        if self.cross is None:
            w = self.weight.double()
            self.yy = float(((w @ self.total) * w).sum())
        return Moments(self.total, self.cross, self.yy, self.n)


def original_moments(model: nn.Module, names: list[str], data: Any, positions: int, seed: int) -> dict[str, Moments]:
    """One pass: each layer's patch moments from the original network's own inputs."""
    mods = dict(model.named_modules())
    acc = {n: _Accumulator(mods[n]) for n in names}
    gen = torch.Generator().manual_seed(seed)
    last = names[-1] if names else None

    def hook(name: str):
        def run(module: nn.Module, args: tuple) -> None:
            x = args[0]
            acc[name].add(patches(module, x, _positions(module, x, positions, gen)))
            if name == last:
                raise _Stop

        return run

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for x, _ in data:
                try:
                    model(x)
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: a.moments() for n, a in acc.items()}


def compressed_moments(reference: nn.Module, model: nn.Module, name: str, data: Any, positions: int,
                       seed: int) -> Moments:
    """Moments of `name` on the inputs the partly compressed `model` gives, against `reference`'s outputs."""
    ref_mod, mod = reference.get_submodule(name), model.get_submodule(name)
    acc = _Accumulator(ref_mod)
    seen: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(seed)

    def grab(key: str):
        def run(module: nn.Module, args: tuple) -> None:
            x = args[0]
            if key == "ref":
                seen["idx"] = _positions(module, x, positions, gen)
            seen[key] = patches(module, x, seen["idx"])
            raise _Stop

        return run

    handles = [ref_mod.register_forward_pre_hook(grab("ref")), mod.register_forward_pre_hook(grab("new"))]
    try:
        with torch.no_grad():
            for x, _ in data:
                for net in (reference, model):
                    try:
                        net(x)
                    except _Stop:
                        pass
                acc.add(seen["new"], seen["ref"])
    finally:
        for h in handles:
            h.remove()
    return acc.moments()


# ---------------------------------------------------------------- budgets


def candidate_layers(ctx: Context, cfg: Config) -> list[str]:
    """Conv2d (groups=1) and Linear layers in call order, minus the classifier (unless asked) and `skip`."""
    mods = dict(ctx.model.named_modules())
    unknown = [n for n in (*cfg.skip, *(cfg.per_layer or {})) if n not in mods]
    if unknown:
        raise NetslimError(f"lrs: unknown layer {unknown[0]!r} in skip/per_layer")
    order = call_order(ctx.model, ctx.example())
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
    """Split a params target across layers: greedy rank units (each with its share of S) by error per param.

    A layer too small for one unit, or whose allocation reaches its dense size, stays dense; the few
    values that rounding leaves over the target come off the largest sparse parts.
    """
    from netslim.cost.budget import stored_params

    mods = dict(ctx.model.named_modules())
    size = {n: math.prod(matrix_shape(mods[n])) for n in names}
    share = cfg.sparse_share
    unit = {n: sum(matrix_shape(mods[n])) / (1.0 - share) for n in names}
    cap = {n: min(*matrix_shape(mods[n]), int(size[n] / unit[n])) for n in names}
    fixed = _overrides(ctx, cfg)
    free = [n for n in names if n not in fixed and cap[n] > 0]
    base = stored_params(ctx.model)
    budget = ctx.target.fraction * base

    def cost(n: str, e: dict[str, Any]) -> int:  # stored values of a factorized layer's weight
        return e["rank"] * sum(matrix_shape(mods[n])) + e["nnz"]

    # what is not allocated: everything but the free layers' weights, overrides at their factorized size
    rest = base - sum(size[n] for n in free) - sum(size[n] - cost(n, e) for n, e in fixed.items())
    need = rest + sum(unit[n] for n in free)
    if need > budget:
        raise NetslimError(f"target {ctx.target} is unreachable for lrs: rank 1 in every factorized layer already "
                           f"needs {need / base:.4f} of the parameters")
    curves = [lowrank_curve(targets[n], moments[n].gram if moments is not None else None, cfg.ridge) for n in free]
    ranks = allocate(curves, [unit[n] for n in free], [cap[n] for n in free], budget - rest)
    out = dict(fixed)
    for n, r in zip(free, ranks, strict=True):
        if r >= cap[n] and cap[n] * unit[n] >= 0.98 * size[n]:
            continue  # the budget reached the dense size: keep the layer as it is
        out[n] = _entry(mods[n], r, int(r * unit[n] * share))
    excess = base - sum(size[n] - cost(n, e) for n, e in out.items()) - budget
    for n in sorted(out, key=lambda k: -out[k]["nnz"]):
        if excess <= 0:
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
                 "(--rank/--rank-ratio, --sparsity, or --target params=F)")
def lrs(ctx: Context) -> Plan:
    cfg = Config.from_ctx(ctx)
    names = candidate_layers(ctx, cfg)
    mods = dict(ctx.model.named_modules())
    features = cfg.objective == "features"
    data, images = calib_batches(ctx, cfg) if features else (None, 0)
    t0 = time.perf_counter()
    moments = original_moments(ctx.model, names, data, int(cfg.positions), int(cfg.seed)) if features else None
    seconds_moments = time.perf_counter() - t0
    if ctx.target is not None:
        targets = {n: (moments[n].target(mods[n].weight.detach(), cfg.ridge) if moments else
                       mods[n].weight.detach().reshape(mods[n].weight.shape[0], -1).double()) for n in names}
        spec = target_budgets(ctx, cfg, names, moments, targets)
    else:
        spec = knob_budgets(ctx, cfg, names)
    spec = {n: spec[n] for n in names if n in spec and _saves(mods[n], spec[n])}
    model = copy.deepcopy(ctx.model)
    rows = []
    for n in spec:
        t1 = time.perf_counter()
        mom = moments[n] if moments is not None else None
        if features and cfg.inputs == "compressed" and any(k in spec for k in names[:names.index(n)]):
            mom = compressed_moments(ctx.model, model, n, data, int(cfg.positions), int(cfg.seed))
        dec = _solve(cfg, mods[n].weight, mom, spec[n])
        layer = build_factorized(mods[n], spec[n]["rank"], spec[n]["nnz"])
        dt = mods[n].weight.dtype
        layer.set_factors(dec.u.to(dt), dec.v.to(dt), dec.s.to(dt) if spec[n]["nnz"] else None,
                          dec.mask if spec[n]["nnz"] else None, mods[n].bias)
        layer.train(mods[n].training)
        model.set_submodule(n, layer)
        rows.append(_row(n, mods[n], layer, dec, moments[n] if moments is not None else None, mom,
                         time.perf_counter() - t1))
    ctx.cache["model"] = model
    plan = ctx.base_plan("lrs")
    plan.factorize = spec
    plan.meta = {"objective": cfg.objective, "inputs": cfg.inputs, "calibration_images": images,
                 "positions_per_image": int(cfg.positions), "sparse_share": cfg.sparse_share
                 if ctx.target is not None else None, "target": str(ctx.target) if ctx.target else None,
                 "moments_seconds": round(seconds_moments, 2), "layers": rows}
    _report(ctx, cfg, rows, images)
    return plan


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


def _report(ctx: Context, cfg: Config, rows: list[dict[str, Any]], images: int) -> None:
    from netslim.report.markdown import table

    body = [[r["layer"], f"{r['m']}×{r['d']}", r["rank"], r["nnz"], r["params"],
             f"{r['params'] / r['dense_params']:.3f}", r["bytes"], f"{r['weight_error']:.4f}",
             "–" if r["feature_error"] is None else f"{r['feature_error']:.4f}", r["seconds"]] for r in rows]
    tot_p, tot_d = sum(r["params"] for r in rows), sum(r["dense_params"] for r in rows)
    tot_b, tot_db = sum(r["bytes"] for r in rows), sum(r["dense_bytes"] for r in rows)
    body.append(["**factorized layers**", "", "", sum(r["nnz"] for r in rows), tot_p,
                 f"{tot_p / max(tot_d, 1):.3f}", tot_b, "", "", ""])
    what = "feature maps" if cfg.objective == "features" else "weights only"
    ctx.cache["report"] = [
        f"## Low-rank + sparse decomposition (GreBdec, fitted to {what}, {cfg.inputs} inputs)\n\n"
        f"W ≈ U V + S per layer; params = r·(m + d) + nnz (+ bias); bytes = float32 U, V, bias + S in CSR "
        f"(value + {2}-byte column index per non-zero, 4-byte row pointers); dense: {tot_db:,} bytes. Errors are "
        f"relative (‖W − Ŵ‖/‖W‖ and ‖Y − Ŷ‖/‖Y‖ on {images} calibration images × "
        f"{int(cfg.positions)} positions). The sparse part runs as a masked dense layer unless "
        "netslim.surgery.factorized.use_sparse_kernel switches it to CSR.\n\n"
        + table(["layer", "m×d", "rank", "non-zeros", "params", "params/dense", "bytes", "weight err",
                 "feature-map err", "s"], body)]


__all__ = ["lrs", "Config", "original_moments", "compressed_moments", "patches", "call_order", "candidate_layers",
           "knob_budgets", "target_budgets"]
