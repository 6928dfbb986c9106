"""Which layers of a cut network need repair, which output channels of the original they kept, and
where a fitted bias can go.

A layer needs repair when its input width differs from the original's (it consumes a cut layer). So does the
out_proj of an attention that lost heads (netslim.repair.attention): its job is named `<attention>.out_proj`
and sits where the attention is called, so it is fitted in forward order like any layer.
Its kept output channels come from the Plan when one is given (the coupled channel groups, exactly as
surgery applied them) and otherwise from the weights: surgery slices weights without changing them,
so each cut row equals an original row restricted to the kept inputs, in the same order.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.plan import Plan
from netslim.probe.points import response_modules
from netslim.repair.attention import recomputable
from netslim.surgery.apply import find_classifier
from netslim.surgery.depth import call_order, drop_layers
from netslim.surgery.graph import channel_groups
from netslim.surgery.heads import CutAttention

LAYERS = (nn.Conv2d, nn.Linear)
ATTENTIONS = (nn.MultiheadAttention, CutAttention)
MAX_DIM = 8192  # inputs per output of one fit: G is dim² float64 (512 MB at this size)


@dataclass
class Job:
    """One consumer layer: refit it (reason None) or report why not."""

    name: str
    reason: str | None = None
    out_idx: torch.Tensor | None = None  # the original's output channels the cut layer kept
    bn: _BatchNorm | None = None  # BN right after it in the cut network (where a bias can be folded)
    attention: str | None = None  # the layer is this attention's out_proj: inputs recomputed, not hooked


def in_width(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def out_width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def fit_dim(m: nn.Module) -> int:
    """Inputs of one output channel: (C_in / groups)·k·k for a conv, in_features for a Linear."""
    return m.weight[0].numel()


def plan_outputs(original: nn.Module, plan: Plan, example: torch.Tensor) -> dict[str, list[int]]:
    """Kept output channels of every layer the Plan cuts, coupled layers included (as apply_plan cuts)."""
    model = original
    if plan.drop:
        model = copy.deepcopy(original)
        drop_layers(model, plan.drop, example)
    classifier = find_classifier(model)
    keep: dict[str, list[int]] = {}
    for g in channel_groups(model, example, classifier):
        kept = next((plan.keep[n] for n in g.layers if n in plan.keep), None)
        if kept is not None:
            keep.update({n: sorted(kept) for n in g.layers})
    if plan.classes is not None:
        keep[classifier] = sorted(plan.classes)
    return keep


def _subsequence(t: list[float], s: list[float], tol: float) -> list[int] | None:
    """Greedy earliest embedding of fingerprints `t` into `s` (exact for an ordered sub-selection)."""
    idx, j = [], 0
    for v in t:
        while j < len(s) and abs(s[j] - v) > tol:
            j += 1
        if j == len(s):
            return None
        idx.append(j)
        j += 1
    return idx


def match_rows(w: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Increasing o_a with v[a] == w[o_a] on an increasing subset of input channels; None if none exists.

    Columns (one input channel's kernel) are compared by a random projection, then each match is
    verified on the weights; the last input selection is tried first (all rows share it unless grouped).
    """
    w3 = w.detach().double().reshape(w.shape[0], w.shape[1], -1)  # (rows, input channels, kernel)
    v3 = v.detach().double().reshape(v.shape[0], v.shape[1], -1)
    r = torch.randn(w3.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s, t = w3.cpu() @ r, v3.cpu() @ r
    tol = 1e-9 * float(s.abs().max().clamp_min(1e-30))
    out: list[int] = []
    last: list[int] | None = None
    for a in range(v3.shape[0]):
        cand = ((s - t[a, 0]).abs() <= tol).any(1).nonzero().flatten().tolist()
        found = None
        for o in (o for o in cand if not out or o > out[-1]):
            idx = last if last is not None and len(last) == v3.shape[1] and _fits(w3, v3, o, a, last) else None
            if idx is None:
                idx = _subsequence(t[a].tolist(), s[o].tolist(), tol)
                idx = idx if idx is not None and _fits(w3, v3, o, a, idx) else None
            if idx is not None:
                found, last = o, idx
                break
        if found is None:
            return None
        out.append(found)
    return torch.tensor(out, dtype=torch.long)


def _fits(w3: torch.Tensor, v3: torch.Tensor, o: int, a: int, idx: list[int]) -> bool:
    ref = w3[o, idx]
    return bool(torch.allclose(v3[a], ref, rtol=1e-6, atol=1e-12 * float(ref.abs().max().clamp_min(1e-30))))


def following_bns(cut: nn.Module, example: torch.Tensor) -> dict[str, _BatchNorm]:
    """BN with running statistics right after each layer (the fitted bias moves into its running_mean)."""
    mods = dict(cut.named_modules())
    out = {}
    for name, point in response_modules(cut, example).items():
        bn = mods.get(point.bn) if point.bn else None
        if isinstance(bn, _BatchNorm) and bn.running_mean is not None and bn.num_features == point.channels:
            out[name] = bn
    return out


def find_jobs(original: nn.Module, cut: nn.Module, example: torch.Tensor, plan: Plan | None = None,
              layers: list[str] | None = None) -> list[Job]:
    """Consumers of cut layers in forward order (input → output), with the layers that cannot be refitted.

    `layers`: only these, each taken even when its input width is unchanged (e.g. after a dropped block); an
    attention's out_proj is named `<attention>.out_proj`.
    """
    order = call_order(original, example, LAYERS + ATTENTIONS)
    calls = Counter(call_order(cut, example, LAYERS + ATTENTIONS))
    cut_mods = dict(cut.named_modules())
    keep = plan_outputs(original, plan, example) if plan is not None else {}
    bns = following_bns(cut, example)
    heads = [n for n in dict.fromkeys(order)
             if isinstance(original.get_submodule(n), ATTENTIONS) and _heads_cut(original, cut_mods.get(n), n, layers)]
    live = [n for n in heads if isinstance(cut_mods.get(n), ATTENTIONS)]
    follow = (recomputable(original, live, example) & recomputable(cut, live, example)) if live else set()
    outs = {f"{n}.out_proj" for n in heads}
    jobs = []
    for name in dict.fromkeys(order):
        om, cm = original.get_submodule(name), cut_mods.get(name)
        if isinstance(om, ATTENTIONS):
            if name in heads:
                jobs.append(_attention_job(name, om, cm, calls[name], name in follow))
            continue
        if (layers is not None and name not in layers) or name in outs:  # an out_proj is its attention's job
            continue
        if cm is None or isinstance(cm, nn.Identity):
            jobs.append(Job(name, "dropped"))
        elif not isinstance(cm, LAYERS):
            jobs.append(Job(name, "factorized" if hasattr(cm, "rank") else f"replaced by {type(cm).__name__}"))
        elif in_width(cm) != in_width(om) or (layers is not None and name in layers):
            jobs.append(_job(name, om, cm, keep.get(name), calls[name], bns.get(name)))
    return jobs


def _heads_cut(original: nn.Module, cm: nn.Module | None, name: str, layers: list[str] | None) -> bool:
    """Whether attention `name`'s out_proj is a job: it lost heads, or `layers` names it."""
    if layers is not None:
        return f"{name}.out_proj" in layers
    inner = original.get_submodule(name).out_proj.in_features
    return cm is None or not isinstance(cm, ATTENTIONS) or cm.out_proj.in_features != inner


def _attention_job(name: str, om: nn.Module, cm: nn.Module | None, calls: int, follows: bool) -> Job:
    out = f"{name}.out_proj"
    if cm is None or isinstance(cm, nn.Identity):
        return Job(out, "dropped")
    if not isinstance(cm, ATTENTIONS):
        return Job(out, f"attention replaced by {type(cm).__name__}")
    if calls != 1:
        return Job(out, f"attention called {calls} times per forward")
    if cm.out_proj.out_features != om.out_proj.out_features:
        return Job(out, "its output width changed")
    if fit_dim(cm.out_proj) + 1 > MAX_DIM:
        return Job(out, f"too wide to fit ({fit_dim(cm.out_proj)} inputs per output > {MAX_DIM})")
    if not follows:
        return Job(out, "its head outputs cannot be recomputed (masked, or a variant netslim does not follow)")
    return Job(out, None, torch.arange(om.out_proj.out_features, device=cm.out_proj.weight.device), None, name)


def _job(name: str, om: nn.Module, cm: nn.Module, kept: list[int] | None, calls: int, bn: _BatchNorm | None) -> Job:
    if type(om) is not type(cm):
        return Job(name, f"type changed to {type(cm).__name__}")
    if calls != 1:
        return Job(name, f"called {calls} times per forward")
    groups = cm.groups if isinstance(cm, nn.Conv2d) else 1
    if groups > 1 and groups == cm.in_channels:
        return Job(name, "depthwise")
    if groups != (om.groups if isinstance(om, nn.Conv2d) else 1):
        return Job(name, "groups changed")
    if fit_dim(cm) + 1 > MAX_DIM:
        return Job(name, f"too wide to fit ({fit_dim(cm)} inputs per output > {MAX_DIM})")
    if kept is not None and len(kept) == out_width(cm):
        out_idx = torch.tensor(kept, dtype=torch.long)
    elif out_width(cm) == out_width(om):
        out_idx = torch.arange(out_width(om))
    else:
        out_idx = match_rows(om.weight, cm.weight)
        if out_idx is None:
            return Job(name, "kept outputs not found in the original's weights (pass the plan)")
    return Job(name, None, out_idx.to(cm.weight.device), bn)
