"""GreBdec vs truncated SVD vs magnitude pruning at equal storage per layer (VGG-16-BN, CIFAR-10, CPU).

Every conv layer gets the same budget, a fraction of its dense weight count: truncated SVD spends it
on rank (r·(m + d) values), magnitude pruning on non-zeros, GreBdec on both (`--share` of it on S),
fitted to the layer's feature maps on calibration images (the weight-only objective is run too).
Reported per layer: relative feature-map error ‖Y − Ŷ‖/‖Y‖ on the calibration patches and on held-out
training images, relative weight error, bytes (CSR index overhead included); then the test accuracy
of the whole network with every layer replaced, before any fine-tuning.

    python -m benchmarks.lrs.layers [--fraction 0.1] [--share 0.5] [--threads 1]
"""

from __future__ import annotations

import copy
import time

import torch

from benchmarks._common import cifar10, parser, stamp, start, trained, write

METHODS = ("svd", "magnitude", "grebdec", "grebdec-weights")


def main() -> None:
    ap = parser(__doc__, out="lrs_layers_cpu.json", threads=1, inputs=True)
    ap.add_argument("--fraction", type=float, default=0.1, help="budget per layer, as a fraction of m·d")
    ap.add_argument("--share", type=float, default=0.5, help="GreBdec: fraction of the budget spent on S")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images")
    ap.add_argument("--heldout", type=int, default=512, help="held-out training images for generalisation")
    ap.add_argument("--positions", type=int, default=8, help="output positions sampled per image and layer")
    ap.add_argument("--test-images", type=int, default=2000, help="test images for accuracy (0: all)")
    args = ap.parse_args()
    start(args)

    from netslim.cost.size import stored_params
    from netslim.data import batches, calibration_subset, split_holdout
    from netslim.methods.lrs import decompose, original_moments, weighted_error
    from netslim.surgery.factorized import build_factorized, matrix_shape
    from netslim.workflows.stages import accuracy

    model, _, _ = trained(weights=args.weights)
    train, test, _, _ = cifar10(data=args.data)
    fit_part, hold = split_holdout(train, 0.05, seed=7)
    calib = calibration_subset(fit_part, args.calib, seed=0)
    held = calibration_subset(hold, args.heldout, seed=0)
    test = calibration_subset(test, args.test_images, seed=2) if args.test_images else test
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    mods = dict(model.named_modules())

    t0 = time.perf_counter()
    mom = original_moments(model, names, batches(calib, 32), args.positions, seed=0)
    mom_held = original_moments(model, names, batches(held, 32), args.positions, seed=1)
    moment_seconds = time.perf_counter() - t0
    print(f"moments: {moment_seconds:.0f} s", flush=True)

    rows, fitted = [], {k: {} for k in METHODS}
    for n in names:
        w = mods[n].weight.detach()
        m, d = matrix_shape(mods[n])
        w2 = w.reshape(m, d).double()
        budget = int(args.fraction * m * d)
        r_svd = budget // (m + d)
        r_lrs = int((1 - args.share) * budget) // (m + d)
        c_lrs = budget - r_lrs * (m + d)
        row = {"layer": n, "m": m, "d": d, "budget": budget, "samples": mom[n].n}
        t = time.perf_counter()
        u, s, vh = torch.linalg.svd(w2, full_matrices=False)
        root = s[:r_svd].sqrt()
        fitted["svd"][n] = (u[:, :r_svd] * root, root[:, None] * vh[:r_svd], None, r_svd, 0)
        row["svd_seconds"] = time.perf_counter() - t
        keep = w2.abs().flatten().topk(budget).indices
        mask = torch.zeros(m * d, dtype=torch.bool)
        mask[keep] = True
        mask = mask.reshape(m, d)
        fitted["magnitude"][n] = (w2.new_zeros(m, 0), w2.new_zeros(0, d), (w2 * mask, mask), 0, budget)
        for key, gram in (("grebdec", mom[n].gram), ("grebdec-weights", None)):
            t = time.perf_counter()
            dec = decompose(w2, r_lrs, c_lrs, gram, ridge=1e-4)
            row[f"{key}_seconds"] = time.perf_counter() - t
            fitted[key][n] = (dec.u, dec.v, (dec.s, dec.mask) if c_lrs else None, r_lrs, c_lrs)
        for key in METHODS:
            uu, vv, sp, r, c = fitted[key][n]
            w_hat = uu @ vv + (sp[0] if sp is not None else 0)
            layer = build_factorized(mods[n], r, c) if (r or c) else None
            row[key] = {"rank": r, "nnz": c,
                        "params": layer.stored_params() if layer else 0,
                        "bytes": layer.storage_bytes()["total"] if layer else 0,
                        "feature_error": weighted_error(w_hat, w2, mom[n]),
                        "feature_error_heldout": weighted_error(w_hat, w2, mom_held[n]),
                        "weight_error": weighted_error(w_hat, w2, None)}
        rows.append(row)
        print(n, f"{m}x{d}", " | ".join(f"{k} r={row[k]['rank']} c={row[k]['nnz']} "
                                        f"fm={row[k]['feature_error']:.4f}/{row[k]['feature_error_heldout']:.4f} "
                                        f"w={row[k]['weight_error']:.3f}" for k in METHODS),
              f"({row['grebdec_seconds']:.0f} s)", flush=True)

    base_acc = accuracy(model, test, "cpu")
    nets = {}
    for key in METHODS:
        net = copy.deepcopy(model)
        for n in names:
            uu, vv, sp, r, c = fitted[key][n]
            if not (r or c):
                raise SystemExit(f"{n}: a {args.fraction} budget leaves {key} nothing to store")
            layer = build_factorized(mods[n], r, c)
            layer.set_factors(uu.float(), vv.float(), sp[0].float() if sp else None, sp[1] if sp else None)
            net.set_submodule(n, layer.eval())
        nets[key] = net
    networks = {}
    for key, net in nets.items():
        t = time.perf_counter()
        networks[key] = {"accuracy_before_finetune": accuracy(net, test, "cpu"), "stored_params": stored_params(net),
                         "conv_bytes": sum(r[key]["bytes"] for r in rows),
                         "mean_feature_error": sum(r[key]["feature_error"] for r in rows) / len(rows),
                         "mean_feature_error_heldout": sum(r[key]["feature_error_heldout"] for r in rows) / len(rows)}
        print(key, networks[key], f"{time.perf_counter() - t:.0f} s", flush=True)
    dense_conv_bytes = 4 * sum(r["m"] * r["d"] for r in rows)
    result = {
        "benchmark": "lrs_layers", **stamp(args), "settings": vars(args),
        "calibration_images": len(calib.labels), "heldout_images": len(held.labels),
        "test_images": len(test.labels), "moment_seconds": moment_seconds,
        "base": {"accuracy": base_acc, "stored_params": stored_params(model), "conv_bytes": dense_conv_bytes},
        "networks": networks, "layers": rows,
    }
    write(args.out, result)
    print(f"base accuracy {base_acc:.4f}; written {args.out}")


if __name__ == "__main__":
    main()
