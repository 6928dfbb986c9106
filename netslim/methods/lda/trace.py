"""Backward utility trace: carry the selected pre-decision responses back to every prunable layer.

The rule, op by op (Zeiler–Fergus "deconvnet"): Linear -> multiply by Wᵀ; ReLU -> clamp the traced
signal at 0 (the signal's own sign, not the forward mask); max-pool -> unpool to the argmax recorded in
the forward pass; Conv2d -> transposed convolution with the same weights, no bias; BatchNorm (eval
mode) -> scale by gamma / sqrt(running_var + eps), no shift (the transpose of its linear part);
average pooling, flatten, residual add and concatenation -> their transposes (spread evenly, reshape,
copy to every branch and sum where branches meet, split).

Every op but the rectifier is linear in the traced signal, so autograd's vector-Jacobian product is
exactly that transpose; the trace therefore runs autograd on a copy of the model whose ReLU/ReLU6
modules are swapped for one whose backward clamps the incoming signal. Other activations (SiLU, GELU,
...) have no deconvnet rule and pass the signal through their ordinary derivative. Activations called
as functions inside `forward` (not as modules) cannot be swapped: the zoo uses modules throughout.

The utility of channel c of a layer is the spatial maximum of the rectified traced map at the layer's
response (output of conv -> BN -> activation), averaged over the traced images.

Attention heads: a head's features are its slice of out_proj's input (the concatenated head outputs), which
nn.MultiheadAttention never hands to out_proj as a module. out_proj is the attention's last op and linear, so
the signal there is out_projᵀ times the signal traced to the attention's output, read off a hook on the
attention itself (an nn.MultiheadAttention, the CutAttention of an earlier cut, or a timm-style attention). Its
tokens are reduced as positions are (their maximum), or to the first token alone (tokens="cls": ViT's class token).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.probe import ResponsePoint, response_modules
from netslim.probe.heads import batch_first, out_projection
from netslim.probe.qkv import is_qkv


class _Rectify(torch.autograd.Function):
    """Forward: ReLU (capped at `cap` for ReLU6). Backward: the deconvnet rule, clamp the signal at 0."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor, cap: float | None) -> torch.Tensor:  # type: ignore[override]
        return x.clamp(0.0, cap) if cap is not None else x.clamp_min(0.0)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad.clamp_min(0.0), None


class DeconvReLU(nn.Module):
    """Stand-in for nn.ReLU / nn.ReLU6 during a trace: same forward, deconvnet backward."""

    def __init__(self, cap: float | None = None) -> None:
        super().__init__()
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Rectify.apply(x, self.cap)


def tracing_copy(model: nn.Module) -> nn.Module:
    """An eval-mode copy with deconvnet rectifiers, no in-place ops and frozen parameters."""
    net = copy.deepcopy(model).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    for name, module in list(net.named_modules()):
        if type(module) is nn.ReLU:
            net.set_submodule(name, DeconvReLU())
        elif type(module) is nn.ReLU6:
            net.set_submodule(name, DeconvReLU(6.0))
        elif hasattr(module, "inplace"):
            module.inplace = False
    return net


def channel_utility(signal: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, C, *spatial) traced map -> (B, C): spatial max of the rectified signal (a Linear: (B, *, C))."""
    if kind == "linear" and signal.dim() > 2:
        signal = signal.movedim(-1, 1)
    signal = signal.clamp_min(0.0)
    if signal.dim() == 2:
        return signal
    return signal.flatten(2).amax(dim=2)


def head_signal(attention: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """The traced signal at the out-projection's input, (batch, tokens, heads × head_dim), from the one at the
    attention's output (in the attention's layout: batch first or not, or unbatched)."""
    return batch_first(attention, grad) @ out_projection(attention).weight.to(grad.dtype)


def feature_utility(signal: torch.Tensor, tokens: str) -> torch.Tensor:
    """(B, tokens, F) traced head features -> (B, F): rectified, then the maximum over tokens or the first's."""
    if tokens == "cls":
        if signal.dim() != 3:
            raise NetslimError("head_tokens=cls needs an attention over a token sequence with a class token first; "
                               f"this one's head outputs are {tuple(signal.shape)} (a window attention): use max")
        return signal[:, 0].clamp_min(0.0)
    return channel_utility(signal, "linear")


def trace(model: nn.Module, inputs: Iterable[torch.Tensor], mask: torch.Tensor, classifier: str,
          points: dict[str, ResponsePoint] | None = None, device: str | torch.device = "cpu",
          attentions: Sequence[str] = (), tokens: str = "max") -> dict[str, torch.Tensor]:
    """Mean channel utility (C,) of every response point, tracing `mask`-ed pre-decision responses back.

    `mask` (M,) weighs the M inputs of `classifier` (flattened): 1 for the selected neurons, 0 for the
    rest; the starting signal of each image is its own pre-decision response times the mask.
    `inputs` yields batches of normalised images. Layers whose response is only reachable through a
    shared module (ResponsePoint.post set) are left out of the result. Each attention of `attentions` gets,
    under its name, the utility (heads × head_dim,) of out_proj's input features, its tokens reduced by `tokens`.
    """
    net = tracing_copy(model).to(device)
    batches = iter(inputs)
    first = next(batches, None)
    if first is None:
        raise NetslimError("no images to trace utilities with")
    if points is None:
        points = response_modules(model, first[:1].to(device))
    modules = dict(net.named_modules())
    if classifier not in modules:
        raise NetslimError(f"the model has no classifier {classifier!r}")
    mask = mask.to(device=device, dtype=torch.float32).reshape(-1)
    grads: dict[str, torch.Tensor] = {}
    top: list[torch.Tensor] = []

    def capture(name: str):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(lambda g: grads.__setitem__(name, g.detach()))
        return hook

    def capture_heads(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(module: nn.Module, args: tuple, out: object) -> None:
            y = out[0] if isinstance(out, tuple) else out
            if isinstance(y, torch.Tensor) and y.requires_grad:
                y.register_hook(lambda g: grads.__setitem__(name, head_signal(module, g.detach())))
        return hook

    for name in attentions:
        if name not in modules or not (hasattr(modules[name], "out_proj") or is_qkv(modules[name])):
            raise NetslimError(f"the model has no attention {name!r} to trace heads of")
    handles = [modules[p.hook].register_forward_hook(capture(n)) for n, p in points.items() if p.post is None]
    handles += [modules[n].register_forward_hook(capture_heads(n)) for n in attentions]
    handles.append(modules[classifier].register_forward_pre_hook(lambda m, args: top.append(args[0])))
    sums: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for x in _chain(first, batches):
            x = x.to(device).requires_grad_(True)
            grads.clear()
            top.clear()
            net(x)
            if len(top) != 1:
                raise NetslimError(f"classifier {classifier!r} ran {len(top)} times in one forward pass")
            z = top[0]
            flat = z.reshape(z.shape[0], -1)
            if flat.shape[1] != mask.numel():
                raise NetslimError(f"mask has {mask.numel()} entries, the pre-decision layer {flat.shape[1]}")
            seed = (flat.detach() * mask).reshape(z.shape)
            torch.autograd.backward(z, seed)
            for name, g in grads.items():
                u = (feature_utility(g, tokens) if name in attentions else
                     channel_utility(g, points[name].kind)).double().sum(0)
                sums[name] = sums[name] + u if name in sums else u
            count += x.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {name: (s / count).cpu() for name, s in sums.items()}


def _chain(first: torch.Tensor, rest: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    yield first
    yield from rest
