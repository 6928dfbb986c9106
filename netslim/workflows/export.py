"""`netslim export RUN_DIR --format onnx|torch-export`: a deployable file, checked and timed
(`--format onnx-int8` is workflows/export_int8.py, built on this module).

The run's model is rebuilt from its files, BatchNorm is folded into the preceding conv/linear, and
the result is exported with a dynamic batch size. The file is kept only if it predicts like the
PyTorch model on real images (logits within `RTOL` of their scale, the same top-1 class except
where PyTorch's own top-2 margin is below that tolerance); then the exported model's latency is
timed next to PyTorch's, in turns, in the same process. The ONNX exporter and the onnxruntime session are
netslim/runtime/ort.py (the latency target times networks on them too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import statistics
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.runtime.ort import OnnxRunner, export_onnx

if TYPE_CHECKING:
    from netslim.data import ImageSet

FORMATS = {"onnx": ".onnx", "torch-export": ".pt2"}
RTOL = 1e-4  # |exported - pytorch| logits, relative to the largest |logit| of the batch


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write `model` as a torch.export ExportedProgram (.pt2) with a dynamic batch axis."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    except Exception as e:  # torch.export reports unsupported Python as many exception types
        raise NetslimError(f"torch.export cannot capture this model: {type(e).__name__}: {e}") from None
    torch.export.save(program, str(path))
    return "torch.export"


def load_runner(path: Path, fmt: str, threads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    if fmt == "onnx":
        return OnnxRunner(path, threads)
    program = torch.export.load(str(path))
    return program.module()


def data_spec_of(run_dir: Path) -> str | None:
    """The data the run was made with: metrics.json's `data`, else the --data of its command line (None if
    unknown: runs made before `data` was recorded, with the default data, do not say)."""
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        return None
    try:
        record = json.loads(metrics.read_text())
        if not isinstance(record, dict):
            return None
        if isinstance(record.get("data"), str) and record["data"]:
            return record["data"]
        args = shlex.split(record.get("command") or "") if isinstance(record.get("command"), str) else []
    except (json.JSONDecodeError, ValueError, OSError):
        return None
    for i, a in enumerate(args):
        if a in ("--data", "-d") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--data="):
            return a.split("=", 1)[1]
    return None


def check_predictions(reference: nn.Module, runner: Callable[[torch.Tensor], torch.Tensor],
                      inputs: Sequence[torch.Tensor], rtol: float = RTOL) -> dict[str, Any]:
    """Logit differences and top-1 agreement between the PyTorch model and an exported one."""
    worst, n, agree, ties = 0.0, 0, 0, 0
    with torch.inference_mode():
        for x in inputs:
            ref = reference(x).float()
            got = runner(x).float()
            if got.shape != ref.shape:
                raise NetslimError(f"exported model returns shape {tuple(got.shape)}, PyTorch {tuple(ref.shape)}")
            scale = float(ref.abs().max()) or 1.0
            worst = max(worst, float((got - ref).abs().max()) / scale)
            top2 = ref.topk(min(2, ref.shape[1]), dim=1).values
            margin = (top2[:, 0] - top2[:, -1]) if ref.shape[1] > 1 else torch.full_like(top2[:, 0], float("inf"))
            same = got.argmax(1) == ref.argmax(1)
            agree += int(same.sum())
            ties += int((~same & (margin <= rtol * scale)).sum())
            n += len(x)
    ok = worst <= rtol and agree + ties == n
    return {"images": n, "max_rel_logit_diff": worst, "top1_agreement": agree / n if n else 1.0,
            "disagreements_at_ties": ties, "rtol": rtol, "ok": ok}


def run_split(data: str, split: str, plan: Plan, cache_dir: Path | None, source: str,
              classes: list[str] | None = None) -> ImageSet:
    """A split of the run's data, checked against the model's input shape and cut to the classes it scores."""
    from netslim.data import load_dataset
    from netslim.workflows.task import check_input, model_data

    images = load_dataset(data, split, cache_dir=cache_dir)
    check_input(plan, images, data, source)
    return model_data(images, classes, data, source, split)


def _inputs(data: str | None, plan: Plan, images: int, cache_dir: Path | None, source: str,
            classes: list[str] | None = None, batch: int = 100) -> tuple[list[torch.Tensor], str]:
    input_size = tuple(plan.input_size)
    if data is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randn((batch, *input_size), generator=g) for _ in range(max(1, images // batch))], \
            "random normal inputs (no --data given and none recorded in the run)"
    from netslim.data import batches, calibration_subset

    test = run_split(data, "test", plan, cache_dir, source, classes)
    subset = calibration_subset(test, min(images, len(test.labels)), seed=0)
    return [x for x, _ in batches(subset, batch)], f"{len(subset.labels)} test images of {data}"


def predict(model: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The top-1 class of every image, batch after batch (a PyTorch module or a runner)."""
    with torch.inference_mode():
        return torch.cat([model(x).argmax(1) for x in inputs])


