"""A Plan's size by arithmetic: what each layer's parameters and MACs are as a function of its widths.

Sizing a Plan by surgery (netslim.cost.size.plan_size) traces the network, builds torch-pruning's graph and
cuts a meta copy: seconds for a DenseNet, and a budget search sizes hundreds of Plans. A SizeModel does
that work once per model: one traced forward records every Conv/Linear's output positions, and every
channel group records, through torch-pruning's own dependency graph (netslim.surgery.graph.group_effects),
which axes of which layers one cut channel removes (concatenations, depthwise pairs, norms, bare
parameters included). A Plan's size is then sums and products over those widths.

It is exact or it says nothing: `size` returns None for a Plan it cannot express (depth drops,
factorization, head cuts, a group whose cut depends on which channels go, a width surgery would refuse),
and a model whose FLOPs are not all Conv/Linear FLOPs (attention matmuls) or that has self-counted
(factorized) layers gets no SizeModel at all; `fast_plan_size` then sizes by surgery.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from netslim.cost.size import _self_counted, plan_size, storage_bytes, stored_params
from netslim.plan import Plan
from netslim.surgery.apply import check_plan, find_classifier
from netslim.surgery.graph import ChannelGroup, Effect, build_graph, channel_groups, group_effects

Var = tuple[str, str]  # (module or parameter name, axis): "out", "in", "c" or a parameter's dimension
_AXIS = {"conv_out": "out", "linear_out": "out", "depthwise": "out", "conv_in": "in", "linear_in": "in",
         "norm": "c", "layernorm": "c"}
_ENABLED = [True]


@dataclass
class _Term:
    """`factor` × the product of `vars`: the entries of one tensor (or a layer's MACs) at the Plan's widths."""

    factor: int
    vars: tuple[Var, ...]
    buffer: bool = False  # a floating buffer: stored (bytes) but not a parameter
    macs: bool = False


@dataclass
class SizeModel:
    """Per-layer size of one model at one input size; `size(plan)` is arithmetic (see the module docstring)."""

    model_ref: weakref.ref[nn.Module]  # weak: the model's entry in _MODELS must not keep the model alive
    input_size: tuple[int, ...]
    groups: list[ChannelGroup]
    effects: list[list[tuple[Var, int]] | None]  # per group: (axis, entries per cut channel); None: opaque
    base: dict[Var, int]
    terms: list[_Term]
    constant: dict[str, int]  # params, stored values and MACs of everything no cut can reach
    classifier: str
    out_classes: int
    root: dict[str, int] = field(default_factory=dict)  # group root -> index

    @classmethod
    def of(cls, model: nn.Module, input_size: Sequence[int]) -> SizeModel | None:
        """The model's SizeModel (built once per model and input size), or None when it cannot be exact."""
        shape = tuple(int(s) for s in input_size)
        try:
            per_model = _MODELS.setdefault(model, {})
        except TypeError:
            per_model = {}
        if shape not in per_model:
            try:
                per_model[shape] = _build(model, shape)
            except Exception:  # anything the model does that this model of it does not follow: surgery decides
                per_model[shape] = None
        return per_model[shape]

    def size(self, plan: Plan) -> dict[str, int] | None:
        """params, MACs, FLOPs and bytes of the planned network, or None when the Plan needs surgery to size."""
        model = self.model_ref()
        if model is None or plan.drop or plan.factorize or plan.heads \
                or tuple(plan.input_size) != self.input_size:
            return None
        check_plan(plan, model, self.groups)  # the same refusals as surgery
        kept: dict[str, int] = {}
        for g in self.groups:
            idx = next((plan.keep[n] for n in g.layers if n in plan.keep), None)
            if idx is not None:
                kept[g.root] = len(idx)
        classes = None if plan.classes is None else len(plan.classes)
        if classes is not None and plan.num_classes != self.out_classes:
            return None
        return self.size_widths(kept, classes)

    def size_widths(self, kept: dict[str, int], classes: int | None = None) -> dict[str, int] | None:
        """Size when each group (by root) keeps `kept[root]` channels (all when absent), `classes` outputs."""
        vals = dict(self.base)
        for root, k in kept.items():
            gi = self.root.get(root)
            if gi is None:
                return None
            cut = self.groups[gi].width - k
            if cut <= 0:
                continue
            effects = self.effects[gi]
            if effects is None:
                return None
            for var, per in effects:
                vals[var] -= per * cut
        if classes is not None:
            vals[(self.classifier, "out")] -= self.out_classes - classes
        if any(v <= 0 for v in vals.values()):
            return None  # a layer would lose every channel: surgery refuses, with its own message
        params, stored, macs = self.constant["params"], self.constant["stored"], self.constant["macs"]
        for t in self.terms:
            n = t.factor * math.prod(vals[v] for v in t.vars)
            if t.macs:
                macs += n
            elif t.buffer:
                stored += n
            else:
                params += n
                stored += n
        return {"params": params, "macs": macs, "flops": 2 * macs, "bytes": 4 * stored}


_MODELS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], SizeModel | None]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def surgery_only() -> Iterator[None]:
    """Size every Plan by surgery inside this block (benchmarks compare the two; tests check they agree)."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


def fast_plan_size(plan: Plan, template: nn.Module | None) -> dict[str, int]:
    """plan_size(plan, template), by the template's SizeModel when it can express the Plan (same numbers)."""
    if template is not None and _ENABLED[-1]:
        model = SizeModel.of(template, plan.input_size)
        size = model.size(plan) if model is not None else None
        if size is not None:
            return size
    return plan_size(plan, template)


def enabled() -> bool:
    return _ENABLED[-1]


