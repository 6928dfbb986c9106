"""Whole VGG-16-BN (CIFAR-10) through `lrs` at ≥ 10× less storage: accuracy before and after a short
fine-tune, storage (values and bytes with CSR indices), FLOPs and measured CPU latency.

The global target (`--target`, a fraction of the stored parameters) is split across layers by the
method; bytes count S's column indices too, so the default 0.075 of the values is about 0.095 of
the bytes. Latency is timed for the base network, the factorized one as trained (S as a masked dense
conv) and with S run as a CSR sparse matmul (netslim.surgery.factorized.use_sparse_kernel).

    python -m benchmarks.lrs.network [--target 0.075] [--epochs 1] [--finetune-images 5000] [--threads 1]
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import cifar10, parser, stamp, start, trained, write


def sparse_kernel_macs(model: torch.nn.Module, input_size: tuple[int, int, int]) -> int:
    """MACs when S runs as a sparse kernel: the counted (dense) MACs minus S's zeros at every output position."""
    from netslim.cost.size import count_flops
    from netslim.surgery.factorized import LowRankSparseConv2d, LowRankSparseLinear

    saved, hooks = [], []
    for mod in model.modules():
        if isinstance(mod, (LowRankSparseConv2d, LowRankSparseLinear)) and mod.sparse is not None:
            def hook(m, args, out, saved=saved):
                positions = out[0, 0].numel() if out.dim() == 4 else 1
                saved.append((m.out_dim * m.in_dim - m.nnz) * positions)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(torch.zeros(1, *input_size))
    for h in hooks:
        h.remove()
    return int(count_flops(model, input_size)["macs"]) - sum(saved)


def storage(model: torch.nn.Module) -> dict[str, int]:
    """Values and bytes (float32; S in CSR with its indices) of everything inference needs."""
    from netslim.cost.size import stored_params
    from netslim.surgery.factorized import factorized_layers

    layers = factorized_layers(model)
    seen = {id(p) for lay in layers.values() for p in lay.parameters()}
    other = sum(p.numel() for p in model.parameters() if id(p) not in seen)
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return {"stored_params": stored_params(model), "bytes": 4 * (other + buffers) + sum(
        lay.storage_bytes()["total"] for lay in layers.values()), "nnz": sum(lay.nnz for lay in layers.values())}


def main() -> None:
    ap = parser(__doc__, out="lrs_network_cpu.json", threads=1, inputs=True)
    ap.add_argument("--target", type=float, default=0.075, help="fraction of the stored parameters kept")
    ap.add_argument("--share", type=float, default=0.5, help="fraction of each layer's budget spent on S")
    ap.add_argument("--inputs", default="original", choices=("original", "compressed"))
    ap.add_argument("--calib", type=int, default=1024)
    ap.add_argument("--positions", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--finetune-images", type=int, default=5000)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--test-images", type=int, default=5000, help="0: the whole test split")
    args = ap.parse_args()
    start(args)

    from netslim import Schedule, Target, load_model
    from netslim.cost.size import count_flops
    from netslim.cost.timing import measure_latency
    from netslim.data import calibration_subset
    from netslim.surgery.checkpoint import save_model
    from netslim.surgery.factorized import factorized_layers, use_sparse_kernel
    from netslim.train import finetune
    from netslim.workflows.stages import accuracy, analyse

    model, arch, _ = trained(weights=args.weights)
    train, test, _, _ = cifar10(data=args.data)
    test = calibration_subset(test, args.test_images, seed=2) if args.test_images else test
    shape = tuple(train.images.shape[1:])
    t = time.perf_counter()
    base_acc = accuracy(model, test, "cpu")
    print(f"base accuracy {base_acc:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    options = {"sparse_share": args.share, "images": args.calib, "positions": args.positions, "inputs": args.inputs}
    found, ctx, seconds = analyse(model, arch, train, "lrs", Target("params", args.target), options, "cpu",
                                  calib_size=args.calib)
    plan, small = found.plan, found.model.eval()
    print(f"analysis {seconds:.0f} s", flush=True)
    size_base, size_small = storage(model), storage(small)
    t = time.perf_counter()
    acc_before = accuracy(small, test, "cpu")
    print(f"accuracy before fine-tuning {acc_before:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)

    csr = copy.deepcopy(small)
    use_sparse_kernel(csr)
    x = torch.randn(8, *shape)
    with torch.no_grad():
        csr_gap = float((csr.eval()(x) - small(x)).abs().max())
    load_before = os.getloadavg()[0]
    lat = {name: measure_latency(net, shape, batch_sizes=(1, 64), threads=args.threads, max_seconds=15.0)
           for name, net in (("base", model), ("lrs_masked_dense", small), ("lrs_csr", csr))}
    lat = {k: {f"batch{r['batch']}_ms": r["median_ms"] for r in v} for k, v in lat.items()}
    lat["threads"] = args.threads
    lat["load_average_1min"] = [load_before, os.getloadavg()[0]]  # the CPU is shared: context for the times
    print("latency", lat, flush=True)

    tune = calibration_subset(train, args.finetune_images, seed=1)
    masks = {n: lay.mask.clone() for n, lay in factorized_layers(small).items() if lay.mask is not None}
    t = time.perf_counter()
    history = finetune(small, tune, Schedule(args.epochs, args.lr, args.batch_size), "cpu")
    tune_seconds = time.perf_counter() - t
    small.eval()
    mask_kept = all(torch.equal(masks[n], lay.mask) and float(lay.sparse.weight[~lay.mask].abs().max()) == 0.0
                    for n, lay in factorized_layers(small).items() if lay.mask is not None)
    acc_after = accuracy(small, test, "cpu")
    print(f"accuracy after fine-tuning {acc_after:.4f} (fine-tune {tune_seconds:.0f} s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "model.safetensors", small, plan)
        again, _ = load_model(Path(tmp) / "model.safetensors")
        with torch.no_grad():
            reload_exact = bool(torch.equal(again(x), small(x)))

    result = {
        "benchmark": "lrs_network", **stamp(args), "settings": vars(args), "analysis_seconds": seconds,
        "test_images": len(test.labels),
        "base": {"accuracy": base_acc, **size_base, "macs": int(count_flops(model, shape)["macs"])},
        "lrs": {"accuracy_before_finetune": acc_before, "accuracy_after_finetune": acc_after, **size_small,
                "macs_masked_dense": int(count_flops(small, shape)["macs"]),
                "macs_sparse_kernel": sparse_kernel_macs(small, shape), "finetune_seconds": tune_seconds,
                "finetune_history": history, "mask_fixed_during_finetune": mask_kept,
                "checkpoint_reload_exact": reload_exact, "csr_max_abs_difference": csr_gap},
        "compression": {"params": size_base["stored_params"] / size_small["stored_params"],
                        "bytes": size_base["bytes"] / size_small["bytes"]},
        "latency_cpu": lat,
        "layers": plan.meta["layers"],
    }
    write(args.out, result)
    print(json.dumps({k: result[k] for k in ("base", "compression", "latency_cpu")}, indent=1, default=str))
    print(json.dumps({k: v for k, v in result["lrs"].items() if k != "finetune_history"}, indent=1, default=str))


if __name__ == "__main__":
    main()