def _time(models: dict[str, Callable], input_size: Sequence[int], batches: Sequence[int],
          threads: int, max_seconds: float) -> list[dict[str, Any]]:
    """Each runtime's latency at each batch, timed in turns; speedup_vs_pytorch pairs rounds with the first."""
    from netslim.cost.timing import Conditions, cpu_threads, interleaved_times, random_input, ratio_of

    rows = []
    cond = Conditions("cpu", threads=threads)
    with cpu_threads(threads):
        for b in batches:
            times = interleaved_times(list(models.values()), random_input((b, *input_size), cond, seed=1),
                                      max_seconds=max_seconds)
            for i, (name, t) in enumerate(zip(models, times, strict=True)):
                ms = statistics.median(t) * 1e3
                rows.append({"runtime": name, "batch": b, "threads": threads, "median_ms": ms,
                             "throughput": b / ms * 1e3, "rounds": len(t),
                             "speedup_vs_pytorch": ratio_of(times, 0, base=i)})
    return rows


def export_run(run_dir: Path, fmt: str = "onnx", out: Path | None = None, data: str | None = None,
               images: int = 1000, batches: Sequence[int] = (1, 64), threads: int | None = None,
               cache_dir: Path | None = None, max_seconds: float = 10.0, overwrite: bool = False) -> dict[str, Any]:
    """Fold, export, verify and time a run's model; writes the file (and export.json beside a run). An existing
    file is refused unless `overwrite`, and then replaced only by a checked export."""
    from netslim.io import atomic_write_text, refuse_existing
    from netslim.surgery.checkpoint import classes_of, load_model, read_metadata
    from netslim.surgery.fold import count_batchnorms, fold_batchnorm

    if fmt not in FORMATS:
        hint = " (onnx-int8 is netslim.workflows.export_int8.export_int8_run)" if fmt == "onnx-int8" else ""
        raise NetslimError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}{hint}")
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise NetslimError(f"run directory {run_dir} does not exist")
    base_dir = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(out) if out is not None else base_dir / f"model{FORMATS[fmt]}"
    refuse_existing(out, overwrite)
    if out.is_dir():
        raise NetslimError(f"--out {out} is a directory; give the file to write")
    model, plan = load_model(run_dir, "cpu")
    source = str(run_dir / "model.safetensors" if run_dir.is_dir() else run_dir)
    classes = classes_of(read_metadata(Path(source)), source)
    model = model.float().eval()
    size = tuple(plan.input_size)
    folded = fold_batchnorm(model, input_size=size)
    bns, left = count_batchnorms(model), count_batchnorms(folded)
    threads = int(threads or torch.get_num_threads())
    data = data or (data_spec_of(run_dir) if run_dir.is_dir() else None)
    inputs, seen = _inputs(data, plan, images, cache_dir, source, classes)  # checked before the slow export
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn((2, *size), generator=torch.Generator().manual_seed(0))
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=FORMATS[fmt])
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        exporter = export_onnx(folded, example, tmp) if fmt == "onnx" else export_program(folded, example, tmp)
        runner = load_runner(tmp, fmt, threads)
        check = check_predictions(model, runner, inputs)
        check["inputs"] = seen
        if not check["ok"]:
            raise NetslimError(f"the exported model does not predict like PyTorch on {seen}: max relative logit "
                               f"difference {check['max_rel_logit_diff']:.2e} (tolerance {RTOL:g}), top-1 "
                               f"agreement {check['top1_agreement']:.4f}")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    runner = load_runner(out, fmt, threads)
    runtime = f"onnxruntime {runner.version}" if fmt == "onnx" else "torch.export"
    speed = _time({"pytorch": model, "pytorch (BN folded)": folded, runtime: runner}, size, batches, threads,
                  max_seconds)
    report = {"run": str(run_dir), "format": fmt, "file": str(out), "bytes": out.stat().st_size,
              "exporter": exporter, "arch": plan.arch, "input_size": list(size), "batchnorms": bns,
              "batchnorms_folded": bns - left, "check": check, "latency": speed, "torch": torch.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if run_dir.is_dir():
        atomic_write_text(run_dir / f"export_{fmt}.json", json.dumps(report, indent=1))
    return report
