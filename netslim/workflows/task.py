"""What a trained network expects of its data, checked before any work: image shape and class names.

A weights file records its input shape (in the Plan) and the names of the classes its outputs score. Data of
another shape would fail minutes later with a traceback, and data whose classes only have other names would
give an accuracy that means nothing; both are refused here in one line. Files written without class names
(plain state dicts, older netslim) keep matching classes by position, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from netslim.data import ImageSet, load_dataset, select_classes
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.checkpoint import classes_of, read_metadata


@dataclass
class Task:
    """A model and the data it is scored on: `outputs` are the model outputs the task keeps (ascending, in
    the order of the data's labels; None: all of them), `stored` the class names its file records."""

    train: ImageSet
    test: ImageSet
    model: nn.Module
    arch: str
    plan: Plan | None
    outputs: list[int] | None
    stored: list[str] | None


def shown(names: list[str], limit: int = 12) -> str:
    """Class names for a message: the first `limit`, then how many in all."""
    head = ", ".join(names[:limit])
    return head + (f", … ({len(names)} in all)" if len(names) > limit else "")


def stored_classes(weights: Path | None) -> list[str] | None:
    """The class names a weights file records (None: no file, or one written without them)."""
    return None if weights is None else classes_of(read_metadata(Path(weights)), str(weights))


def task_classes(stored: list[str] | None, data: list[str], chosen: list[str] | None, spec: str,
                 source: str = "the model") -> tuple[list[str] | None, list[int] | None]:
    """(data classes to keep, in the model's output order; the model outputs they are), None for all.

    With stored names the data must have exactly the model's classes, or --classes must pick a subset of them;
    without, --classes picks data classes and the model's outputs are assumed to follow the data's order."""
    if chosen is not None:
        chosen = list(dict.fromkeys(chosen))
        unknown = [c for c in chosen if c not in data]
        if unknown:
            raise NetslimError(f"unknown class {unknown[0]!r}; the data has {shown(data)}")
    if stored is None:
        if chosen is None:
            return None, None
        ordered = sorted(chosen, key=data.index)
        return ordered, [data.index(c) for c in ordered]
    if chosen is None:
        if stored != data:
            hint = (f"pass --classes {','.join(stored)} to score it on its own classes" if set(stored) < set(data)
                    else "give data with the model's classes")
            raise NetslimError(f"{source} scores classes {shown(stored)}, but {spec} has classes {shown(data)}; "
                               f"{hint}")
        return None, None
    foreign = [c for c in chosen if c not in stored]
    if foreign:
        raise NetslimError(f"--classes must be a subset of the model's classes ({shown(stored)}); "
                           f"{source} does not score {', '.join(map(repr, foreign))}")
    ordered = sorted(chosen, key=stored.index)
    outputs = [stored.index(c) for c in ordered]
    return ordered, None if outputs == list(range(len(stored))) else outputs


def check_input(plan: Plan | None, data: ImageSet, spec: str, source: str) -> None:
    """One error line when the data's images are not the shape the model takes."""
    if plan is not None and tuple(plan.input_size) != data.input_size:
        raise NetslimError(f"{source} takes images of shape {_shape(plan.input_size)} (C×H×W), but {spec} has "
                           f"images of shape {_shape(data.input_size)}")


def check_runs(model: nn.Module, data: ImageSet, spec: str, arch: str) -> None:
    """One error line when a network that records no input shape cannot run the data's images: a CNN takes any
    size, but a ViT's position embedding fixes its image size, and its forward would fail minutes later."""
    import torch

    from netslim.surgery.graph import check_forward

    check_forward(model, torch.zeros(1, *data.input_size),
                  f"{arch} cannot take the images of {spec} (shape {_shape(data.input_size)}, C×H×W)")


def _shape(size: tuple[int, ...] | list[int]) -> str:
    return "×".join(str(int(s)) for s in size)


def model_data(data: ImageSet, stored: list[str] | None, spec: str, source: str, split: str) -> ImageSet:
    """`data` cut to the classes the model scores, in its output order (pack and export have no --classes:
    a class-subset run keeps its own classes); refused when the data lacks any of them."""
    if stored is None or stored == data.classes:
        return data
    missing = [c for c in stored if c not in data.classes]
    if missing:
        raise NetslimError(f"{source} scores classes {shown(stored)}, but {spec} has classes {shown(data.classes)} "
                           f"(no {', '.join(map(repr, missing[:5]))}); give data with the model's classes")
    return select_classes(data, stored, spec, split)


def load_task(data: str, classes: list[str] | None, cache_dir: Path | None, weights: Path | None,
              arch: str | None) -> Task:
    """The data (class subset relabelled in the model's output order) and the trained model, both checked."""
    from netslim.workflows.api import load_trained

    stored = stored_classes(weights)
    full = load_dataset(data, "train", cache_dir=cache_dir)
    keep, outputs = task_classes(stored, full.classes, classes, data, str(weights))
    test = load_dataset(data, "test", cache_dir=cache_dir)
    train = full if keep is None else select_classes(full, keep, data, "train")
    test = test if keep is None else select_classes(test, keep, data, "test")
    model, arch, plan = load_trained(weights, arch, len(full.classes), full.input_size[0], full.input_size[1:])
    check_input(plan, train, data, str(weights))
    if plan is None:
        check_runs(model, train, data, arch)
    return Task(train, test, model, arch, plan, outputs, stored)


def task_network(task: Task) -> tuple[nn.Module, Plan]:
    """The network scoring exactly the task's classes, and its Plan relative to the base architecture (so the
    saved file rebuilds): the Plan's `classes` are composed with any class cut the model already had."""
    from netslim.surgery.apply import apply_plan
    from netslim.workflows.stages import outputs as outputs_of

    net = task.model
    plan = task.plan or Plan(arch=task.arch, num_classes=outputs_of(net), input_size=task.train.input_size)
    legacy = task.stored is None and plan.classes is not None  # positions into the data, not the outputs
    if task.outputs is None or legacy:
        return net, plan
    cut = Plan(arch=plan.arch, num_classes=outputs_of(net), input_size=plan.input_size, classes=task.outputs)
    net = apply_plan(net, cut)
    classes = task.outputs if plan.classes is None else [plan.classes[i] for i in task.outputs]
    return net, replace(plan, classes=classes)
