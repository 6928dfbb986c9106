"""CAR-pruned + packed VGG-16 (CIFAR-10): bytes per layer before and after, accuracy after fine-tuning.

1. Take the CAR halvings of features.0 (conv1) and features.3 (conv2) from car_prune_cpu.json (each
   ranked on the unpruned network by `python -m benchmarks.car.prune`) and cut both by surgery.
2. Repair BatchNorm (as compress does after every cut), then fine-tune (reduced CPU schedule), optionally
   distilled from the original network (--distill).
3. `netslim.workflows.pack.pack_model`: magnitude weight pruning + fine-tuning with the mask fixed,
   k-means weight sharing (8 bits conv, 5 bits Linear), Huffman coding; the packed bytes are decoded and checked
   (identical weights and predictions) before anything is reported.
Bytes per layer are compared with the original dense float32 layer (before CAR) and with the CAR-pruned
dense layer. Test accuracy on the same test images throughout.

    python -m benchmarks.car.pack --ft-images 10000 --test-images 5000
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, RUNS, cifar10, parser, stamp, start, trained, write


def main() -> None:
    ap = parser(__doc__, out="car_pack_cpu.json")
    ap.add_argument("--layers", default="features.0,features.3")
    ap.add_argument("--car-results", type=Path, default=RESULTS / "car_prune_cpu.json")
    ap.add_argument("--ft-images", type=int, default=10000, help="training images per fine-tuning epoch")
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--sparsity", type=float, default=0.6, help="conv weights pruned by magnitude")
    ap.add_argument("--first-sparsity", type=float, default=0.3, help="features.0 (conv1 is sensitive)")
    ap.add_argument("--fc-sparsity", type=float, default=0.5)
    ap.add_argument("--conv-bits", type=int, default=8)
    ap.add_argument("--fc-bits", type=int, default=5)
    ap.add_argument("--pack-ft-epochs", type=int, default=1)
    ap.add_argument("--distill", type=float, default=0.0, help="weight of the original network's softened "
                    "outputs in both fine-tunes (knowledge distillation; 0: labels only)")
    ap.add_argument("--test-images", type=int, default=0, help="0: the whole test split")
    ap.add_argument("--out-dir", type=Path, default=RUNS / "car_pack", help="packed run directory")
    args = ap.parse_args()
    start(args)

    from netslim import Plan, Schedule
    from netslim.data import calibration_subset, split_holdout
    from netslim.surgery.apply import apply_plan
    from netslim.train import finetune
    from netslim.workflows.pack import PackConfig, pack_model, write_pack_dir
    from netslim.workflows.stages import accuracy, recalibrated_accuracy

    t0 = time.perf_counter()
    layers = [n.strip() for n in args.layers.split(",")]
    car = json.loads(args.car_results.read_text())
    train, test, _, n_classes = cifar10()
    if args.test_images:
        test = calibration_subset(test, args.test_images, seed=0)
    fit_part, _ = split_holdout(train, 0.1, seed=0)
    ft_data = calibration_subset(fit_part, args.ft_images, seed=1)
    base, arch, _ = trained(num_classes=n_classes)
    plan = Plan(arch=arch, num_classes=n_classes, input_size=(3, 32, 32),
                keep={n: car[n]["accuracy_without_retraining"]["car_kept"] for n in layers}, method="car",
                meta={"source": str(args.car_results.name)})
    acc_base = accuracy(base, test, "cpu")
    model = apply_plan(copy.deepcopy(base), plan)
    acc_cut = accuracy(model, test, "cpu")
    sched = Schedule(epochs=args.ft_epochs, lr=args.lr, batch_size=128, distill=args.distill)
    acc_bn = recalibrated_accuracy(model, ft_data, test, sched, "cpu")  # what compress does after every cut
    print(f"base {acc_base:.4f}, CAR-cut {acc_cut:.4f}, BN repaired {acc_bn}", flush=True)
    history = finetune(model, ft_data, sched, "cpu", teacher=base)
    model.eval()
    acc_ft = accuracy(model, test, "cpu")
    print(f"fine-tuned {acc_ft:.4f}", flush=True)
    cfg = PackConfig(sparsity=args.sparsity, fc_sparsity=args.fc_sparsity,
                     layer_sparsity={"features.0": args.first_sparsity}, conv_bits=args.conv_bits, fc_bits=args.fc_bits,
                     finetune=Schedule(epochs=args.pack_ft_epochs, lr=args.lr / 2, batch_size=128,
                                       distill=args.distill))
    blob, metrics, _ = pack_model(model, plan, ft_data, test, cfg, "cpu", teacher=base)
    original = {f"{n}.weight": m.weight.numel() * 4 for n, m in base.named_modules() if hasattr(m, "weight")
                and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
    per_layer = []
    for row in metrics["layers"]:
        before = original[row["key"]]
        per_layer.append({"key": row["key"], "original_dense_fp32": before, "car_dense_fp32": row["dense_fp32_bytes"],
                          "packed": row["packed_bytes"], "ratio_vs_original": round(before / row["packed_bytes"], 2),
                          "ratio_vs_car_dense": row["ratio"], "density": round(row["nonzero"] / row["weights"], 4),
                          "bits": row["bits"], "layout": row["mode"], "bits_per_weight": row["bits_per_weight"]})
    conv_original = sum(v for k, v in original.items() if k.startswith("features."))
    conv_packed = sum(r["packed"] for r in per_layer if r["key"].startswith("features."))
    stamped = stamp(args)
    metrics |= {"source": "vgg16_bn_cifar10 + CAR plan", "arch": arch,
                **{k: stamped[k] for k in ("machine", "command", "date")}}
    write_pack_dir(args.out_dir, blob, metrics, overwrite=True)
    acc = metrics["accuracy"]
    result = {
        **stamped,
        "car_layers": {n: {"kept": len(plan.keep[n]), "of": car[n]["accuracy_without_retraining"]["width"],
                           "car_options": car[n]["options"]} for n in layers},
        "test_images": len(test),
        "accuracy": {"original": acc_base, "car_cut_no_retraining": acc_cut,
                     "car_cut_bn_repaired": acc_bn, "car_fine_tuned": acc_ft,
                     "weight_pruned": acc["weight_pruned"], "weight_pruned_fine_tuned": acc.get("fine_tuned"),
                     "quantized": acc["quantized"], "decoded_from_packed_file": acc["unpacked"],
                     "drop_points": round(100 * (acc_base - acc["unpacked"]), 2)},
        "fine_tune": {"images": len(ft_data), "epochs": args.ft_epochs, "lr": args.lr, "distill": args.distill,
                      "temperature": sched.temperature, "teacher": "the original (unpruned) network",
                      "history": history, "pack_history": metrics["history"]},
        "verify": metrics["verify"], "sparsity": metrics["sparsity"], "bits": metrics["bits"],
        "bytes_per_layer": per_layer,
        "bytes": metrics["bytes"] | {"conv_layers_original_dense_fp32": conv_original,
                                     "conv_layers_packed": conv_packed,
                                     "conv_ratio_vs_original": round(conv_original / conv_packed, 2)},
        "wall_seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("fine_tune",)}, indent=1, default=str))
    write(args.out, result)


if __name__ == "__main__":
    main()
