"""The training loop (SGD or AdamW): bf16 autocast and channels-last on CUDA, DDP under torchrun, resumable epochs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from netslim.errors import NetslimError
from netslim.train.distributed import all_reduce_, barrier, count_batches, dist_info, resolve_device, set_epoch
from netslim.train.distributed import shard as shard_batches
from netslim.train.evaluation import evaluate, to_device_input, unwrap
from netslim.train.optim import make_optimizer
from netslim.train.schedule import LATER_FIELDS, Schedule, lr_at
from netslim.train.state import read_meta, restore_training, save_state

_NONE = 2**62  # "no bad step yet" in the non-finite-loss tracker (min-reduced across ranks)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Global RNG seed for one epoch on one rank: dropout etc. replay identically after a resume."""
    return seed * 1_000_003 + epoch * 1009 + rank


def _check_args(schedule: Schedule, resume: bool, checkpoint_dir: Path | None, teacher: nn.Module | None) -> None:
    """What the Schedule cannot check on its own (it allows 0 epochs: no fine-tuning at all)."""
    if schedule.epochs < 1:
        raise NetslimError(f"epochs must be at least 1, got {schedule.epochs}")
    if resume and checkpoint_dir is None:
        raise NetslimError("resume needs a checkpoint directory")
    if schedule.distill > 0 and teacher is None:
        raise NetslimError("distillation needs a teacher network")


def _check_resume(meta: dict[str, Any], schedule: Schedule, steps: int, checkpoint_dir: Path | None) -> None:
    """Refuse a checkpoint written under another recipe: its step would be replayed on the wrong lr curve."""
    if meta["steps_per_epoch"] != steps:
        raise NetslimError(
            f"cannot resume from {checkpoint_dir}: it has {meta['steps_per_epoch']} steps per epoch, this "
            f"run has {steps} (batch size, data or process count changed); use a new checkpoint directory"
        )
    mine = asdict(schedule)
    # netslim.train/1 saved only epochs, schedule and lr; later formats save the whole Schedule as "recipe";
    # a recipe saved before a LATER_FIELDS field existed was trained with its default
    saved = LATER_FIELDS | (meta.get("recipe") or {k: meta[k] for k in ("epochs", "schedule", "lr") if k in meta})
    differ = [k for k in mine if k in saved and saved[k] != mine[k]]
    if differ:
        was = ", ".join(f"{k}={saved[k]!r}" for k in differ)
        now = ", ".join(f"{k}={mine[k]!r}" for k in differ)
        raise NetslimError(f"cannot resume from {checkpoint_dir}: it was trained with {was}, this run asks for "
                           f"{now}; rerun with the same recipe or use a new checkpoint directory")


