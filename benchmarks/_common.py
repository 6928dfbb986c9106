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
TRAINED = {"vgg16_bn": VGG16, "resnet56": RESNET56}  # the shared CIFAR-10 networks, by architecture
RESULTS = REPO / "benchmarks" / "results"
RUNS = REPO / "runs"


def parser(doc: str | None, out: str | None = None, threads: int = 2, inputs: bool = False
           ) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has: --threads, (given a file name) --out, and
    (with `inputs`) --weights and --data, defaulting to the shared VGG-16 and CIFAR-10. --help shows `doc`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=threads, help="CPU threads torch may use")
    if inputs:
        ap.add_argument("--weights", type=Path, default=VGG16, help="trained VGG-16-BN weights")
        ap.add_argument("--data", type=Path, default=CIFAR10, help="CIFAR-10 archive")
    if out is not None:
        ap.add_argument("--out", type=Path, default=RESULTS / out, help="result JSON to write")
    return ap


def start(args: argparse.Namespace) -> None:
    """Apply the common options (threads) before any work."""
    torch.set_num_threads(args.threads)


def cifar10(classes: list[str] | None = None, data: Path = CIFAR10) -> tuple[Any, Any, list[int] | None, int]:
    """`netslim.load_data` on the shared CIFAR-10: train, test, base class indices (with `classes`), classes."""
    from netslim import load_data

    return load_data(str(data), classes)


def trained(arch: str = "vgg16_bn", num_classes: int = 10, weights: Path | None = None
            ) -> tuple[torch.nn.Module, str, Any]:
    """`netslim.load_trained` on a shared CIFAR-10 network (or `weights`): model, arch, plan."""
    from netslim import load_trained

    return load_trained(Path(weights) if weights else TRAINED[arch], arch, num_classes)


def log(message: str) -> None:
    """Progress on stderr (stdout stays for what a benchmark prints as its result)."""
    print(message, file=sys.stderr, flush=True)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def command() -> str:
    """The command line that ran this benchmark, as `python -m benchmarks.X.Y ...` when run as a module."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return shlex.join(["python", "-m", spec.name, *sys.argv[1:]])
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
    print(f"wrote {path}", file=sys.stderr)
