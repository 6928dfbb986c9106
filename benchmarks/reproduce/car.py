"""CAR (Abbasi-Asl, Yu; ../shared/methods/car.md) on the shared VGG-16: half of conv1 and of conv2 (features.0,
features.3) removed by exact greedy CAR (re-ranked after every removal, per_step=1), against torch-pruning's
criteria at the same widths; then the pruned network fine-tuned and packed (weight pruning, k-means sharing,
Huffman coding), each layer's bytes against the original dense layer.

CAR decides on images the base was not trained on: one stratified half of the test split (`--val-from test`, as
lda does: the base has memorised its training split, where nearly every ablation costs nothing); every number
reported comes from the other half. tp-taylor's gradients come from the same decision half.
1. The paper's comparison, per layer, without retraining: each criterion halves one layer (its own ranking on
   the unpruned network), the cut network is scored as it is (netslim's stages, --repair none, 0 epochs).
2. Both layers halved at once (each keeping its own per-layer choice), repaired (--repair), fine-tuned
   (--epochs), then netslim.workflows.pack.pack_model (mask fixed during its --pack-epochs fine-tune);
   the packed bytes are decoded and checked before they are reported. Every criterion gets the same.

    python -m benchmarks.reproduce.car --threads 16        # GPU: the paper's exact greedy
    python -m benchmarks.reproduce.car --eval-size 64 --epochs 1 --pack-epochs 1 --train-images 3000 \\
        --test-images 1000 --repair bn --repair-images 1000 --pack-layers features.0,features.3   # CPU
    python -m benchmarks.reproduce.car --smoke --out /tmp/car.json
"""

from __future__ import annotations

from typing import Any

from benchmarks.reproduce import common as rc
from netslim import Plan
from netslim.methods import AnalysisCache, MethodResult
from netslim.repair import Repair
from netslim.workflows.pack import PackConfig, pack_model
from netslim.workflows.stages import accuracy

DIFFERENCES = [
    "network and data: the paper prunes AlexNet's conv1 and conv2 on ImageNet; here VGG-16-BN's first two convs "
    "on a JPEG copy of CIFAR-10",
    "the paper's 'best competing criterion' is its own set of peers; here torch-pruning's L1, random and Taylor",
    "CAR's evaluation set: the spec says a subset of the training data; the shared network has memorised its "
    "training split, so CAR decides on a held-out half of the test split",
    "pack settings (sparsity, bits) follow benchmarks/car/pack.py, not a published recipe",
]


