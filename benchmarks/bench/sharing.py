"""Analysis time of the statistics pass shared across methods vs each method running its own.

`netslim bench` hands every method one cache: methods that need the same statistics (PFA-KL and
PFA-En: max-pooled responses of every layer) get them from one forward pass over the calibration
data. This times each method's analysis alone (empty cache) and all of them in sequence on one
cache, in one process, on the shared VGG-16.

    python -m benchmarks.bench.sharing [--methods pfa-kl,pfa-en,pca,tp-l1] [--calib 2000]
"""

from __future__ import annotations

import json

from benchmarks._common import cifar10, parser, stamp, start, trained, write
from netslim import parse_target
from netslim.methods import AnalysisCache
from netslim.workflows.stages import analyse


def main() -> None:
    ap = parser(__doc__, out="stats_sharing_cpu.json")
    ap.add_argument("--methods", default="pfa-kl,pfa-en,pca,tp-l1")
    ap.add_argument("--target", default="params=0.125")
    ap.add_argument("--calib", type=int, default=2000)
    args = ap.parse_args()
    start(args)
    model, arch, _ = trained()
    train, _, _, _ = cifar10()
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
    out = {"benchmark": "bench_sharing", **stamp(args), "calibration_images": args.calib,
           "separate": {m: {"seconds": round(s, 2), "statistics_passes": p} for m, (s, p) in separate.items()},
           "shared": {m: {"seconds": round(s, 2), "statistics_passes": p} for m, (s, p) in shared.items()},
           "total_seconds": {"separate": round(total_sep, 2), "shared": round(total_shared, 2)},
           "passes": {"separate": sum(p for _, p in separate.values()), "shared": sum(p for _, p in shared.values())},
           "ratio_separate_over_shared": round(total_sep / total_shared, 3)}
    print(json.dumps(out["total_seconds"]), out["passes"], flush=True)
    write(args.out, out)


if __name__ == "__main__":
    main()
