"""Where the cached-tail engine pays off: CPU time per CAR evaluation by layer depth on the shared VGG-16.

The naive evaluation runs the whole network per ablation, whatever the layer; the fast engine runs only
what follows the layer's response (cached once). So the gain grows with depth: nothing for conv1 (its
head is 0.6% of the network), large for the last blocks. Each layer: a few ablations on the same
2,000 training images, fast (32 masks per pass) and naive (one ablation, full network); process CPU
seconds per evaluation, and the counts of both paths compared.

    python benchmarks/car_speed_depth.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "models" / "vgg16_bn_cifar10.safetensors"
DATA = SHARED / "data" / "cifar10-jpeg.tar.gz"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="features.0,features.3,features.10,features.20,features.30,features.40")
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--ablations", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "car_speed_depth_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from netslim.cost.size import count_flops
    from netslim.data import split_holdout
    from netslim.io import atomic_write_text
    from netslim.methods import Context
    from netslim.methods.car.core import eval_set
    from netslim.methods.car.engine import AblationEngine
    from netslim.methods.car.options import CAROptions
    from netslim.workflows.api import load_data, load_trained
    from netslim.workflows.stages import machine

    train, _, _, n_classes = load_data(str(DATA))
    model, arch, _ = load_trained(WEIGHTS, "vgg16_bn", n_classes)
    fit_part, _ = split_holdout(train, 0.1, seed=0)
    ctx = Context(model=model, arch=arch, num_classes=n_classes, input_size=(3, 32, 32), train=fit_part,
                  opts=CAROptions(eval_size=args.eval_size))
    x, y, _ = eval_set(ctx)
    total_macs = count_flops(model, (3, 32, 32))["macs"]
    rows = []
    naive_eval = None
    for layer in [n.strip() for n in args.layers.split(",")]:
        fast = AblationEngine(model, [(layer,)], x, y, n_classes, batch_size=256, masks_per_pass=32)
        probe = list(range(args.ablations))
        got = fast.ablate(fast.full_mask(), probe)
        fast_eval = fast.stats.cpu_seconds / fast.stats.evaluations
        naive = AblationEngine(model, [(layer,)], x, y, n_classes, batch_size=256, masks_per_pass=1, fast=False)
        ref = naive.ablate(naive.full_mask(), probe[:1])
        this_naive = naive.stats.cpu_seconds / naive.stats.evaluations
        naive_eval = this_naive if naive_eval is None else min(naive_eval, this_naive)
        rows.append({"layer": layer, "filters": fast.width, "path": fast.path,
                     "fast_cpu_seconds_per_eval": round(fast_eval, 3),
                     "naive_cpu_seconds_per_eval": round(this_naive, 3),
                     "speedup": round(this_naive / fast_eval, 2),
                     "cache_seconds_wall": round(fast.stats.cache_seconds, 2),
                     "counts_match": int(ref[0]) == int(got[0])})
        print(json.dumps(rows[-1]), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
              "torch": torch.__version__, "threads": args.threads, "eval_images": len(y),
              "timing": f"process CPU seconds, {args.threads} thread(s) summed",
              "command": shlex.join([sys.executable.split("/")[-1], *sys.argv]), "network_macs": total_macs,
              "ablations_per_layer": args.ablations, "layers": rows}
    atomic_write_text(args.out, json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
