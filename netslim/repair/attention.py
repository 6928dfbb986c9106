"""An attention's out_proj as a refit consumer: after a head cut, its inputs are the kept heads' outputs.

nn.MultiheadAttention applies out_proj functionally, so no hook sees out_proj's input (netslim.probe.heads).
It is recomputed from the attention call's query, key and value (head_qkv + scaled dot-product attention): in
the cut network, the kept heads' concatenated outputs are X′; in the original, all heads' outputs times the
original out_proj give the uncut attention's output Y (capture.targets of them). out_proj is then refitted as
any Linear is (netslim.repair.lsq): a cut head that copies a kept one goes into its twin's columns, any other
cut head into its least-squares projection onto the kept heads' outputs. q, k and v are not refitted: their
input width (the residual stream's) does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.probe.heads import call_heads, reproduces
from netslim.repair.capture import _inputs, _Stop, run_to_hook


@torch.no_grad()
def head_rows(attention: nn.Module, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    """out_proj's input for one unmasked call of `attention` (nn.MultiheadAttention or CutAttention): the
    concatenated head outputs, one row per (image, token), images first whatever the layout."""
    heads = call_heads(attention, args, kwargs)
    if heads is None:
        raise NetslimError("repair: an attention called with a mask cannot have its out_proj refitted")
    return heads.reshape(-1, heads.shape[-1])


def recomputable(model: nn.Module, names: list[str], example: torch.Tensor) -> set[str]:
    """The attentions of `names` whose output the recomputed head outputs reproduce (out_proj of them) on
    `example`, called once and unmasked: only those can be refitted without being mis-measured."""
    calls: dict[str, int] = {}
    good: set[str] = set()

    def check(name: str) -> Callable[[nn.Module, tuple, dict, Any], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            heads = call_heads(module, args, kwargs)
            if heads is not None and reproduces(module, heads, output):
                good.add(name)
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(check(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return {n for n in good if calls.get(n) == 1}


def paired_heads(original: nn.Module, cut: nn.Module, name: str, batches: Iterable[Any], *,
                 device: str | torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """Per batch: (all heads' outputs of attention `name` in `original`, the kept heads' in `cut`, images), both
    networks run only up to the attention (as capture.paired_patches does for a layer's input)."""
    seen: dict[str, torch.Tensor] = {}

    def grab(key: str) -> Callable[[nn.Module, tuple, dict], None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            seen[key] = head_rows(module, args, kwargs)
            raise _Stop

        return hook

    handles = [original.get_submodule(name).register_forward_pre_hook(grab("orig"), with_kwargs=True),
               cut.get_submodule(name).register_forward_pre_hook(grab("cut"), with_kwargs=True)]
    try:
        for item in batches:
            x = _inputs(item).to(device)
            run_to_hook((original, cut), x, f"attention {name!r}")
            yield seen.pop("orig"), seen.pop("cut"), x.shape[0]
    finally:
        for h in handles:
            h.remove()
