"""What a command does before its real work: check its options and outputs, then load the model and its data.

Kept apart from commands.py so that each command reads as its job; everything here fails with one
`error:` line (a NetslimError) before minutes are spent, and before any output is touched.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from netslim.cli.options import classes_of
from netslim.errors import NetslimError

if TYPE_CHECKING:  # the workflows (and torch) load only when a command runs
    from netslim.workflows.task import Task

SPLITS = ("train", "test")


def checked_split(split: str) -> str:
    """`--split` is train or test; anything else is refused, not reported as "banana accuracy"."""
    if split not in SPLITS:
        raise NetslimError(f"--split must be train or test, not {split!r}")
    return split


def setup(data: str, classes: str | None, cache_dir: Path | None, weights: Path | None, model: str | None,
          device: str) -> tuple[Task, str]:
    """The checked task (netslim.workflows.task.Task: data in the model's class order, shape and class names
    checked against the weights) and the device to run on."""
    from netslim.workflows.api import pick_device
    from netslim.workflows.task import load_task

    return load_task(data, classes_of(classes), cache_dir, weights, model), pick_device(device)


def refuse_output(out: Path | None, overwrite: bool) -> None:
    """An existing --out is refused before any data is decoded (the write itself replaces it atomically)."""
    from netslim.io import refuse_existing

    if out is not None:
        refuse_existing(out, overwrite)


def train_outputs(out: Path, overwrite: bool, resume: bool) -> Path:
    """The training-state directory of `train --out OUT` (OUT.train-state), with both outputs checked."""
    from netslim.io import refuse_existing

    refuse_existing(out, overwrite)
    state = out.with_name(out.name + ".train-state")
    if state.exists() and not resume:
        raise NetslimError(f"{state} holds an interrupted run; pass --resume to continue it or delete it")
    return state


def pack_data(run: Path, data: str | None) -> str:
    """`pack`'s data: --data, else the data recorded in the run (a run's own data, never a silent default)."""
    from netslim.workflows.export import data_spec_of

    spec = data or (data_spec_of(run) if run.is_dir() else None)
    if spec is None:
        raise NetslimError(f"{run} does not record the data it was made with; give --data")
    return spec
