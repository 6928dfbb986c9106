"""What every method receives and the registry the CLI and benchmarks pick methods from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.cost.budget import Target
from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.probe import LayerStats
from netslim.surgery.apply import find_classifier
from netslim.surgery.graph import ChannelGroup, channel_groups


@dataclass
class AnalysisCache:
    """Analysis shared by every method run on one model and calibration set (bench runs several).

    Only what does not depend on a method's options lives here; a method's own output is its MethodResult.
    """

    groups: list[ChannelGroup] | None = None  # coupled channel groups of the model
    template: nn.Module | None = None  # weightless (meta) copy of the model, to size candidate Plans
    stats: dict[str, dict[str, LayerStats]] = field(default_factory=dict)  # statistics pass key -> layer -> stats
    passes: list[str] = field(default_factory=list)  # statistics passes run, in order (bench reports them)
    derived: dict[str, Any] = field(default_factory=dict)  # reusable results computed from the statistics, by name


@dataclass
class MethodResult:
    """What a method hands back: the Plan, and optionally a network it fitted itself plus its evidence."""

    plan: Plan
    model: nn.Module | None = None  # a network of the Plan's shape with weights the method fitted (lda, lrs)
    report: list[str] = field(default_factory=list)  # markdown sections for report.md
    artifacts: dict[str, Callable[[Path], None]] = field(default_factory=dict)  # file name -> writer(path)
    evidence: dict[str, Any] = field(default_factory=dict)  # method-specific data for scripts (e.g. CAR's curves)


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
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    batch_size: int = 256
    cache: dict[str, Any] = field(default_factory=dict)  # shared analysis results (bench)

    @property
    def classifier(self) -> str:
        return find_classifier(self.model)

    def example(self) -> torch.Tensor:
        p = next(self.model.parameters())
        return torch.zeros(1, *self.input_size, device=p.device, dtype=p.dtype)

    def groups(self) -> list[ChannelGroup]:
        if "groups" not in self.cache:
            self.cache["groups"] = channel_groups(self.model, self.example(), self.classifier)
        return self.cache["groups"]

    def template(self) -> nn.Module:
        """A weightless (meta) copy of the model, to size candidate Plans."""
        if "template" not in self.cache:
            from netslim.cost.budget import meta_template

            self.cache["template"] = meta_template(self.model)
        return self.cache["template"]

    def base_plan(self, method: str) -> Plan:
        return Plan(arch=self.arch, num_classes=self.num_classes, input_size=self.input_size, method=method)

    def option(self, name: str, default: Any) -> Any:
        value = self.options.get(name)
        return default if value is None else value


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[Context], Plan]
    summary: str
    needs_labels: bool = False
    retrain: str = "finetune"  # or "scratch": what the method's paper does after surgery


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, summary: str, needs_labels: bool = False, retrain: str = "finetune") -> Callable:
    def wrap(fn: Callable[[Context], Plan]) -> Callable[[Context], Plan]:
        REGISTRY[name] = MethodSpec(name, fn, summary, needs_labels, retrain)
        return fn

    return wrap


def get_method(name: str) -> MethodSpec:
    import netslim.methods  # noqa: F401  (fills the registry)

    if name not in REGISTRY:
        raise NetslimError(f"unknown method {name!r}; choose from {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]
