"""fit/evaluate on tiny synthetic problems: learning, exact resume, NaN detection, torchrun smoke."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from netslim.errors import NetslimError
from netslim.train import STATE_JSON, STATE_TENSORS, Schedule, evaluate, fit, lr_at
from netslim.train.distributed import StridedShard

REPO = Path(__file__).resolve().parents[1]


class Batches:
    """Re-iterable, shuffled per epoch from seed + epoch, like the data module's batches()."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool = True) -> None:
        self.x, self.y, self.batch_size, self.shuffle, self.epoch = x, y, batch_size, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(1234 + self.epoch)
        order = torch.randperm(len(self.y), generator=gen) if self.shuffle else torch.arange(len(self.y))
        self.epoch += 1
        for i in range(0, len(order), self.batch_size):
            idx = order[i : i + self.batch_size]
            # a little input noise drawn from the global RNG, so resume must restore RNG state too
            yield self.x[idx] + 0.05 * torch.randn(len(idx), *self.x.shape[1:]), self.y[idx]


def separable(n: int = 256, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """1x8x8 images whose class is the position of a bright 4x4 patch, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    for k in range(classes):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    return x, y


def tiny_net(classes: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(32, classes),
    )


pytestmark = pytest.mark.usefixtures("one_thread")


def test_fit_learns_a_separable_problem() -> None:
    x, y = separable()
    model = tiny_net()
    val = Batches(*separable(seed=1), 64, shuffle=False)
    before = evaluate(model, val)["accuracy"]
    history = fit(model, Batches(x, y, 32), Schedule(epochs=4, lr=0.1), val_batches=val, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert set(history[0]) >= {"epoch", "train_loss", "train_acc", "val_acc", "lr", "seconds"}
    assert history[-1]["val_acc"] > max(0.9, before)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_acc"] == pytest.approx(evaluate(model, val)["accuracy"])


def _fit4(model: nn.Module, ckpt: Path, epochs: int = 4, batch: int = 32, **kw) -> list[dict]:
    x, y = separable()
    recipe = Schedule(epochs=epochs, lr=0.05, schedule="onecycle", label_smoothing=0.1)
    return fit(model, Batches(x, y, batch), recipe, checkpoint_dir=ckpt, progress=False, **kw)


def test_resume_after_crash_matches_straight_run(tmp_path: Path) -> None:
    straight = tiny_net()
    full = _fit4(straight, tmp_path / "a")

    def crash(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _fit4(tiny_net(), tmp_path / "b", on_epoch=crash)
    assert json.loads((tmp_path / "b" / STATE_JSON).read_text())["epoch"] == 2

    resumed = tiny_net(seed=99)  # different init: everything must come from the checkpoint
    rest = _fit4(resumed, tmp_path / "b", resume=True)
    assert [h["epoch"] for h in rest] == [1, 2, 3, 4]
    assert rest[3]["train_loss"] == pytest.approx(full[3]["train_loss"], rel=1e-5)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_checkpoint_is_pickle_free_and_complete(tmp_path: Path) -> None:
    model = tiny_net()
    _fit4(model, tmp_path, epochs=1)
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    assert meta["epoch"] == 1 and meta["step"] == meta["steps_per_epoch"] == 8
    tensors = load_file(str(tmp_path / STATE_TENSORS))
    assert torch.equal(tensors["model/0.weight"], model[0].weight.detach())
    assert "momentum/6.weight" in tensors and tensors["momentum/6.weight"].abs().sum() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_JSON, STATE_TENSORS]
    # a finished run resumes to a no-op that still reports its history
    assert len(_fit4(tiny_net(seed=5), tmp_path, epochs=1, resume=True)) == 1


def test_resume_with_other_batch_size_is_refused(tmp_path: Path) -> None:
    _fit4(tiny_net(), tmp_path, epochs=1)
    x, y = separable()
    with pytest.raises(NetslimError, match="steps per epoch"):
        _fit4(tiny_net(), tmp_path, epochs=1, batch=64, resume=True)


def test_resume_with_another_recipe_is_refused(tmp_path: Path) -> None:
    """Only the steps per epoch used to be compared: a 4-epoch onecycle run at lr 0.1 resumed as 8 epochs of
    constant lr 5 replayed its step on another curve. The whole Schedule is saved and must match."""
    x, y = separable()
    saved = Schedule(epochs=4, lr=0.1, schedule="onecycle")

    def stop(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_net(), Batches(x, y, 32), saved, checkpoint_dir=tmp_path, progress=False, on_epoch=stop)
    meta = json.loads((tmp_path / STATE_JSON).read_text())
    assert Schedule(**meta["recipe"]) == saved
    other = Schedule(epochs=8, lr=5.0, schedule="constant")
    with pytest.raises(NetslimError, match=r"epochs=4, lr=0\.1, schedule='onecycle'.*epochs=8, lr=5\.0"):
        fit(tiny_net(), Batches(x, y, 32), other, checkpoint_dir=tmp_path, resume=True, progress=False)
    with pytest.raises(NetslimError, match=r"momentum=0\.9.*momentum=0\.5"):
        fit(tiny_net(), Batches(x, y, 32), Schedule(epochs=4, lr=0.1, momentum=0.5), checkpoint_dir=tmp_path,
            resume=True, progress=False)
    assert len(fit(tiny_net(), Batches(x, y, 32), saved, checkpoint_dir=tmp_path, resume=True, progress=False)) == 4


def test_nan_loss_is_reported_with_epoch_and_step() -> None:
    x, y = separable(64)
    x[40] = float("nan")  # third batch of 16, unshuffled
    with pytest.raises(NetslimError, match=r"loss is NaN at epoch 1 step 3; lower --lr"):
        fit(tiny_net(), Batches(x, y, 16, shuffle=False), Schedule(epochs=1, lr=0.1), progress=False)


def test_mask_hook_runs_after_every_step() -> None:
    model = tiny_net()
    mask = torch.rand_like(model[0].weight) > 0.5
    calls = []

    def keep_sparse(module: nn.Module) -> None:
        calls.append(module)
        with torch.no_grad():
            module[0].weight.mul_(mask)

    x, y = separable(64)
    fit(model, Batches(x, y, 16), Schedule(epochs=2, lr=0.1), mask_hook=keep_sparse, progress=False)
    assert len(calls) == 8 and calls[0] is model
    assert (model[0].weight[~mask] == 0).all()


def test_bad_arguments_are_netslim_errors() -> None:
    x, y = separable(32)
    with pytest.raises(NetslimError, match="schedule"):  # refused when the recipe is made, before any work
        Schedule(epochs=1, lr=0.1, schedule="step")
    for bad, match in [({"epochs": -1}, "epochs"), ({"lr": 0.0}, "learning rate"), ({"batch_size": 0}, "batch size"),
                       ({"distill": 1.5}, r"\[0, 1\]"), ({"temperature": 0.0}, "temperature")]:
        with pytest.raises(NetslimError, match=match):
            Schedule(**({"epochs": 1, "lr": 0.1} | bad))
    with pytest.raises(NetslimError, match="at least 1"):
        fit(tiny_net(), Batches(x, y, 16), Schedule(epochs=0, lr=0.1), progress=False)
    with pytest.raises(NetslimError, match="no training batches"):
        fit(tiny_net(), [], Schedule(epochs=1, lr=0.1), progress=False)
    with pytest.raises(NetslimError, match="checkpoint directory"):
        fit(tiny_net(), Batches(x, y, 16), Schedule(epochs=1, lr=0.1), resume=True, progress=False)


def test_evaluate_counts_per_class() -> None:
    class Fixed(nn.Module):  # predicts class 0 always
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.tensor([[5.0, 0.0, 0.0, 0.0]]).expand(len(x), 4)

    y = torch.tensor([0, 0, 1, 2, 0])
    batches = [(torch.zeros(3, 1, 2, 2), y[:3]), (torch.zeros(2, 1, 2, 2), y[3:])]
    out = evaluate(Fixed(), batches)
    assert out["n"] == 5 and out["accuracy"] == pytest.approx(0.6)
    assert out["per_class"] == [1.0, 0.0, 0.0, None]
    assert out["loss"] > 0
    assert len(evaluate(Fixed(), batches, num_classes=3)["per_class"]) == 3
    with pytest.raises(NetslimError, match="1 labels lie outside"):
        evaluate(Fixed(), [(torch.zeros(1, 1, 2, 2), torch.tensor([4]))])
    with pytest.raises(NetslimError, match="nothing to evaluate"):
        evaluate(Fixed(), [])


def test_schedules() -> None:
    total = 100
    assert lr_at("onecycle", 1.0, 0, total) == pytest.approx(1 / 25)
    peak = max(range(total), key=lambda s: lr_at("onecycle", 1.0, s, total))
    assert 28 <= peak <= 30 and lr_at("onecycle", 1.0, peak, total) == pytest.approx(1.0, abs=1e-3)
    assert lr_at("onecycle", 1.0, total - 1, total) < 1e-4
    assert lr_at("cosine", 0.1, 0, total) == pytest.approx(0.1)
    assert lr_at("cosine", 0.1, 50, total) == pytest.approx(0.05)
    assert lr_at("constant", 0.1, 77, total) == 0.1


def test_strided_shard_covers_everything_once() -> None:
    items = list(range(7))
    parts = [list(StridedShard(items, r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert [len(StridedShard(items, r, 3)) for r in range(3)] == [len(p) for p in parts] == [3, 2, 2]


WORKER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch import nn

    from netslim.train import Schedule, evaluate, fit

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(sys.argv[1])
    gen = torch.Generator().manual_seed(0)  # identical data on every rank; fit shards it
    y = torch.arange(96) % 3
    x = torch.randn(96, 1, 8, 8, generator=gen) + y.view(-1, 1, 1, 1).float()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]
    torch.manual_seed(rank)  # different inits: DDP must broadcast rank 0's
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    fit(model, batches, Schedule(epochs=1, lr=0.05), val_batches=batches, checkpoint_dir=out / "ckpt",
        progress=rank == 0)
    acc = evaluate(model, batches)
    assert acc["n"] == 96, acc
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    dist.barrier()  # no rank tears gloo down while the other still talks to it (aborts under load)
    dist.destroy_process_group()
    """
)


