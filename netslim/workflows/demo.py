"""`netslim demo`: the whole job on scikit-learn's digits, offline, in about a minute on two CPU cores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from netslim.data import load_dataset
from netslim.train import Schedule, finetune
from netslim.workflows.compress import compress
from netslim.workflows.stages import accuracy
from netslim.zoo import build


def run_demo(out: Path | None, method: str, epochs: int, finetune_epochs: int, console: Console,
             overwrite: bool = False) -> dict[str, Any]:
    """Train, compress, fine-tune and compare; an existing `out` is refused before any training unless
    `overwrite`, and then replaced only once the new run directory is complete."""
    from netslim.io import refuse_existing

    if out is not None:
        refuse_existing(out, overwrite)
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    test = load_dataset("digits", "test")
    model = build("small_cnn", num_classes=len(train.classes), in_channels=int(train.images.shape[1]))
    t0 = time.perf_counter()
    console.print(f"training small_cnn on digits ({len(train.labels)} train / {len(test.labels)} test images)…")
    finetune(model, train, Schedule(epochs=epochs, lr=0.05, batch_size=64), "cpu")
    console.print(f"trained in {time.perf_counter() - t0:.1f} s: test accuracy {accuracy(model, test, 'cpu'):.4f}")
    console.print(f"compressing with {method}, then fine-tuning {finetune_epochs} epochs…")
    res = compress(model, "small_cnn", train, test, method=method,
                   schedule=Schedule(epochs=finetune_epochs, lr=0.02, batch_size=64), device="cpu",
                   calib_size=len(train.labels), out=out, overwrite=overwrite, data="digits",
                   command=f"netslim demo --method {method}")
    return res.metrics
