"""The SGD training loop: bf16 autocast and channels-last on CUDA, DDP under torchrun, resumable epochs."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
from netslim.train.schedule import SCHEDULES, lr_at
from netslim.train.state import load_state, read_meta, save_state

_NONE = 2**62  # "no bad step yet" in the non-finite-loss tracker (min-reduced across ranks)


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Global RNG seed for one epoch on one rank: dropout etc. replay identically after a resume."""
    return seed * 1_000_003 + epoch * 1009 + rank


def _check_args(epochs: int, lr: float, schedule: str, resume: bool, checkpoint_dir: Path | None) -> None:
    if epochs < 1:
        raise NetslimError(f"epochs must be at least 1, got {epochs}")
    if not lr > 0:
        raise NetslimError(f"learning rate must be positive, got {lr}")
    if schedule not in SCHEDULES:
        raise NetslimError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}")
    if resume and checkpoint_dir is None:
        raise NetslimError("resume needs a checkpoint directory")


def check_distill(distill: float, temperature: float) -> None:
    """The distillation settings on their own (Schedule checks them before any analysis runs)."""
    if not 0.0 <= distill <= 1.0:
        raise NetslimError(f"--distill must be in [0, 1], got {distill}")
    if not temperature > 0:
        raise NetslimError(f"distillation temperature must be positive, got {temperature}")


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
    train_batches: Iterable,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    nesterov: bool = True,
    schedule: str = "onecycle",
    label_smoothing: float = 0.0,
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
    distill: float = 0.0,
    temperature: float = 4.0,
) -> list[dict[str, Any]]:
    """Train `model` in place with SGD and return one record per epoch (including resumed ones).

    Each record: epoch (1-based), train_loss, train_acc, val_acc and val_loss (None without val_batches),
    lr (of the epoch's last step), seconds. `amp=None` means bf16 autocast on CUDA only. `mask_hook(model)`
    runs after every optimizer step (e.g. to re-zero pruned weights); `on_epoch(record)` after each epoch's
    checkpoint, on every rank. Under torchrun every rank calls fit; only rank 0 writes and prints.
    With a `teacher` (e.g. the unpruned network) and `distill` = α > 0 the loss is (1 − α)·CE + α·T²·KL of
    the softened outputs (Hinton et al.): a pruned network recovers the function it was cut from faster
    than from labels alone.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    _check_args(epochs, lr, schedule, resume, checkpoint_dir)
    check_distill(distill, temperature)
    if distill > 0 and teacher is None:
        raise NetslimError("distillation needs a teacher network")
    dev = resolve_device(device)
    rank, world = dist_info()
    module = unwrap(model).to(dev)
    if dev.type == "cuda":
        module.to(memory_format=torch.channels_last)
    use_amp = dev.type == "cuda" if amp is None else amp
    optimizer = torch.optim.SGD(
        module.parameters(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
    )
    source = shard_batches(train_batches, rank, world)
    steps = count_batches(source)
    if world > 1:  # every rank must take the same number of steps or DDP's all-reduce waits forever
        steps = int(all_reduce_(torch.tensor([steps], device=dev), "min").item())
    if steps == 0:
        raise NetslimError("no training batches: the training set is empty or smaller than one batch per rank")

    history: list[dict[str, Any]] = []
    start_epoch = step = 0
    meta = read_meta(checkpoint_dir) if resume and checkpoint_dir is not None else None
    if meta is not None:
        if meta["steps_per_epoch"] != steps:
            raise NetslimError(
                f"cannot resume from {checkpoint_dir}: it has {meta['steps_per_epoch']} steps per epoch, this "
                f"run has {steps} (batch size, data or process count changed); use a new checkpoint directory"
            )
        load_state(checkpoint_dir, module, optimizer)
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
        total=epochs * steps,
        epochs=epochs,
        schedule=schedule,
        lr=lr,
        label_smoothing=label_smoothing,
        amp=use_amp,
        mask_hook=mask_hook,
        teacher=teacher.to(dev).eval() if teacher is not None and distill > 0 else None,
        distill=distill,
        temperature=temperature,
        console=console,
        show_bar=progress and rank == 0 and console.is_terminal,
    )
    saved_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dev.type == "cuda" or saved_benchmark
    try:
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            for epoch in range(start_epoch, epochs):
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
                        "format": "netslim.train/1",
                        "epoch": epoch + 1,
                        "epochs": epochs,
                        "step": step,
                        "steps_per_epoch": steps,
                        "total_steps": epochs * steps,
                        "schedule": schedule,
                        "lr": lr,
                        "seed": seed,
                        "world_size": world,
                        "history": history,
                    }
                    save_state(checkpoint_dir, module, optimizer, state)
                barrier()
                if progress and rank == 0:
                    console.print(_summary_line(record, epochs), highlight=False)
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
    total: int
    epochs: int
    schedule: str
    lr: float
    label_smoothing: float
    amp: bool
    mask_hook: Callable[[nn.Module], None] | None
    teacher: nn.Module | None
    distill: float
    temperature: float
    console: Console
    show_bar: bool

    @property
    def sync_every(self) -> int:
        return 1 if self.dev.type == "cpu" else 50

    def run(self, epoch: int, step: int) -> tuple[dict[str, Any], int]:
        dev = self.dev
        stats = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, samples
        first_bad = torch.full((), _NONE, dtype=torch.int64, device=dev)
        lr_now = self.lr
        self.net.train()
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=self.console, disable=not self.show_bar) as bar:
            task = bar.add_task(f"epoch {epoch + 1}/{self.epochs}", total=self.steps, loss=float("nan"))
            for i, (x, y) in enumerate(self.source):
                if i >= self.steps:
                    break
                lr_now = lr_at(self.schedule, self.lr, step, self.total)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_now
                x, y = to_device_input(x, dev), y.to(dev, non_blocking=True)
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=self.amp):
                    logits = self.net(x)
                    if self.teacher is not None:
                        with torch.no_grad():
                            soft = self.teacher(x)
                if self.teacher is not None:
                    loss = distill_loss(logits.float(), soft.float(), y, self.distill, self.temperature,
                                        self.label_smoothing)
                else:
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
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