def distill_loss(logits: torch.Tensor, target: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float,
                 label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 − α)·CE(labels) + α·T²·KL(teacher ‖ student) at temperature T (T² keeps gradient scales equal)."""
    if target.shape != logits.shape:
        raise NetslimError(f"teacher outputs {tuple(target.shape[1:])} do not match the network's "
                           f"{tuple(logits.shape[1:])}: distil from a teacher with the same classes")
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(logits / temperature, 1), F.log_softmax(target / temperature, 1),
                  reduction="batchmean", log_target=True)
    return (1 - alpha) * ce + alpha * temperature**2 * kl


def fit(
    model: nn.Module,
    batches: Iterable,
    schedule: Schedule,
    *,
    val_batches: Iterable | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    device: str | torch.device = "cpu",
    amp: bool | None = None,
    progress: bool = True,
    mask_hook: Callable[[nn.Module], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    seed: int = 0,
    teacher: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place as `schedule` says (its optimizer, curve, warm-up) and return one record per epoch
    (resumed ones too).

    Everything about the recipe comes from the Schedule (its batch_size, augment and bn_recal are for whoever
    builds `batches`); the keywords say where and how to run. Each record: epoch (1-based), train_loss,
    train_acc, val_acc and val_loss (None without val_batches), lr (of the epoch's last step), seconds.
    `amp=None` means bf16 autocast on CUDA only. `mask_hook(model)` runs after every optimizer step (e.g. to
    re-zero pruned weights); `on_epoch(record)` after each epoch's checkpoint, on every rank. Under torchrun
    every rank calls fit; only rank 0 writes and prints. With a `teacher` (e.g. the unpruned network) and
    schedule.distill = α > 0 the loss is (1 − α)·CE + α·T²·KL of the softened outputs (Hinton et al.): a
    pruned network recovers the function it was cut from faster than from labels alone. A checkpoint holds
    the whole Schedule, and resuming under a different one is refused.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    _check_args(schedule, resume, checkpoint_dir, teacher)
    dev = resolve_device(device)
    rank, world = dist_info()
    module = unwrap(model).to(dev)
    if dev.type == "cuda":
        module.to(memory_format=torch.channels_last)
    use_amp = dev.type == "cuda" if amp is None else amp
    optimizer = make_optimizer(module, schedule)
    source = shard_batches(batches, rank, world)
    steps = count_batches(source)
    if world > 1:  # every rank must take the same number of steps or DDP's all-reduce waits forever
        steps = int(all_reduce_(torch.tensor([steps], device=dev), "min").item())
    if steps == 0:
        raise NetslimError("no training batches: the training set is empty or smaller than one batch per rank")

    history: list[dict[str, Any]] = []
    start_epoch = step = 0
    meta = read_meta(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if meta is not None:
        _check_resume(meta, schedule, steps, checkpoint_dir)
        restore_training(checkpoint_dir, module, optimizer)
        start_epoch, step, history, seed = meta["epoch"], meta["step"], list(meta["history"]), meta["seed"]

    net: nn.Module = module
    if world > 1:
        net = DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)
    console = Console(stderr=True)
    loop = _EpochLoop(
        net,
        module,
        optimizer,
        source,
        dev,
        steps=steps,
        recipe=schedule,
        amp=use_amp,
        mask_hook=mask_hook,
        teacher=teacher.to(dev).eval() if teacher is not None and schedule.distill > 0 else None,
        console=console,
        show_bar=progress and rank == 0 and console.is_terminal,
    )
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dev.type == "cuda" or saved_benchmark
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for epoch in range(start_epoch, schedule.epochs):
                began = time.perf_counter()
                torch.manual_seed(_epoch_seed(seed, epoch, rank))
                set_epoch(source, epoch)
                record, step = loop.run(epoch, step)
                if val_batches is not None:
                    val = evaluate(module, val_batches, dev)
                    record["val_acc"], record["val_loss"] = val["accuracy"], val["loss"]
                record["seconds"] = time.perf_counter() - began
                history.append(record)
                if checkpoint_dir is not None and rank == 0:
                    state = {
                        "format": "netslim.train/2",
                        "epoch": epoch + 1,
                        "epochs": schedule.epochs,
                        "step": step,
                        "steps_per_epoch": steps,
                        "total_steps": schedule.epochs * steps,
                        "schedule": schedule.schedule,
                        "lr": schedule.lr,
                        "recipe": asdict(schedule),
                        "seed": seed,
                        "world_size": world,
                        "history": history,
                    }
                    save_state(checkpoint_dir, module, optimizer, state)
                barrier()
                if progress and rank == 0:
                    console.print(_summary_line(record, schedule.epochs), highlight=False)
                if on_epoch is not None:
                    on_epoch(record)
    finally:
        torch.backends.cudnn.benchmark = saved_benchmark
    return history


def _summary_line(record: dict[str, Any], epochs: int) -> str:
    val = f" val_acc {record['val_acc']:.4f}" if record.get("val_acc") is not None else ""
    return (
        f"epoch {record['epoch']}/{epochs} loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}{val} "
        f"lr {record['lr']:.2e} {record['seconds']:.1f}s"
    )


@dataclass
class _EpochLoop:
    """One pass over this rank's batches; keeps the per-step path free of host syncs on CUDA."""

    net: nn.Module  # what runs forward/backward (DDP wrapper under torchrun)
    module: nn.Module  # the plain model, given to mask_hook
    optimizer: torch.optim.Optimizer
    source: Iterable
    dev: torch.device
    steps: int
    recipe: Schedule
    amp: bool
    mask_hook: Callable[[nn.Module], None] | None
    teacher: nn.Module | None
    console: Console
    show_bar: bool

    @property
    def sync_every(self) -> int:
        return 1 if self.dev.type == "cpu" else 50

    def run(self, epoch: int, step: int) -> tuple[dict[str, Any], int]:
        dev = self.dev
        stats = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, samples
        first_bad = torch.full((), _NONE, dtype=torch.int64, device=dev)
        recipe, total = self.recipe, self.recipe.epochs * self.steps
        lr_now = recipe.lr
        self.net.train()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, disable=not self.show_bar) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{recipe.epochs}", total=self.steps, loss=float("nan"))
            for i, (x, y) in enumerate(self.source):
                if i >= self.steps:
                    break
                lr_now = lr_at(recipe.schedule, recipe.lr, step, total, recipe.warmup_epochs * self.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_now
                x, y = to_device_input(x, dev), y.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.net(x)
                    if self.teacher is not None:
                        with torch.no_grad():
                            soft = self.teacher(x)
                if self.teacher is not None:
                    loss = distill_loss(logits.float(), soft.float(), y, recipe.distill, recipe.temperature,
                                        recipe.label_smoothing)
                else:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if self.mask_hook is not None:
                    self.mask_hook(self.module)
                step += 1
                with torch.no_grad():
                    d = loss.detach()
                    first_bad = torch.where(torch.isfinite(d) | (first_bad < _NONE), first_bad, i + 1)
                    hits = (logits.argmax(1) == y).sum()
                    stats += torch.stack([d.double() * y.shape[0], hits.double(), stats.new_tensor(y.shape[0])])
                if (i + 1) % self.sync_every == 0 or i + 1 == self.steps:
                    self._check_finite(first_bad, epoch)
                    bar.update(task, completed=i + 1, loss=float(stats[0] / stats[2].clamp(min=1)))
        self._check_finite(first_bad, epoch)
        loss_sum, correct, n = all_reduce_(stats).tolist()
        if n == 0:
            raise NetslimError("no training batches were produced in this epoch")
        return {
            "epoch": epoch + 1,
            "train_loss": loss_sum / n,
            "train_acc": correct / n,
            "val_acc": None,
            "val_loss": None,
            "lr": lr_now,
        }, step

    def _check_finite(self, first_bad: torch.Tensor, epoch: int) -> None:
        bad = int(all_reduce_(first_bad.clone(), "min").item())
        if bad != _NONE:
            raise NetslimError(f"training diverged: loss is NaN at epoch {epoch + 1} step {bad}; lower --lr")
