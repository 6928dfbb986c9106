"""Worker for test_probe_ddp: each rank collects statistics on its shard, then all ranks sum them.

Run as `python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_probe_worker.py OUT`; rank 0
writes the reduced statistics to OUT (safetensors). make_setup() is shared with the single-process check.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

NUM_CLASSES = 3


def make_setup() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The same model and batches on every process (fixed seeds)."""
    gen = torch.Generator().manual_seed(123)
    torch.manual_seed(123)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, NUM_CLASSES),
    )
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    batches = [
        (torch.randn(10, 3, 8, 8, generator=gen), torch.randint(0, NUM_CLASSES, (10,), generator=gen)) for _ in range(6)
    ]
    return model, batches


def main(out: str) -> None:
    from netslim.probe import all_reduce_stats, collect, stats_to_tensors

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, batches = make_setup()
    shard = batches[rank::world]
    result = {}
    for mode in ("max", "spatial"):
        stats = collect(model, shard, reduce=mode, per_class=True, num_classes=NUM_CLASSES)
        all_reduce_stats(stats)
        result.update({f"{mode}:{k}": v for k, v in stats.items()})
    single = collect(model, shard, layers=["0"], reduce="mean")["0"].all_reduce()
    result["mean:0"] = single
    if rank == 0:
        save_file(stats_to_tensors(result), out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