def test_ddp_two_cpu_processes(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd + [str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 1/1" in proc.stderr and proc.stderr.count("epoch 1/1 loss") == 1  # rank 0 prints alone
    saved = load_file(str(tmp_path / "ckpt" / STATE_TENSORS))
    assert all(torch.isfinite(v.float()).all() for v in saved.values())
    r0, r1 = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    for key, value in r0.items():
        if "running" not in key and "num_batches" not in key:  # BN statistics are per rank by design
            assert torch.allclose(value, r1[key]), key
    assert torch.allclose(r0["0.weight"], saved["model/0.weight"])


def test_distill_loss_reduces_to_its_parts() -> None:
    from netslim.train.loop import distill_loss

    g = torch.Generator().manual_seed(0)
    s, t, y = torch.randn(16, 5, generator=g), torch.randn(16, 5, generator=g), torch.arange(16) % 5
    ce = nn.functional.cross_entropy(s, y)
    assert distill_loss(s, t, y, 0.0, 4.0) == pytest.approx(float(ce))
    kl = (torch.softmax(t / 2, 1) * (torch.log_softmax(t / 2, 1) - torch.log_softmax(s / 2, 1))).sum(1).mean()
    assert distill_loss(s, t, y, 1.0, 2.0) == pytest.approx(4 * float(kl), rel=1e-5)
    assert distill_loss(t, t, y, 1.0, 4.0) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(NetslimError, match="same classes"):
        distill_loss(s, t[:, :3], y, 0.5, 4.0)


def test_distillation_from_labels_alone_is_impossible_but_the_teacher_teaches() -> None:
    """With α = 1 and wrong labels the student can only learn from the teacher: it must end up agreeing with
    the teacher (and so be right), where the same run on the labels learns the wrong classes."""
    x, y = separable()
    teacher = tiny_net(seed=1)
    fit(teacher, Batches(x, y, 32), Schedule(epochs=4, lr=0.1), progress=False)
    val = Batches(*separable(seed=1), 64, shuffle=False)
    assert evaluate(teacher, val)["accuracy"] > 0.9
    wrong = (y + 1) % 3
    taught, plain = tiny_net(seed=2), tiny_net(seed=2)
    fit(taught, Batches(x, wrong, 32), Schedule(epochs=4, lr=0.1, distill=1.0), progress=False, teacher=teacher)
    fit(plain, Batches(x, wrong, 32), Schedule(epochs=4, lr=0.1), progress=False)
    assert evaluate(taught, val)["accuracy"] > 0.9
    assert evaluate(plain, val)["accuracy"] < 0.1
    with pytest.raises(NetslimError, match="teacher"):
        fit(tiny_net(), Batches(x, y, 32), Schedule(epochs=1, lr=0.1, distill=0.5), progress=False)
