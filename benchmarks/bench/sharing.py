"""Analysis time of the statistics pass shared across methods vs each method running its own.

`netslim bench` hands every method one cache: methods that need the same statistics (PFA-KL and
PFA-En: max-pooled responses of every layer) get them from one forward pass over the calibration
data. This times each method's analysis alone (empty cache) and all of them in sequence on one
cache, in one process, on the shared VGG-16.

    python benchmarks/bench_sharing.py [--methods pfa-kl,pfa-en,pca,tp-l1] [--calib 2000]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from netslim.cost.targets import parse_target
from netslim.methods import AnalysisCache
from netslim.workflows.api import load_data, load_trained
from netslim.workflows.stages import analyse, machine

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="pfa-kl,pfa-en,pca,tp-l1")
    ap.add_argument("--target", default="params=0.125")
    ap.add_argument("--calib", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "stats_sharing_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, arch, _ = load_trained(SHARED / "models" / "vgg16_bn_cifar10.safetensors", "vgg16_bn", 10)
    train, _, _, _ = load_data(str(SHARED / "data" / "cifar10-jpeg.tar.gz"))
    methods = args.methods.split(",")

    def run(method: str, cache: AnalysisCache) -> tuple[float, int]:
        before = len(cache.passes)
        target = None if method == "pfa-kl" else parse_target(args.target)
        seconds = analyse(model, arch, train, method, target, {}, "cpu", args.calib, cache=cache)[2]
        return seconds, len(cache.passes) - before

    separate = {m: run(m, AnalysisCache()) for m in methods}
    shared_cache = AnalysisCache()
    shared = {m: run(m, shared_cache) for m in methods}
    total_sep, total_shared = sum(s for s, _ in separate.values()), sum(s for s, _ in shared.values())
    out = {"benchmark": "bench_sharing", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "torch": torch.__version__, "threads": args.threads,
           "command": shlex.join(["python", *sys.argv]), "calibration_images": args.calib,
           "separate": {m: {"seconds": round(s, 2), "statistics_passes": p} for m, (s, p) in separate.items()},
           "shared": {m: {"seconds": round(s, 2), "statistics_passes": p} for m, (s, p) in shared.items()},
           "total_seconds": {"separate": round(total_sep, 2), "shared": round(total_shared, 2)},
           "passes": {"separate": sum(p for _, p in separate.values()), "shared": sum(p for _, p in shared.values())},
           "ratio_separate_over_shared": round(total_sep / total_shared, 3)}
    print(json.dumps(out["total_seconds"]), out["passes"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
