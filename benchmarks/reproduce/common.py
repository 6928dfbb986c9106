"""What the paper reproductions share: options (the paper's schedule by default, a smaller stated one by option,
`--smoke` for tests), device and data, the paper's number quoted from ../shared/methods, one row per method through
netslim's own stages (analyse -> run_stages -> measure), and the result file,
benchmarks/results/reproduce_<name>_<cpu|gpu>.json (with --smoke a temporary file unless --out says where)."""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from benchmarks import _common as common
from netslim import Schedule
from netslim.cost.size import model_size
from netslim.data import ImageSet, calibration_subset, split_holdout
from netslim.methods import AnalysisCache, MethodResult
from netslim.repair import Repair
from netslim.workflows.stages import analyse, measured_pair, run_stages

# --smoke: a few images, one step, no repair, one thread (a second one is many times slower on a busy CPU)
SMOKE = {"threads": 1, "epochs": 1, "batch_size": 8, "train_images": 8, "test_images": 4, "decide_images": 4,
         "calib": 4, "repair": "none", "repair_images": 4, "taylor_images": 4}


def parser(doc: str | None, *, epochs: int, lr: float = 0.05, calib: int = 5000) -> argparse.ArgumentParser:
    """The shared options; the defaults are the paper's schedule (what fits ~8 minutes on one H100/H200)."""
    ap = common.parser(doc, inputs=True)
    a = ap.add_argument  # and from common.parser: --threads, --weights, --data
    a("--device", default="auto", help="auto: cuda when there is a GPU")
    a("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/reproduce_<name>_<kind>.json)")
    a("--smoke", action="store_true", help="the same code path in seconds (a few images, one step): for tests")
    a("--epochs", type=int, default=epochs, help="fine-tuning epochs of every row")
    a("--lr", type=float, default=lr, help="peak learning rate of the onecycle schedule")
    a("--batch-size", type=int, default=256)
    a("--label-smoothing", type=float, default=0.1)
    a("--distill", type=float, default=0.0, help="weight of distillation from the unpruned network (0: none, the "
                                                  "papers' schedules); short CPU schedules lean on it")
    a("--train-images", type=int, default=0, help="training images (0: the whole split)")
    a("--test-images", type=int, default=0, help="test images reported on (0: all of them)")
    a("--decide-images", type=int, default=0, help="held-out images a method decides on, where it does (0: all)")
    a("--calib", type=int, default=calib, help="training images the analyses see")
    a("--repair", default="lsq", choices=("none", "bn", "lsq"), help="between the cut and fine-tuning, every row")
    a("--repair-images", type=int, default=2000, help="training images of the refit and of BatchNorm's statistics")
    a("--taylor-images", type=int, default=2048, help="images tp-taylor accumulates gradients over")
    a("--peers", default="tp-l1,tp-random,tp-taylor", help="torch-pruning criteria run at the same budget")
    a("--latency", action="store_true", help="also time every network (CPU; and CUDA on a GPU)")
    a("--papers", type=Path, default=common.SHARED / "methods", help="the specs the papers' numbers are quoted from")
    return ap


def parse(ap: argparse.ArgumentParser, argv: list[str] | None, **smoke: Any) -> argparse.Namespace:
    """argv parsed; --smoke makes SMOKE and the script's `smoke` the defaults (options given still win)."""
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(**(SMOKE | smoke))
    args = ap.parse_args(argv)
    knobs = ("epochs", "lr", "batch_size", "train_images", "test_images", "decide_images", "calib", "distill")
    paper = all(getattr(args, k) == ap.get_default(k) for k in knobs)
    args.schedule_kind = "smoke" if args.smoke else "paper" if paper else "reduced"
    return args


@dataclass
class Run:
    """One reproduction: its name, options, device and result path."""

    name: str
    args: argparse.Namespace
    device: str
    out: Path
    began: float = field(default_factory=time.perf_counter)

    def schedule(self, **change: Any) -> Schedule:
        a = self.args
        return Schedule(**{"epochs": a.epochs, "lr": a.lr, "batch_size": a.batch_size, "bn_recal": a.repair_images,
                           "label_smoothing": a.label_smoothing, "distill": a.distill} | change)

    def repair(self) -> Repair:
        return Repair(mode=self.args.repair, images=self.args.repair_images)

    def data(self, classes: list[str] | None = None, decide: bool = False
             ) -> tuple[ImageSet, ImageSet, list[int] | None, ImageSet | None]:
        """train, test, base class indices, and (`decide`) images to decide on: a stratified half of the test split
        as `--val-from test` takes (the base has memorised its training split); the other half is reported."""
        a, held = self.args, None
        train, test, idx, _ = common.cifar10(classes, a.data)
        if decide:
            held, test = split_holdout(test, 0.5, seed=0)
            held = subset(held, a.decide_images, 3)
        return subset(train, a.train_images, 1), subset(test, a.test_images, 2), idx, held

    def trained(self, n: int) -> tuple[nn.Module, str]:
        model, arch, _ = common.trained(num_classes=n, weights=self.args.weights)
        return model.to(self.device).eval(), arch

    def peers(self) -> list[str]:
        return [p for p in self.args.peers.split(",") if p]

    def analyse(self, model: nn.Module, arch: str, data: ImageSet, method: str, target: Any = None,
                cache: AnalysisCache | None = None, val: ImageSet | None = None, **options: Any
                ) -> tuple[MethodResult, float]:
        if method == "tp-taylor":  # netslim.workflows.stages.analyse, with tp-taylor's image count
            options["taylor_images"] = self.args.taylor_images
        found, _, seconds = analyse(model, arch, data, method, target, options, self.device,
                                    calib_size=self.args.calib, cache=cache, val=val)
        return found, seconds

    def record(self, schedule: Schedule, train: ImageSet, test: ImageSet, **more: Any) -> dict[str, Any]:
        """The schedule every row had, with the images it ran on and how it relates to the paper's."""
        return {"kind": self.args.schedule_kind, **asdict(schedule), "train_images": len(train),
                "test_images": len(test), "calibration_images": self.args.calib, "repair": asdict(self.repair()),
                "device": self.device, **more}

    def finish(self, result: dict[str, Any]) -> dict[str, Any]:  # stamped and written atomically
        result = {"benchmark": f"reproduce_{self.name}", **common.stamp(self.args), "device": self.device, **result,
                  "seconds": round(time.perf_counter() - self.began, 1)}
        common.write(self.out, result)
        return result


