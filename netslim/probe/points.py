"""Where each prunable layer's response appears: act(bn(layer(x))), found by tracing one forward pass.

The chain is recovered from tensor identity (the BN receives exactly the tensor the layer returned, not
modified in place since), so a residual add between BN and ReLU correctly ends the chain at the BN.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from netslim.errors import NetslimError

LAYER_TYPES = (nn.Conv2d, nn.Linear)
ACT_TYPES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU)


@dataclass(frozen=True)
class ResponsePoint:
    """The response of `layer`: output of module `hook`, passed through `post` when that is set.

    `post` is only used when a later module of the chain is shared with other calls (e.g. one ReLU
    reused twice in a block): the hook then sits earlier and the rest of the chain is replayed on a copy.
    """

    layer: str
    kind: str  # "conv" | "linear"
    channels: int
    bn: str | None
    act: str | None
    hook: str
    post: nn.Module | None = field(default=None, compare=False, repr=False)


@dataclass(eq=False)
class _Call:
    name: str
    module: nn.Module
    inp: torch.Tensor | None = None
    inp_version: int = -1
    out: torch.Tensor | None = None
    out_version: int = -1


def _first_tensor(args: tuple) -> torch.Tensor | None:
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def trace_calls(model: nn.Module, example_input: torch.Tensor) -> list[_Call]:
    """Calls of layer, BN and activation modules in execution order, with their input/output tensors."""
    calls: list[_Call] = []
    open_calls: dict[int, list[_Call]] = {}
    handles = []

    def pre_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            inp = _first_tensor(args)
            call = _Call(name, module, inp, inp._version if inp is not None else -1)
            calls.append(call)
            open_calls.setdefault(id(module), []).append(call)

        return hook

    def post_hook(module: nn.Module, args: tuple, out: object) -> None:
        call = open_calls[id(module)].pop()
        if isinstance(out, torch.Tensor):
            call.out, call.out_version = out, out._version

    watched = LAYER_TYPES + (_BatchNorm,) + ACT_TYPES
    for name, module in model.named_modules():
        if isinstance(module, watched):
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return calls


def _consumer(calls: list[_Call], start: int, types: tuple) -> int | None:
    """Index of the first later call of `types` fed the output of calls[start], untouched since produced."""
    producer = calls[start]
    if producer.out is None:
        return None
    for j in range(start + 1, len(calls)):
        call = calls[j]
        if isinstance(call.module, types) and call.inp is producer.out and call.inp_version == producer.out_version:
            return j
    return None


def _channels(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def _no_inplace(module: nn.Module) -> nn.Module:
    clone = copy.deepcopy(module)
    if hasattr(clone, "inplace"):
        clone.inplace = False
    return clone


def response_modules(
    model: nn.Module,
    example_input: torch.Tensor,
    layers: Iterable[str] | None = None,
    classifier: str | None = None,
) -> dict[str, ResponsePoint]:
    """Map every Conv2d/Linear (or the given `layers`) to the point where its response can be hooked.

    The final classifier (`classifier`, default: the last Linear called) is left out unless named in
    `layers`. Layers called more than once per forward have no single response and are left out too
    (an error when named explicitly). The result is in forward-call order.
    """
    calls = trace_calls(model, example_input)
    counts: dict[int, int] = {}
    for call in calls:
        counts[id(call.module)] = counts.get(id(call.module), 0) + 1
    layer_calls = [(i, c) for i, c in enumerate(calls) if isinstance(c.module, LAYER_TYPES)]
    if classifier is None:
        linears = [c.name for _, c in layer_calls if isinstance(c.module, nn.Linear)]
        classifier = linears[-1] if linears else None

    wanted = None if layers is None else list(layers)
    if wanted is not None:
        known = {n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise NetslimError(f"no Conv2d/Linear layer named {', '.join(map(repr, unknown))} in the model")
        called = {c.name for _, c in layer_calls}
        never = [n for n in wanted if n not in called]
        if never:
            raise NetslimError(f"layer {', '.join(map(repr, never))} is not used in the forward pass")

    points: dict[str, ResponsePoint] = {}
    for i, call in layer_calls:
        if wanted is None and call.name == classifier:
            continue
        if wanted is not None and call.name not in wanted:
            continue
        if counts[id(call.module)] > 1:
            if wanted is not None:
                raise NetslimError(f"layer {call.name!r} is called more than once per forward pass")
            continue
        if call.name in points:
            continue
        points[call.name] = _point(calls, i, call, counts)
    return points


def _point(calls: list[_Call], i: int, call: _Call, counts: dict[int, int]) -> ResponsePoint:
    channels = _channels(call.module)
    chain, last = [call], i
    j = _consumer(calls, i, (_BatchNorm,))
    bn = calls[j] if j is not None and calls[j].module.num_features == channels else None
    if bn is not None:
        chain.append(bn)
        last = j
    j = _consumer(calls, last, ACT_TYPES)
    act = calls[j] if j is not None else None
    if act is not None:
        chain.append(act)
    hook_at = max(j for j, c in enumerate(chain) if counts[id(c.module)] == 1)
    rest = [c.module if isinstance(c.module, _BatchNorm) else _no_inplace(c.module) for c in chain[hook_at + 1 :]]
    post = None if not rest else rest[0] if len(rest) == 1 else nn.Sequential(*rest)
    return ResponsePoint(
        layer=call.name,
        kind="conv" if isinstance(call.module, nn.Conv2d) else "linear",
        channels=channels,
        bn=bn.name if bn is not None else None,
        act=act.name if act is not None else None,
        hook=chain[hook_at].name,
        post=post,
    )
