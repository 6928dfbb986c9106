"""`netslim pack RUN_DIR`: weight pruning + fine-tuning, k-means weight sharing, Huffman coding, a packed file.

The packed network is verified before anything is written: decoding the file must give back exactly
the quantized weights, and the decoded network must predict exactly what the quantized one predicts.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netslim.data import ImageSet, batches
from netslim.errors import NetslimError
from netslim.io import atomic_dir, atomic_write_bytes, atomic_write_text
from netslim.pack.codec import LayerBytes, pack_bytes, unpack_bytes
from netslim.pack.quantize import apply_masks, default_bits, magnitude_masks, mask_hook, packable_layers, quantize_model
from netslim.plan import Plan
from netslim.train import Schedule, finetune

PACKED_NAME = "packed.safetensors"


def _default_finetune() -> Schedule:
    return Schedule(epochs=1, lr=0.005, batch_size=128)


@dataclass
class PackConfig:
    """What to compress and how hard: sparsity and bits per layer kind, with per-layer overrides; the
    fine-tuning with the pruning mask fixed is an ordinary Schedule (the same recipe compress and train use)."""

    layers: list[str] | None = None  # None: every Conv2d/Linear
    sparsity: float = 0.5  # conv layers
    fc_sparsity: float = 0.5
    layer_sparsity: dict[str, float] = field(default_factory=dict)
    conv_bits: int = 8
    fc_bits: int = 5
    layer_bits: dict[str, int] = field(default_factory=dict)
    finetune: Schedule = field(default_factory=_default_finetune)  # its distill follows the unpacked net
    train_subset: int | None = None  # fine-tune on this many training images (None: all)


def load_run_data(spec: str, plan: Plan | None, cache_dir: Path | None = None, classes: list[str] | None = None,
                  source: str = "the model") -> tuple[ImageSet, ImageSet]:
    """Train and test splits in the model's own label order (a class-subset run sees only its classes), checked
    against the model's input shape and, when its file stores them, its class names."""
    from netslim.workflows.api import load_data
    from netslim.workflows.task import check_input, model_data

    train, test, _, _ = load_data(spec, None, cache_dir)
    check_input(plan, train, spec, source)
    if classes is not None:
        return model_data(train, classes, spec, source, "train"), model_data(test, classes, spec, source, "test")
    if plan is None or plan.classes is None:
        return train, test
    names = [train.classes[i] for i in plan.classes]
    train, test, _, _ = load_data(spec, names, cache_dir)
    return train, test


@torch.no_grad()
def predictions(model: nn.Module, data: ImageSet, device: str) -> torch.Tensor:
    model.to(device).eval()
    return torch.cat([model(x).argmax(1).cpu() for x, _ in batches(data, 256, device=device)])


def _acc(pred: torch.Tensor, data: ImageSet) -> float:
    return float((pred == data.labels).double().mean())


