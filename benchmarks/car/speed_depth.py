"""Where the cached-tail engine pays off: CPU time per CAR evaluation by layer depth on the shared VGG-16.

The naive evaluation runs the whole network per ablation, whatever the layer; the fast engine runs only
what follows the layer's response (cached once). So the gain grows with depth: nothing for conv1 (its
head is 0.6% of the network), large for the last blocks. Each layer: a few ablations on the same
2,000 training images, fast (32 masks per pass) and naive (one ablation, full network); process CPU
seconds per evaluation, and the counts of both paths compared.

    python -m benchmarks.car.speed_depth --threads 2
"""

from __future__ import annotations

import json

from benchmarks._common import parser, stamp, start, write
from benchmarks.car.common import cpu_per_eval, eval_images, layer_engine


def main() -> None:
    ap = parser(__doc__, out="car_speed_depth_cpu.json")
    ap.add_argument("--layers", default="features.0,features.3,features.10,features.20,features.30,features.40")
    ap.add_argument("--eval-size", type=int, default=2000)
    ap.add_argument("--ablations", type=int, default=4)
    args = ap.parse_args()
    start(args)

    from netslim.cost.size import count_flops

    model, n_classes, x, y = eval_images(args.eval_size)
    total_macs = count_flops(model, (3, 32, 32))["macs"]
    rows = []
    naive_eval = None
    for layer in [n.strip() for n in args.layers.split(",")]:
        fast = layer_engine(model, layer, x, y, n_classes, 32)
        probe = list(range(args.ablations))
        got = fast.ablate(fast.full_mask(), probe)
        fast_eval = cpu_per_eval(fast)
        naive = layer_engine(model, layer, x, y, n_classes, 1, fast=False)
        ref = naive.ablate(naive.full_mask(), probe[:1])
        this_naive = cpu_per_eval(naive)
        naive_eval = this_naive if naive_eval is None else min(naive_eval, this_naive)
        rows.append({"layer": layer, "filters": fast.width, "path": fast.path,
                     "fast_cpu_seconds_per_eval": round(fast_eval, 3),
                     "naive_cpu_seconds_per_eval": round(this_naive, 3),
                     "speedup": round(this_naive / fast_eval, 2),
                     "cache_seconds_wall": round(fast.stats.cache_seconds, 2),
                     "counts_match": int(ref[0]) == int(got[0])})
        print(json.dumps(rows[-1]), flush=True)
    result = {**stamp(args), "eval_images": len(y), "timing": f"process CPU seconds, {args.threads} thread(s) summed",
              "network_macs": total_macs, "ablations_per_layer": args.ablations, "layers": rows}
    write(args.out, result)


if __name__ == "__main__":
    main()
