"""What a bench's rows depend on, recorded in its directory, so that `--resume` never mixes rows made with
other inputs (other weights, data, schedule, repair, calibration or options) into one table."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.repair import Repair
from netslim.train import Schedule, recorded

MANIFEST = "bench.json"


def occupied(out: Path) -> bool:
    """True for an existing file, or a directory with anything in it."""
    return out.exists() and (not out.is_dir() or any(out.iterdir()))


def check_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before any work, an existing non-empty --out that is neither continued nor replaced."""
    if resume and overwrite:
        raise NetslimError("--resume continues a bench and --overwrite replaces it; pass one of them")
    if occupied(out) and not (resume or overwrite):
        raise NetslimError(f"output directory {out} already exists and is not empty; pass --resume to continue "
                           "the bench there or --overwrite to replace it")


def _digest(tensors: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _data(ds: ImageSet) -> dict[str, Any]:
    return {"images": len(ds.labels), "classes": list(ds.classes),
            "sha256": _digest([("images", ds.images), ("labels", ds.labels)])}


def bench_inputs(model: nn.Module, arch: str, train: ImageSet, test: ImageSet, schedule: Schedule, repair: Repair,
                 calib_size: int, options: dict[str, Any], measure_latency: bool,
                 given: dict[str, Any]) -> dict[str, Any]:
    """Everything the rows depend on, as JSON (the weights and the images by content hash); `given` adds what
    only the caller knows (the data spec, subsets)."""
    record = {"arch": arch, "weights_sha256": _digest(sorted(model.state_dict().items())),
              "train_data": _data(train), "test_data": _data(test), "schedule": recorded(schedule),
              "repair": asdict(repair), "calibration_images": calib_size, "options": options,
              "latency": measure_latency, **given}
    return json.loads(json.dumps(record, default=str))


def write_manifest(out: Path, record: dict[str, Any]) -> None:
    from netslim.io import atomic_write_text

    atomic_write_text(out / MANIFEST, json.dumps({"format": 1, "inputs": record}, indent=1))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested fields under dotted names ('schedule.lr'), so that a refusal names the one that differs."""
    if isinstance(d, dict) and d:
        return {k: v for key, val in d.items() for k, v in _flat(val, f"{prefix}.{key}" if prefix else key).items()}
    return {prefix: d}


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 16 else text[:15] + "…"


def check_resume(out: Path, record: dict[str, Any]) -> None:
    """Refuse to continue a bench whose rows were made with other inputs, naming the fields that differ."""
    path = out / MANIFEST
    if not out.is_dir() or not path.is_file():
        raise NetslimError(f"{out} is not a bench that --resume can continue (no {MANIFEST} recording its inputs); "
                           "choose another --out or pass --overwrite to replace it")
    try:
        old = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise NetslimError(f"{path} is unreadable ({e}); pass --overwrite to replace the bench") from None
    was = _flat(old.get("inputs") if isinstance(old, dict) and isinstance(old.get("inputs"), dict) else {})
    now = _flat(record)
    differ = [k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)]
    if differ:
        shown = "; ".join(f"{k}: {_short(was.get(k))} → {_short(now.get(k))}" for k in differ[:6])
        raise NetslimError(f"--resume refused: {out} was benched with other inputs ({shown}"
                           f"{'; …' if len(differ) > 6 else ''}); its rows would mix with this run's. Choose another "
                           "--out or pass --overwrite")