def pack_model(model: nn.Module, plan: Plan, train: ImageSet | None, test: ImageSet | None, cfg: PackConfig,
               device: str = "cpu", teacher: nn.Module | None = None,
               classes: list[str] | None = None) -> tuple[bytes, dict[str, Any], nn.Module]:
    """Prune, fine-tune, quantize and pack a copy of `model`; returns the file bytes, metrics, quantized net.
    With cfg.finetune.distill > 0 fine-tuning also follows `teacher` (default: `model` itself, before weight
    pruning). `classes`: the names its outputs score, stored in the packed file."""
    net = copy.deepcopy(model).to(device).eval()
    layers = packable_layers(net, cfg.layers)
    modules = dict(net.named_modules())
    unknown = [n for n in (*cfg.layer_sparsity, *cfg.layer_bits) if n not in layers]
    if unknown:
        raise NetslimError(f"per-layer settings for layers that are not packed: {', '.join(unknown)}")
    sparsity = {n: cfg.layer_sparsity.get(n, cfg.sparsity if isinstance(modules[n], nn.Conv2d) else cfg.fc_sparsity)
                for n in layers}
    bits = {n: cfg.layer_bits.get(n, default_bits(modules[n], cfg.conv_bits, cfg.fc_bits)) for n in layers}
    acc: dict[str, float | None] = {"before": _acc(predictions(net, test, device), test) if test else None}
    masks = magnitude_masks(net, sparsity)
    apply_masks(net, masks)
    acc["weight_pruned"] = _acc(predictions(net, test, device), test) if test else None
    history: list[dict] = []
    if cfg.finetune.epochs > 0 and any(s > 0 for s in sparsity.values()):
        if train is None:
            raise NetslimError("fine-tuning after weight pruning needs training data (--data)")
        data = train
        if cfg.train_subset:
            from netslim.data import calibration_subset

            data = calibration_subset(train, cfg.train_subset, seed=1)
        history = finetune(net, data, cfg.finetune, device, mask_hook=mask_hook(masks),
                           teacher=teacher if teacher is not None else model)
        net.eval()
        acc["fine_tuned"] = _acc(predictions(net, test, device), test) if test else None
    books = quantize_model(net, bits)
    pred_q = predictions(net, test, device) if test else None
    acc["quantized"] = _acc(pred_q, test) if test is not None and pred_q is not None else None
    blob, reports, raw = pack_bytes(net, plan, {n: (books[n][0], bits[n]) for n in layers}, classes)
    verify = verify_packed(blob, net, plan, test, pred_q, device)
    acc["unpacked"] = verify.pop("accuracy")
    dense_total = sum(v.numel() * 4 for v in model.state_dict().values() if v.is_floating_point())
    metrics = {"config": asdict(cfg), "sparsity": sparsity, "bits": bits, "accuracy": acc,
               "history": history, "layers": [r.row() for r in reports], "verify": verify,
               "bytes": {"dense_fp32_model": dense_total, "packed_file": len(blob), "raw_tensors": raw,
                         "packed_layers": sum(r.total for r in reports),
                         "packed_layers_dense_fp32": sum(r.dense_fp32 for r in reports),
                         "ratio_file": round(dense_total / len(blob), 2),
                         "ratio_layers": round(sum(r.dense_fp32 for r in reports) /
                                               max(1, sum(r.total for r in reports)), 2)}}
    return blob, metrics, net


def verify_packed(blob: bytes, quantized: nn.Module, plan: Plan, test: ImageSet | None,
                  pred_q: torch.Tensor | None, device: str) -> dict[str, Any]:
    """Decode the bytes, rebuild the network, and check weights and predictions against the quantized net."""
    from netslim.surgery.checkpoint import build_from_plan, load_tensors

    state, plan2 = unpack_bytes(blob)
    ref = {k: v.detach().cpu() for k, v in quantized.state_dict().items()}
    mismatched = [k for k in ref if k not in state or not torch.equal(state[k], ref[k])]
    if mismatched:
        raise NetslimError(f"packing is not lossless after quantization: {', '.join(mismatched[:5])} differ")
    model = build_from_plan(plan2, device)
    load_tensors(model, state, "packed bytes", plan2.arch)
    out: dict[str, Any] = {"weights_identical": True, "tensors": len(ref), "accuracy": None}
    if test is not None and pred_q is not None:
        pred = predictions(model, test, device)
        same = int((pred == pred_q).sum())
        if same != len(pred):
            raise NetslimError(f"decoded network predicts differently on {len(pred) - same} of {len(pred)} images")
        out |= {"identical_predictions": same, "images": len(pred), "accuracy": _acc(pred, test)}
    return out


def write_pack_dir(out: Path, blob: bytes, metrics: dict[str, Any], overwrite: bool = False) -> None:
    """packed.safetensors, pack.json, report.md and bytes.png, all or nothing."""
    with atomic_dir(out, overwrite) as tmp:
        atomic_write_bytes(tmp / PACKED_NAME, blob)
        atomic_write_text(tmp / "pack.json", json.dumps(metrics, indent=1, default=str))
        bytes_plot(tmp / "bytes.png", metrics["layers"])
        write_report(tmp / "report.md", metrics)


