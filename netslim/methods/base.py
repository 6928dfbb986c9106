"""What every method receives (Context), what it returns (MethodResult), and the registry it joins.

The registry is filled by importing netslim.methods, which also looks methods up (get_method); this
module imports no method, so a method can import it without a cycle.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.cost.targets import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods.common.fields import Mismatch, convert, hints
from netslim.plan import Plan
from netslim.probe import LayerStats
from netslim.surgery.apply import find_classifier
from netslim.surgery.graph import ChannelGroup, channel_groups
from netslim.surgery.trial import runnable_groups


@dataclass
class AnalysisCache:
    """Analysis shared by every method run on one model and calibration set (bench runs several).

    Only what does not depend on a method's options lives here, or is keyed by the options it depends on
    (e.g. derived["pfa:spectra:max:l1-max"]); a method's own output is its MethodResult.
    """

    groups: list[ChannelGroup] | None = None  # coupled channel groups of the model
    template: nn.Module | None = None  # weightless (meta) copy of the model, to size candidate Plans
    stats: dict[str, dict[str, LayerStats]] = field(default_factory=dict)  # statistics pass key -> layer -> stats
    passes: list[str] = field(default_factory=list)  # statistics passes run, in order (bench reports them)
    derived: dict[str, Any] = field(default_factory=dict)  # reusable results computed from the statistics, by name


Artifacts = dict[str, Callable[[Path], None]]  # file name -> writer(path) of a file the method adds to a run


@dataclass
class MethodResult:
    """What a method hands back: the Plan, and optionally a network it fitted itself plus its evidence."""

    plan: Plan
    model: nn.Module | None = None  # a network of the Plan's shape with weights the method fitted (lda, lrs)
    report: list[str] = field(default_factory=list)  # markdown sections for report.md
    artifacts: Artifacts = field(default_factory=dict)  # file name -> writer(path)
    evidence: dict[str, Any] = field(default_factory=dict)  # method-specific data for scripts (e.g. CAR's curves)


@dataclass
class MethodOptions:
    """Options every method accepts; each method declares its own in a dataclass extending this one.

    Declared, typed and range-checked in one place so that a typo or a bad value is refused before any
    analysis runs, and `netslim methods NAME` can list them. Every field has a default and a one-line help.
    """

    round_to: int = field(default=1, metadata={"help": "round kept widths to a multiple of this (the CLI's "
                                                        "--round-to; default there 8 on CUDA, 1 on CPU)"})
    init: str | None = field(default=None, metadata={"help": "bench: weights after surgery, fine | inherit | "
                                                             "scratch (default: the method's)"})

    def __post_init__(self) -> None:
        if self.round_to < 1:
            raise NetslimError(f"option round_to must be at least 1, not {self.round_to}")
        if self.init is not None and self.init not in ("fine", "inherit", "scratch"):
            raise NetslimError(f"option init must be fine, inherit or scratch, not {self.init!r}")


def parse_options(cls: type[MethodOptions], options: dict[str, Any], owner: str) -> MethodOptions:
    """An instance of `cls` from user options: keys declared, values converted ("0.5" -> 0.5) and range-checked.

    `owner` (a method name) only words the errors. A None value means the field's default."""
    declared = hints(cls)
    values: dict[str, Any] = {}
    for key, value in options.items():
        name = str(key).replace("-", "_")
        if name not in declared:
            raise NetslimError(f"unknown option {key!r} for {owner}; valid keys: {', '.join(sorted(declared))}")
        if value is None:
            continue
        try:
            values[name] = convert(value, declared[name])
        except Mismatch as e:
            raise NetslimError(f"option {name} for {owner}: expected {e}, not {value!r}") from None
    try:
        return cls(**values)
    except NetslimError as e:
        raise NetslimError(f"{owner}: {e}") from None


@dataclass
class Context:
    """A trained model, the data a method may look at, and the user's target and options.

    `calib` is unlabelled calibration data drawn from the training split; `train`/`val` are labelled
    (val is held out of train, for methods that decide by accuracy). The test split is never here.
    """

    model: nn.Module
    arch: str
    num_classes: int
    input_size: tuple[int, int, int]
    calib: ImageSet | None = None
    train: ImageSet | None = None
    val: ImageSet | None = None
    target: Target | None = None
    options: dict[str, Any] = field(default_factory=dict)  # as the user gave them
    opts: MethodOptions | None = None  # validated, set when a registered method runs on this Context
    device: str = "cpu"
    batch_size: int = 256
    cache: AnalysisCache = field(default_factory=AnalysisCache)  # shared analysis (bench shares it between methods)

    @property
    def classifier(self) -> str:
        return find_classifier(self.model)

    def example(self) -> torch.Tensor:
        p = next(self.model.parameters())
        return torch.zeros(1, *self.input_size, device=p.device, dtype=p.dtype)

    def groups(self) -> list[ChannelGroup]:
        if self.cache.groups is None:
            found = channel_groups(self.model, self.example(), self.classifier)
            self.cache.groups = runnable_groups(self.model, self.example(), found, self.num_classes)
        return self.cache.groups

    def template(self) -> nn.Module:
        """A weightless (meta) copy of the model, to size candidate Plans."""
        if self.cache.template is None:
            from netslim.cost.size import meta_template

            self.cache.template = meta_template(self.model)
        return self.cache.template

    def base_plan(self, method: str) -> Plan:
        return Plan(arch=self.arch, num_classes=self.num_classes, input_size=self.input_size, method=method)

    def option(self, name: str, default: Any) -> Any:
        """A declared option's value; `default` only where the field is None (e.g. a device-dependent default).

        An undeclared name raises: an option a method reads but does not declare could never be set."""
        if self.opts is None:  # a Context used outside a method run: only the options every method has
            self.opts = parse_options(MethodOptions, self.options, "this context")
        if name not in {f.name for f in fields(self.opts)}:
            raise LookupError(f"{type(self.opts).__name__} declares no option {name!r}; declare it there")
        value = getattr(self.opts, name)
        return default if value is None else value


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[Context], MethodResult]
    summary: str
    needs_labels: bool = False
    retrain: str = "finetune"  # or "scratch": what the method's paper does after surgery
    options: type[MethodOptions] = MethodOptions  # the options it declares (netslim methods NAME lists them)


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, summary: str, needs_labels: bool = False, retrain: str = "finetune",
             options: type[MethodOptions] = MethodOptions) -> Callable:
    """Add a method to the registry; calling it validates the Context's options against `options` first,
    so every way in (CLI, Python API, a test calling the function) refuses an unknown key or a bad value."""

    def wrap(fn: Callable[[Context], MethodResult]) -> Callable[[Context], MethodResult]:
        @functools.wraps(fn)
        def run(ctx: Context) -> MethodResult:
            if type(ctx.opts) is not options:
                ctx.opts = parse_options(options, ctx.options, name)
            return fn(ctx)

        REGISTRY[name] = MethodSpec(name, run, summary, needs_labels, retrain, options)
        return run

    return wrap
