"""What every benchmark shares: where the shared models and data lie, its argument parser, and how a
result file is stamped (date, machine, torch version, command) and written atomically.

Run a benchmark from the repository root as a module, e.g. `python -m benchmarks.pfa.floor --help`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VGG16 = SHARED / "models" / "vgg16_bn_cifar10.safetensors"
RESNET56 = SHARED / "models" / "resnet56_cifar10.safetensors"
CIFAR10 = SHARED / "data" / "cifar10-jpeg.tar.gz"
IMAGENETTE = SHARED / "data" / "imagenette-128.tar.gz"
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs"


def parser(doc: str | None, out: str | None = None, threads: int = 2) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: --threads and (given a file name) --out."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    ap.add_argument("--threads", type=int, default=threads, help="CPU threads torch may use")
    if out is not None:
        ap.add_argument("--out", type=Path, default=RESULTS / out, help="result JSON to write")
    return ap


def start(args: argparse.Namespace) -> None:
    """Apply the common options (threads) before any work."""
    torch.set_num_threads(args.threads)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    return shlex.join(["python", *sys.argv])


def stamp(args: argparse.Namespace | None = None) -> dict[str, Any]:
    """Date, machine, torch version, threads and the command line, for the top of a result file."""
    from netslim.workflows.stages import machine

    out: dict[str, Any] = {"date": now(), "machine": machine(), "torch": torch.__version__, "command": command()}
    if args is not None:
        out["threads"] = getattr(args, "threads", None)
        out["args"] = {k: str(v) for k, v in vars(args).items()}
    return out


def write(path: Path, result: dict[str, Any]) -> None:
    """Write a result file atomically (a killed run leaves the previous file whole)."""
    from netslim.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {path}")