def pack_run_dir(run: Path, train: ImageSet | None, test: ImageSet | None, cfg: PackConfig, out: Path,
                 device: str = "cpu", overwrite: bool = False, command: str = "") -> dict[str, Any]:
    from netslim.io import refuse_existing
    from netslim.surgery.checkpoint import classes_of, load_model, read_metadata
    from netslim.workflows.stages import machine

    refuse_existing(out, overwrite)
    model, plan = load_model(run, device)
    source = run / "model.safetensors" if run.is_dir() else run
    blob, metrics, _ = pack_model(model, plan, train, test, cfg, device,
                                  classes=classes_of(read_metadata(source), str(source)))
    metrics |= {"source": str(run), "arch": plan.arch, "machine": machine(), "command": command,
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_pack_dir(out, blob, metrics, overwrite)
    return metrics


def write_report(path: Path, m: dict[str, Any]) -> None:
    from netslim.report.markdown import table, write_markdown

    b, acc, v = m["bytes"], m["accuracy"], m["verify"]
    rows = [[r["key"], "×".join(map(str, r["shape"])), r["weights"], f"{r['nonzero'] / max(1, r['weights']):.3f}",
             r["bits"], r["mode"], r["dense_fp32_bytes"], r["packed_bytes"], f"{r['ratio']:.1f}×",
             r["bits_per_weight"]] for r in m["layers"]]

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.2f}"

    write_markdown(path, [
        f"# netslim pack: {m.get('arch', '')} from {m.get('source', '')}",
        "Magnitude weight pruning (mask fixed while fine-tuning), k-means weight sharing per layer (float16 "
        "shared values), canonical Huffman coding of the value indices and, for sparse layers, of the zero "
        "run lengths before each stored weight.",
        "## Bytes\n\n" + table(["", "bytes"], [
            ["dense float32 model (all tensors)", b["dense_fp32_model"]], ["packed file", b["packed_file"]],
            ["file ratio", f"{b['ratio_file']}×"], ["packed layers, dense float32", b["packed_layers_dense_fp32"]],
            ["packed layers, packed", b["packed_layers"]], ["packed layers ratio", f"{b['ratio_layers']}×"],
            ["other tensors (raw)", b["raw_tensors"]]]),
        "## Per layer\n\n![bytes](bytes.png)\n\n" + table(
            ["weight", "shape", "weights", "density", "bits", "layout", "dense fp32 B", "packed B", "ratio",
             "bits/weight"], rows),
        "## Accuracy (test split, %)\n\n" + table(["stage", "accuracy"], [
            ["before", pct(acc.get("before"))], ["after weight pruning", pct(acc.get("weight_pruned"))],
            ["after fine-tuning (mask fixed)", pct(acc.get("fine_tuned"))], ["quantized", pct(acc.get("quantized"))],
            ["decoded from the packed file", pct(acc.get("unpacked"))]]),
        f"Verification: decoded weights identical to the quantized ones ({v['tensors']} tensors); identical "
        f"predictions on {v.get('identical_predictions', '–')} of {v.get('images', '–')} test images.",
        f"Command: `{m['command']}`" if m.get("command") else "",
    ])


def bytes_plot(path: Path, layers: list[dict[str, Any]]) -> None:
    from netslim.report.plots import figure, save_figure

    names = [r["key"].removesuffix(".weight") for r in layers]
    fig, ax = figure(figsize=(max(6, 0.4 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [r["dense_fp32_bytes"] for r in layers], width=0.4, label="dense fp32",
           color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [r["packed_bytes"] for r in layers], width=0.4, label="packed", color="#1f77b4")
    ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("bytes")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


__all__ = ["PackConfig", "LayerBytes", "pack_model", "pack_run_dir", "verify_packed", "load_run_data"]