def _positions(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], int]:
    """Per Conv/Linear: output positions summed over its calls (MACs = positions × weight entries); total MACs."""
    pos: dict[str, int] = {}

    def hook(name: str, mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Linear):
            n = inp[0].numel() // mod.in_features
        else:
            n = out.numel() // out.shape[1] if not mod.transposed else -1
        pos[name] = pos.get(name, 0) + n

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.modules.conv._ConvNd)]
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: hook(n, mod, i, o)) for n, m in layers]
    was = model.training
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.eval()(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return pos, int(counter.get_total_flops()) // 2


def _module_terms(name: str, m: nn.Module, positions: int) -> list[tuple[torch.Tensor, _Term]]:
    """The tensors of a layer some cut reaches, each as a _Term over its axes (plus its MACs as a last term)."""
    out: list[tuple[torch.Tensor, _Term]] = []
    if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
        w = m.weight
        kernel = math.prod(w.shape[2:])
        if isinstance(m, nn.Linear) or m.groups == 1:
            wt = _Term(kernel, ((name, "out"), (name, "in")))
        else:  # depthwise: the in-axis per group stays
            wt = _Term(kernel * w.shape[1], ((name, "out"),))
        out.append((w, wt))
        if m.bias is not None:
            out.append((m.bias, _Term(1, ((name, "out"),))))
        out.append((w, _Term(wt.factor * positions, wt.vars, macs=True)))
        return out
    for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
        if not t.is_floating_point():
            continue
        buffer = not isinstance(t, nn.Parameter)
        if isinstance(m, nn.LayerNorm):
            out.append((t, _Term(math.prod(t.shape[:-1]), ((name, "c"),), buffer)))
        elif t.dim() == 1:
            out.append((t, _Term(1, ((name, "c"),), buffer)))
        else:
            raise ValueError(f"{name}: a {type(m).__name__} tensor of shape {tuple(t.shape)}")
    return out


def _build(model: nn.Module, shape: tuple[int, ...]) -> SizeModel | None:
    if _self_counted(model):
        return None  # factorized or sparse layers count themselves
    p = next(model.parameters())
    example = torch.zeros(1, *shape, device=p.device, dtype=p.dtype)
    classifier = find_classifier(model)
    graph = build_graph(model, example)
    groups = channel_groups(model, example, classifier, graph)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    effects: list[list[tuple[Var, int]] | None] = []
    axes: dict[str, set[str]] = {}
    for g, found in zip(groups, group_effects(graph, model, groups), strict=True):
        outs = {e.target: e.per_channel for e in found or [] if _var(e)[1] == "out"}
        if any(outs.get(n) != 1 for n in g.layers):
            found = None  # a member would not lose exactly the cut channels: let surgery judge
        effects.append(None if found is None else [(_var(e), e.per_channel) for e in found])
        for e in found or []:
            axes.setdefault(e.target, set()).add(_var(e)[1])
    axes.setdefault(classifier, set()).add("out")
    positions, total_macs = _positions(model, example)
    if any(n < 0 for n in positions.values()):
        return None
    terms: list[_Term] = []
    reached: set[int] = set()
    macs = 0
    for name, ax in axes.items():
        if name in params and name not in modules:  # a bare parameter cut along one dimension
            t = params[name]
            if len(ax) != 1:
                return None
            axis = next(iter(ax))
            terms.append(_Term(t.numel() // t.shape[int(axis)], ((name, axis),)))
            reached.add(id(t))
            continue
        for t, term in _module_terms(name, modules[name], positions.get(name, 0)):
            if term.macs:
                macs += t.numel() * positions.get(name, 0)
            else:
                reached.add(id(t))
            terms.append(term)
    base = _bases(modules, params, terms)
    constant = _constants(model, reached, total_macs - macs)
    sm = SizeModel(weakref.ref(model), shape, groups, effects, base, terms, constant, classifier,
                   model.get_submodule(classifier).out_features, {g.root: i for i, g in enumerate(groups)})
    whole = {"params": stored_params(model), "macs": total_macs, "flops": 2 * total_macs,
             "bytes": storage_bytes(model)}
    if sm.size_widths({}) != whole or _linear_macs(positions, modules) != total_macs:
        return None  # something counted that these terms do not see (attention matmuls, a custom layer)
    return sm


def _var(e: Effect) -> Var:
    return (e.target, _AXIS[e.kind]) if e.kind in _AXIS else (e.target, str(e.dim))


def _bases(modules: dict[str, nn.Module], params: dict[str, nn.Parameter], terms: list[_Term]) -> dict[Var, int]:
    """Every axis's width in the uncut model."""
    base: dict[Var, int] = {}
    for t in terms:
        for name, axis in t.vars:
            if name in modules:
                base[(name, axis)] = _width(modules[name], axis)
            else:
                base[(name, axis)] = int(params[name].shape[int(axis)])
    return base


def _width(m: nn.Module, axis: str) -> int:
    """A layer's width along "out", "in" or (norms, PReLU) "c"."""
    attrs = {"out": ("out_channels", "out_features"), "in": ("in_channels", "in_features"),
             "c": ("num_features", "num_channels", "num_parameters")}[axis]
    if axis == "c" and isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    for attr in attrs:
        if hasattr(m, attr):
            return int(getattr(m, attr))
    raise ValueError(f"no {axis} width on {type(m).__name__}")


def _constants(model: nn.Module, reached: set[int], macs: int) -> dict[str, int]:
    """What no cut changes: parameters and floating buffers not in any term, and the MACs of other layers."""
    params = sum(p.numel() for p in model.parameters() if id(p) not in reached)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point() and id(b) not in reached)
    return {"params": params, "stored": params + buffers, "macs": macs}


def _linear_macs(positions: dict[str, int], modules: dict[str, nn.Module]) -> int:
    return sum(n * modules[name].weight.numel() for name, n in positions.items())