def setup(args: argparse.Namespace, name: str) -> Run:
    from netslim.workflows.api import pick_device

    common.start(args)
    device = pick_device(args.device)
    kind = "smoke" if args.smoke else "gpu" if device.startswith("cuda") else "cpu"
    out = args.out or (Path(tempfile.gettempdir()) if args.smoke else common.RESULTS) / f"reproduce_{name}_{kind}.json"
    return Run(name, args, device, out)


def subset(data: ImageSet, n: int, seed: int) -> ImageSet:  # n = 0: all of it
    return calibration_subset(data, n, seed=seed) if 0 < n < len(data) else data


def paper(run: Run, file: str, quote: str, **numbers: Any) -> dict[str, Any]:
    """The paper's number as ../shared/methods/<file> states it: the quote (checked there) and its numbers."""
    path = run.args.papers / file
    text, quote = " ".join(path.read_text().split()) if path.is_file() else "", " ".join(quote.split())
    return {"source": f"../shared/methods/{file}", "quote": quote, "quote_found": quote in text, **numbers}


def size(model: nn.Module, data: ImageSet) -> dict[str, int]:
    """Stored parameters, MACs, FLOPs and bytes as stored (netslim.cost.size.model_size)."""
    return model_size(model, tuple(data.images.shape[1:]))


def staged(run: Run, label: str, base: nn.Module, found: MethodResult, seconds: float, train: ImageSet,
           test: ImageSet, schedule: Schedule, base_size: dict[str, int], *, init: str = "fine",
           repair: Repair | None = None, **extra: Any) -> tuple[nn.Module, dict[str, Any]]:
    """One row: `found`'s Plan (or network) through netslim's stages (cut, repair, fine-tune), then measured."""
    rec = run_stages(base, found, train, test, schedule=schedule, device=run.device, init=init,
                     repair=repair or run.repair())
    got = (measured_pair(base, rec.model, tuple(train.images.shape[1:]), run.device)[1]  # type: ignore[arg-type]
           if run.args.latency else size(rec.model, train))
    plan = rec.plan or found.plan
    return rec.model, {
        "method": label, **extra, "init": init, "repair": rec.repair, **rec.accuracies(),
        "bn_after_refit": rec.bn_after_refit,
        **{k: got[k] for k in ("params", "macs", "bytes")},
        **{f"{k}_kept": round(got[k] / base_size[k], 6) for k in ("params", "macs", "bytes")},
        "latency": got.get("latency"), "analysis_seconds": round(seconds, 1),
        "repair_seconds": round(rec.repair_seconds, 1), "finetune_seconds": round(rec.finetune_seconds, 1),
        "widths": plan.widths(), "drop": plan.drop, "history": rec.history}


def rows(run: Run, base: nn.Module, arch: str, train: ImageSet, test: ImageSet, schedule: Schedule,
         methods: dict[str, Any], base_size: dict[str, int], cache: AnalysisCache | None = None,
         val: ImageSet | None = None, options: dict[str, dict[str, Any]] | None = None, **extra: Any
         ) -> list[dict[str, Any]]:
    """A row per method (name -> its Target, None: its own size; `options` by name), one shared cache."""
    cache, out = cache if cache is not None else AnalysisCache(), []
    for method, target in methods.items():
        common.log(f"{run.name}: {method} at {target or 'its own size'}…")
        found, seconds = run.analyse(base, arch, train, method, target, cache, val, **(options or {}).get(method, {}))
        out.append(staged(run, method, base, found, seconds, train, test, schedule, base_size,
                          target=str(target) if target else None, **extra)[1])
        common.log(f"{run.name}: {method}: {out[-1]['params_kept']:.4f} of the params, accuracy "
                   f"{out[-1]['accuracy']}")
    return out


def change(row: dict[str, Any], base_accuracy: float, by: str = "params") -> dict[str, Any]:
    """A row as a paper states it: how many times smaller (in `by`), and accuracy points gained on the base."""
    return {"method": row["method"], "size_reduction": round(1 / row[f"{by}_kept"], 2), "accuracy": row["accuracy"],
            "accuracy_change_points": points(row["accuracy"], base_accuracy)}


def best(rows: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """The most accurate row of `methods`."""
    return max((r for r in rows if r["method"] in methods), key=lambda r: r["accuracy"] or -1.0)


def pick(rows: list[dict[str, Any]], method: str) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == method)


def points(a: float | None, b: float | None) -> float | None:  # a - b in accuracy points
    return None if a is None or b is None else round(100 * (a - b), 2)