def restrict(plan: Plan, layers: list[str], method: str) -> MethodResult:
    """The Plan's choice in `layers` only: every other layer kept whole."""
    return MethodResult(Plan(arch=plan.arch, num_classes=plan.num_classes, input_size=plan.input_size,
                             keep={n: plan.keep[n] for n in layers if n in plan.keep}, method=method))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = rc.parser(__doc__, epochs=20, calib=2000)
    ap.add_argument("--layers", default="features.0,features.3", help="the layers halved (conv1, conv2)")
    ap.add_argument("--keep-fraction", type=float, default=0.5, help="of each layer's filters")
    ap.add_argument("--eval-size", type=int, default=2000, help="held-out images CAR scores every ablation on")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="CAR's evaluations")
    ap.add_argument("--pack-epochs", type=int, default=5, help="fine-tuning with the weight-pruning mask fixed")
    ap.add_argument("--pack-layers", default="all", help="layers packed (all: every Conv2d/Linear)")
    ap.add_argument("--sparsity", type=float, default=0.6, help="conv weights pruned by magnitude")
    ap.add_argument("--first-sparsity", type=float, default=0.3, help="features.0's (conv1 is sensitive)")
    ap.add_argument("--fc-sparsity", type=float, default=0.5)
    ap.add_argument("--conv-bits", type=int, default=8)
    ap.add_argument("--fc-bits", type=int, default=5)
    # exact greedy costs O(width^2) evaluations: the smoke removes one filter per layer and packs those layers
    args = rc.parse(ap, argv, keep_fraction=0.985, eval_size=2, pack_layers="features.0,features.3", pack_epochs=1)
    run = rc.setup(args, "car")
    train, test, _, decide = run.data(decide=True)
    n, layers = len(train.classes), args.layers.split(",")
    model, arch = run.trained(n)
    base_size, base, cache = rc.size(model, train), accuracy(model, test, run.device), AnalysisCache()
    found = {}
    for layer in layers:  # each layer ranked on the unpruned network, as in the paper
        rc.common.log(f"car: exact greedy on {layer}…")
        found[f"car@{layer}"] = run.analyse(model, arch, decide, "car", None, cache, decide, layers=layer,
                                            eval_size=args.eval_size, per_step=1, keep_fraction=args.keep_fraction,
                                            precision=args.precision)
    peers = run.peers()
    for peer in peers:
        found[peer] = run.analyse(model, arch, decide, peer, None, cache, decide, ratio=args.keep_fraction)
    kept = {m: {name: k for layer in layers for name, k in found[f"car@{layer}"][0].plan.keep.items()}
            if m == "car" else found[m][0].plan.keep for m in ("car", *peers)}
    widths = {m: {layer: len(k.get(layer, ())) for layer in layers} for m, k in kept.items()}
    if any(w != widths["car"] for w in widths.values()):
        raise SystemExit(f"the peers' widths differ from CAR's: {widths}")
    none, rows = run.schedule(epochs=0), []
    for layer in layers:  # the paper's comparison: one layer halved, no retraining
        for m in ("car", *peers):
            plan = Plan(arch=arch, num_classes=n, input_size=(3, 32, 32), method=m,
                        keep={layer: kept[m][layer]} if layer in kept[m] else {})
            rows.append(rc.staged(run, m, model, MethodResult(plan), 0.0, train, test, none, base_size,
                                  repair=Repair(mode="none"), experiment=f"{layer} halved, no retraining")[1])
    packed = None if args.pack_layers == "all" else args.pack_layers.split(",")
    cfg = PackConfig(layers=packed, sparsity=args.sparsity, fc_sparsity=args.fc_sparsity, conv_bits=args.conv_bits,
                     fc_bits=args.fc_bits, finetune=run.schedule(epochs=args.pack_epochs, lr=args.lr / 2),
                     layer_sparsity={"features.0": args.first_sparsity} if packed is None or "features.0" in packed
                     else {})
    dense = {f"{layer}.weight": model.get_submodule(layer).weight.numel() * 4 for layer in layers}
    for m in ("car", *peers):  # both layers halved, repaired, fine-tuned, packed
        rc.common.log(f"car: {m}: both layers halved, fine-tuned and packed…")
        plan = Plan(arch=arch, num_classes=n, input_size=(3, 32, 32), method=m,
                    keep={layer: kept[m][layer] for layer in layers if layer in kept[m]})
        net, row = rc.staged(run, m, model, MethodResult(plan), 0.0, train, test, run.schedule(), base_size,
                             experiment="both halved, fine-tuned, packed")
        _, met, _ = pack_model(net, plan, train, test, cfg, run.device, teacher=model)
        per = {r["key"]: r for r in met["layers"]}
        row["pack"] = {"accuracy": met["accuracy"], "bytes": met["bytes"], "verify": met["verify"],
                       "layers": {k: {"original_dense_fp32": v, "packed": per[k]["packed_bytes"],
                                      "ratio_vs_original": round(v / per[k]["packed_bytes"], 2),
                                      "density": round(per[k]["nonzero"] / per[k]["weights"], 4),
                                      "bits": per[k]["bits"]} for k, v in dense.items()},
                       "history": met["history"]}
        rows.append(row)

    seconds = {k: round(v[1], 1) for k, v in found.items()}
    ours: dict[str, Any] = {"base_accuracy": base, "no_retraining": {}}
    for layer in layers:
        mine = [r for r in rows if r["experiment"].startswith(f"{layer} ")]
        car, top = rc.pick(mine, "car"), rc.best(mine, peers)
        ours["no_retraining"][layer] = {
            "car": car["accuracy"], "best_peer": {"method": top["method"], "accuracy": top["accuracy"]},
            "car_minus_best_peer_points": rc.points(car["accuracy"], top["accuracy"]),
            "car_over_best_peer_percent": round(100 * (car["accuracy"] / max(top["accuracy"], 1e-9) - 1), 1)}
    both = [r for r in rows if r["experiment"].startswith("both")]
    car, top = rc.pick(both, "car"), rc.best(both, peers)
    ours["fine_tuned_and_packed"] = {
        "car_fine_tuned": car["accuracy"],
        "best_peer_fine_tuned": {"method": top["method"], "accuracy": top["accuracy"]},
        "car_packed": car["pack"]["accuracy"]["unpacked"],
        "car_packed_drop_points": rc.points(base, car["pack"]["accuracy"]["unpacked"]),
        "car_layer_reduction": {k: v["ratio_vs_original"] for k, v in car["pack"]["layers"].items()},
        "car_file_reduction": car["pack"]["bytes"]["ratio_file"]}
    paper = {"no_retraining": rc.paper(run, "car.md", "pruning half of the filters of conv1 (conv2) by CAR gives 26% "
                                       "(20%) higher accuracy than the best competing filter-pruning criterion",
                                       higher_accuracy_percent={"conv1": 26, "conv2": 20}),
             "packed": rc.paper(run, "car.md", "conv1 or conv2 **42× smaller** at close to the original accuracy "
                                "after retraining", layer_reduction=42)}
    return run.finish({
        "paper": paper, "ours": ours, "peers": peers, "layers": layers, "analysis_seconds": seconds,
        "car": {k: {"mode": v[0].evidence["car_runs"][0].mode, "eval_images": v[0].plan.meta["eval_images"],
                    "removed_in_order": v[0].plan.meta["removed"]} for k, v in found.items() if k.startswith("car")},
        "schedule": run.record(run.schedule(), train, test, decide_images=len(decide), eval_size=args.eval_size,
                               pack=cfg.__dict__ | {"finetune": cfg.finetune.__dict__}),
        "differences": DIFFERENCES, "rows": rows})


if __name__ == "__main__":
    main()
