"""ThiNet channel selection (Luo et al. 2017): at the widths a method chose, keep in each channel group the
channels whose removal leaves the least error in the layers that consume them.

A consumer's output element is a sum of per-input-channel contributions z_c = Σ_k W[o, c, k]·X[c, k]. Removing
a set T of channels changes it by Σ_{c∈T} z_c, so the error of removing T, summed over sampled (image,
position, output channel) triples, is 1_Tᵀ Z 1_T with Z = Σ z zᵀ (C × C, streamed in float64). ThiNet's greedy
adds to T, one at a time, the channel that raises that error least; with v = Z 1_T each step is O(C). Every
consumer's Z is divided by its trace, so a residual group's consumers weigh alike.

Only the choice of channels changes: the Plan keeps its widths, so its size and cost are the method's.
Groups whose cut reaches a depthwise or grouped conv, a LayerNorm or a bare parameter keep the method's
choice (reported), as does any group the Plan does not cut.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netslim.plan import Plan
from netslim.repair.capture import Batches, iterate, patches, sample_positions
from netslim.surgery.apply import find_classifier
from netslim.surgery.graph import ChannelGroup, build_graph, channel_groups, group_effects

CONSUMES = ("conv_in", "linear_in")
KEEPS_CHOICE = ("depthwise", "layernorm", "param")


def thinet_select(model: nn.Module, plan: Plan, batches: Batches, *, positions: int = 16, seed: int = 0,
                  device: str | torch.device = "cpu") -> dict[str, Any]:
    """Re-choose, in place, the kept channels of every group `plan` cuts (see module doc); what changed."""
    t0 = time.perf_counter()
    example = next(iter(iterate(batches)))
    example = (example[0] if isinstance(example, (tuple, list)) else example)[:2].to(device)
    graph = build_graph(model, example)
    groups = channel_groups(model, example, find_classifier(model), graph=graph)
    chosen: dict[int, ChannelGroup] = {}
    consumers: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for i, (g, effects) in enumerate(zip(groups, group_effects(graph, model, groups), strict=True)):
        if g.root not in plan.keep or len(plan.keep[g.root]) >= g.width:
            continue
        why = _unsupported(model, effects, g.width)
        if why:
            skipped[g.root] = why
            continue
        chosen[i] = g
        consumers.update({e.target: i for e in effects if e.kind in CONSUMES})  # type: ignore[union-attr]
    grams = _grams(model, consumers, {i: g.width for i, g in chosen.items()}, batches, positions, seed, device)
    changed = 0
    for i, g in chosen.items():
        keep = greedy_keep(grams[i], len(plan.keep[g.root]))
        changed += len(set(plan.keep[g.root]) - set(keep))
        for name in g.layers:
            if name in plan.keep:
                plan.keep[name] = keep
    plan.meta["selection"] = "thinet"
    return {"selection": "thinet", "groups": len(chosen), "channels_changed": changed, "skipped": skipped,
            "seconds": round(time.perf_counter() - t0, 2)}


def _unsupported(model: nn.Module, effects: list | None, width: int) -> str | None:
    if effects is None:
        return "its cut does not remove the same entries for every channel"
    kinds = {e.kind for e in effects}
    if kinds & set(KEEPS_CHOICE):
        return f"its cut reaches a {sorted(kinds & set(KEEPS_CHOICE))[0]} layer"
    users = [e for e in effects if e.kind in CONSUMES]
    if not users:
        return "no layer consumes its channels"
    for e in users:
        m = model.get_submodule(e.target)
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            return "a grouped conv consumes its channels"
        if (m.in_channels if isinstance(m, nn.Conv2d) else m.in_features) != width * e.per_channel:
            return f"{e.target} also reads other channels (a concatenation)"
    return None


def greedy_keep(gram: torch.Tensor, keep: int) -> list[int]:
    """ThiNet's greedy: remove, one at a time, the channel whose removal adds the least error 1_Tᵀ Z 1_T."""
    width = gram.shape[0]
    v = torch.zeros(width, dtype=gram.dtype)
    diag = gram.diagonal().clone()
    gone = torch.zeros(width, dtype=torch.bool)
    for _ in range(width - keep):
        cost = torch.where(gone, torch.full_like(diag, float("inf")), 2 * v + diag)
        c = int(cost.argmin())
        gone[c] = True
        v += gram[:, c]
    return [int(i) for i in torch.nonzero(~gone).flatten()]


@torch.no_grad()
def _grams(model: nn.Module, consumers: dict[str, int], widths: dict[int, int], batches: Batches, positions: int,
           seed: int, device: str | torch.device) -> dict[int, torch.Tensor]:
    """Per group, Σ over its consumers of Z / tr(Z), from one forward pass over `batches` with hooks."""
    per_layer: dict[str, torch.Tensor] = {}
    gen = torch.Generator().manual_seed(seed)

    def hook(name: str, width: int) -> Callable[[nn.Module, tuple], None]:
        def grab(module: nn.Module, args: tuple) -> None:
            x = args[0]
            rows = patches(module, x, sample_positions(module, x, positions, gen)).double()
            w = module.weight.detach().double().reshape(module.weight.shape[0], width, -1)
            out = torch.randint(w.shape[0], (rows.shape[0],), generator=gen).to(w.device)
            z = (rows.reshape(rows.shape[0], width, -1) * w[out]).sum(-1)
            per_layer[name] = per_layer.get(name, 0) + (z.T @ z).cpu()

        return grab

    was = model.training
    model.eval()
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n, widths[i])) for n, i in consumers.items()]
    try:
        for item in iterate(batches):
            model((item[0] if isinstance(item, (tuple, list)) else item).to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    grams = {i: torch.zeros(w, w, dtype=torch.float64) for i, w in widths.items()}
    for name, z in per_layer.items():
        tr = float(z.diagonal().sum())
        if tr > 0:
            grams[consumers[name]] += z / tr
    return grams
