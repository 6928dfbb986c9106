"""Fast batched filter ablation: accuracy of a network with chosen output channels zeroed at their response.

CAR needs one evaluation of the network per candidate filter per greedy step. Two things make that
cheap. (1) Everything before the layer under study is the same for every ablation, so the tensors that
enter the rest of the network (the layer's response, plus any earlier tensor a skip connection still
needs) are computed once and cached; an ablation runs only the tail. (2) Many ablations run in one
forward pass: the cached batch is replicated M times and multiplied by an (M, C) channel mask.

The tail is cut out of a torch.fx trace of the model. Where tracing fails (data-dependent control flow)
the engine falls back to the full network with a forward hook that applies the mask, still batched.

"Without f" means f's channel is zero *after* BatchNorm (and its activation): the hook point of
`netslim.probe.response_modules`. Every supported activation maps 0 to 0, so zeroing before or after it
is the same; zeroing the conv weight alone would let the BN bias leak through. A Linear applied to tokens
(a ViT's MLP) has its channels last: its mask is broadcast over that dimension instead of dimension 1.

One algorithm in one file (about 390 lines): the tail extraction, the mask batching and the hook fallback
share their bookkeeping, and splitting them would spread one invariant (what the tail needs) over modules.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from netslim.errors import NetslimError
from netslim.probe import response_modules
from netslim.probe.traced import forward_inputs

# Channel-wise modules with f(0) = 0: a channel zeroed before them is zero after them, so the mask may
# be applied past them (the cache is then smaller, e.g. after a max-pool).
_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                    nn.AdaptiveMaxPool2d, nn.Dropout, nn.Identity)


def _mask_mul(x: torch.Tensor, mask: torch.Tensor, start: int, end: int, last: bool = False) -> torch.Tensor:
    """x * mask[:, start:end], broadcast over the spatial dimensions (mask rows follow the batch); channels are
    dimension 1, or the last one with `last` (a Linear applied to tokens: batch, tokens, channels)."""
    m = mask[:, start:end]
    if last:
        return x * m.reshape(m.shape[0], *([1] * (x.dim() - 2)), m.shape[1]).to(x.dtype)
    return x * m.reshape(m.shape[0], m.shape[1], *([1] * (x.dim() - 2))).to(x.dtype)


@dataclass
class Slot:
    """One coupled group of layers whose output channel c is ablated together; mask columns start:end."""

    layers: tuple[str, ...]
    hooks: tuple[str, ...]  # module whose output is the response of each member
    start: int
    end: int
    last: tuple[bool, ...] = ()  # per hook: channels are its response's last dimension (a Linear's on tokens)

    def last_at(self, hook: str) -> bool:
        """Whether the response at `hook` has its channels last (a coupled group may mix a conv and Linears)."""
        return bool(self.last) and self.last[self.hooks.index(hook)]

    @property
    def width(self) -> int:
        return self.end - self.start


@dataclass
class EngineStats:
    evaluations: int = 0  # masks evaluated, each on the whole evaluation set
    images: int = 0  # image-forwards through the tail
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): meaningful on a shared machine
    cache_seconds: float = 0.0

    @property
    def evals_per_second(self) -> float:
        return self.evaluations / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"evaluations": self.evaluations, "image_forwards": self.images, "seconds": round(self.seconds, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "cache_seconds": round(self.cache_seconds, 3),
                "evals_per_second": round(self.evals_per_second, 4),
                "images_per_second": round(self.images / self.seconds, 1) if self.seconds else 0.0}


@dataclass
class _Split:
    head: fx.GraphModule  # input -> tuple of boundary tensors
    tail: fx.GraphModule  # (*boundary, mask) -> logits
    boundary: list[str] = field(default_factory=list)
    masked_boundary: int = 0  # which boundary tensor is the first slot's response
    first_slot: int = 0
    masked_last: bool = False  # whether that response has its channels last


class AblationEngine:
    """Correct-prediction counts on a fixed labelled set for many channel masks at once.

    `groups` lists coupled groups (each a tuple of layer names); a mask has one column per channel of
    every group, in order. 1 keeps a channel, 0 ablates it. `fast=False` is the naive reference: the
    full network per pass, with the mask applied by hooks.
    """

    def __init__(self, model: nn.Module, groups: list[tuple[str, ...]], images: torch.Tensor,
                 labels: torch.Tensor, num_classes: int, *, device: str | torch.device = "cpu",
                 batch_size: int = 256, masks_per_pass: int = 32, fast: bool = True,
                 channels_last: bool = True, precision: str = "fp32") -> None:
        self._load(model, images, labels, num_classes, device, batch_size, masks_per_pass, channels_last, precision)
        example = images[:1].to(self.device)
        points = response_modules(self.model, example, layers=[n for g in groups for n in g])
        self.slots: list[Slot] = []
        start = 0
        for g in groups:
            widths = {points[n].channels for n in g}
            if len(widths) != 1:
                raise NetslimError(f"coupled layers {', '.join(g)} have different widths {sorted(widths)}")
            width = widths.pop()
            self.slots.append(Slot(tuple(g), tuple(points[n].hook for n in g), start, start + width,
                                   tuple(points[n].kind == "linear" for n in g)))
            start += width
        self.width = start
        self.split: _Split | None = None
        self.path = "full network per pass, mask by forward hooks"
        self._cache: list[torch.Tensor] | None = None
        if fast:
            try:
                self.split = _split(self.model, self.slots)
            except _Unsupported as e:
                self.path = f"full network per pass, mask by forward hooks (tail not separable: {e})"
        if self.split is not None:
            try:
                self._build_cache()
                self.path = (f"cached input of the tail at {self.split.boundary[self.split.masked_boundary]} "
                             f"({len(self.split.boundary)} cached tensor(s)), tail only per ablation")
            except _Unsupported as e:
                self.split, self._cache = None, None
                self.path = f"full network per pass, mask by forward hooks (cache not usable: {e})"

    # -- public ---------------------------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return int(self.labels.shape[0])

    def class_totals(self) -> torch.Tensor:
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes).double()

    def full_mask(self) -> torch.Tensor:
        return torch.ones(self.width)

    def slot_slice(self, i: int) -> slice:
        return slice(self.slots[i].start, self.slots[i].end)

    def correct(self, masks: torch.Tensor, per_class: bool = False) -> torch.Tensor:
        """Correct predictions per mask, (M,) (or per class, (M, K)) as float64 counts."""
        counts, _ = self.evaluate(masks)
        return counts if per_class else counts.sum(1)

    @torch.inference_mode()
    def evaluate(self, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per mask: correct predictions per class (M, K) and summed cross-entropy (M,), float64."""
        masks = torch.as_tensor(masks, dtype=torch.float32)
        if masks.dim() == 1:
            masks = masks[None]
        if masks.shape[1] != self.width:
            raise NetslimError(f"mask has {masks.shape[1]} columns, the engine ablates {self.width} channels")
        t0, c0 = time.perf_counter(), time.process_time()
        counts = torch.zeros(masks.shape[0], self.num_classes, dtype=torch.float64, device=self.device)
        loss = torch.zeros(masks.shape[0], dtype=torch.float64, device=self.device)
        masks = masks.to(self.device)
        for m0 in range(0, masks.shape[0], self.masks_per_pass):
            group = masks[m0:m0 + self.masks_per_pass]
            self._run_group(group, counts[m0:m0 + group.shape[0]], loss[m0:m0 + group.shape[0]])
        self.stats.evaluations += masks.shape[0]
        self.stats.images += masks.shape[0] * self.n
        self.stats.seconds += time.perf_counter() - t0
        self.stats.cpu_seconds += time.process_time() - c0
        return counts.cpu(), loss.cpu()

    def ablate(self, base: torch.Tensor, channels: list[int], per_class: bool = False) -> torch.Tensor:
        """Correct counts with each of `channels` zeroed (one at a time) on top of the `base` mask."""
        masks = base.float().repeat(len(channels), 1)
        masks[torch.arange(len(channels)), torch.tensor(channels, dtype=torch.long)] = 0
        return self.correct(masks, per_class)

    # -- internals --------------------------------------------------------------------------------------------
    def _load(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
              device: str | torch.device, batch_size: int, masks_per_pass: int, channels_last: bool,
              precision: str) -> None:
        """The frozen eval-mode copy of the model and the evaluation set on the device (any masked unit)."""
        if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
            raise NetslimError("CAR needs a non-empty labelled evaluation set")
        self.device = torch.device(device)
        self.model = copy.deepcopy(model).eval().to(self.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.channels_last = channels_last and images.dim() == 4
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.images = images.to(self.device)  # a few thousand images: moved once, not per pass
        self.labels = labels.to(self.device)
        self.num_classes = num_classes
        self.batch_size = max(1, int(batch_size))
        self.masks_per_pass = max(1, int(masks_per_pass))
        self.stats = EngineStats()
        if precision not in ("fp32", "bf16"):
            raise NetslimError(f"precision must be fp32 or bf16, not {precision!r}")
        self.precision = precision

    def _chunk(self, m: int) -> int:
        """Images per pass for m masks: the forward batch is about batch_size."""
        return max(1, self.batch_size // m)

    def _inputs(self, sl: slice) -> torch.Tensor:
        x = self.images[sl].to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _build_cache(self) -> None:
        assert self.split is not None
        t0 = time.perf_counter()
        parts: list[list[torch.Tensor]] = []
        with torch.inference_mode():
            for s in range(0, self.n, self.batch_size):
                sl = slice(s, min(self.n, s + self.batch_size))
                outs = self.split.head(self._inputs(sl))
                if len(parts) == 0:
                    parts = [[] for _ in outs]
                for j, t in enumerate(outs):
                    if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != sl.stop - sl.start:
                        raise _Unsupported(f"boundary value {self.split.boundary[j]} is not a per-image tensor")
                    parts[j].append(t.clone())
        self._cache = [torch.cat(p) for p in parts]
        self.stats.cache_seconds += time.perf_counter() - t0

    def _run_group(self, masks: torch.Tensor, counts: torch.Tensor, loss: torch.Tensor) -> None:
        m = masks.shape[0]
        b = self._chunk(m)
        for s in range(0, self.n, b):
            sl = slice(s, min(self.n, s + b))
            nb = sl.stop - sl.start
            rows = masks.repeat_interleave(nb, dim=0)  # mask of every replicated image, mask-major
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                if self.split is not None and self._cache is not None:
                    logits = self._tail(sl, masks, rows)
                else:
                    logits = self._hooked(self._inputs(sl), m, rows)
            logits = logits.float()
            y = self.labels[sl]
            hits = (logits.argmax(1).view(m, nb) == y[None]).double()
            counts.scatter_add_(1, y[None].expand(m, nb), hits)
            ce = torch.nn.functional.cross_entropy(logits, y.repeat(m), reduction="none")
            loss += ce.view(m, nb).double().sum(1)

    def _tail(self, sl: slice, masks: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        assert self.split is not None and self._cache is not None
        m = masks.shape[0]
        slot = self.slots[self.split.first_slot]
        inputs = []
        for j, t in enumerate(self._cache):
            x = t[sl]
            if j == self.split.masked_boundary:  # replicate and mask in one broadcast multiply
                spatial = [1] * (x.dim() - 2)
                cm = masks[:, slot.start:slot.end].reshape(m, 1, *(spatial + [slot.width] if self.split.masked_last
                                                                   else [slot.width] + spatial))
                x = (x.unsqueeze(0) * cm).reshape(m * x.shape[0], *x.shape[1:])
            else:
                x = x.repeat(m, *([1] * (x.dim() - 1)))
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            inputs.append(x)
        return self.split.tail(*inputs, rows)

    def _hooked(self, x: torch.Tensor, m: int, rows: torch.Tensor) -> torch.Tensor:
        x = x.repeat(m, *([1] * (x.dim() - 1)))
        handles = []
        for slot in self.slots:
            for hook in dict.fromkeys(slot.hooks):
                module = self.model.get_submodule(hook)

                def apply(mod: nn.Module, args: tuple, out: torch.Tensor, s: Slot = slot, h: str = hook
                          ) -> torch.Tensor:
                    return _mask_mul(out, rows, s.start, s.end, s.last_at(h))

                handles.append(module.register_forward_hook(apply))
        try:
            return self.model(x)
        finally:
            for h in handles:
                h.remove()


class _Unsupported(Exception):
    """The cached-tail path cannot handle this model; the engine falls back to full forwards."""


def _split(model: nn.Module, slots: list[Slot]) -> _Split:
    """Cut the traced model at the earliest response: head -> boundary tensors -> tail (with mask multiplies)."""
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: use the hook path
        raise _Unsupported(f"torch.fx cannot trace the model ({type(e).__name__})") from None
    graph = gm.graph
    nodes = list(graph.nodes)
    inputs = forward_inputs(nodes)
    if inputs is None:
        raise _Unsupported("the traced forward takes more than the images")
    defaults = inputs[1]  # e.g. timm's forward(x, attn_mask=None)
    order = {n: i for i, n in enumerate(nodes)}
    by_target: dict[str, list[fx.Node]] = {}
    for n in nodes:
        if n.op == "call_module":
            by_target.setdefault(str(n.target), []).append(n)
    points: list[tuple[fx.Node, int]] = []  # (node whose output is masked, slot index)
    for i, slot in enumerate(slots):
        for hook in dict.fromkeys(slot.hooks):
            found = by_target.get(hook, [])
            if len(found) != 1:
                raise _Unsupported(f"{hook} is called {len(found)} times in the traced graph")
            points.append((found[0], i))
    points.sort(key=lambda p: order[p[0]])
    first, first_slot = points[0]
    first_last = slots[first_slot].last_at(str(first.target))
    # move the first mask point past channel-wise, zero-preserving modules (smaller cache, less work)
    while len(first.users) == 1:
        user = next(iter(first.users))
        if user.op != "call_module" or not isinstance(gm.get_submodule(str(user.target)), _ZERO_PRESERVING):
            break
        if any(p[0] is user for p in points[1:]):
            break
        first = user
    rest = points[1:]

    ancestors = _ancestors(first)
    data_dep = _data_dependent(nodes)
    # tail: everything not needed to compute `first`, plus constants (recomputed cheaply)
    in_tail = [n for n in nodes if n.op not in ("placeholder", "output")
               and (n not in ancestors or n not in data_dep) and n is not first]
    tail_set = set(in_tail)
    boundary = [first] + [n for n in nodes if n in ancestors and n in data_dep and n is not first
                          and any(u in tail_set or u.op == "output" for u in n.users)]
    output = next(n for n in nodes if n.op == "output")

    head_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n in ancestors or n.op == "placeholder":
            if n.op == "output":
                continue
            env[n] = head_graph.node_copy(n, lambda a: env[a])
    head_graph.output(tuple(env[b] for b in boundary))
    head = fx.GraphModule(gm, head_graph)

    tail_graph = fx.Graph()
    tenv: dict[fx.Node, Any] = dict(defaults)  # the forward's other arguments
    for j, b in enumerate(boundary):
        tenv[b] = tail_graph.placeholder(f"boundary_{j}")
    mask = tail_graph.placeholder("mask")
    masked = {p[0]: slots[p[1]] for p in rest}
    for n in in_tail:
        new = tail_graph.node_copy(n, lambda a: tenv[a])
        if n in masked:
            s = masked[n]
            new = tail_graph.call_function(_mask_mul, (new, mask, s.start, s.end, s.last_at(str(n.target))))
        tenv[n] = new
    tail_graph.output(fx.node.map_arg(output.args[0], lambda a: tenv[a]))
    tail = fx.GraphModule(gm, tail_graph)
    names = [_describe(b, gm) for b in boundary]
    return _Split(head, tail, names, 0, first_slot, first_last)


def _describe(node: fx.Node, gm: fx.GraphModule) -> str:
    return str(node.target) if node.op == "call_module" else node.name


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _data_dependent(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes whose value depends on the model input (the rest are parameters and constants)."""
    dep: set[fx.Node] = set()
    for n in nodes:
        if n.op == "placeholder" or any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    return dep


__all__ = ["AblationEngine", "EngineStats", "Slot"]
