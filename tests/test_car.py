"""CAR: exact zero for a redundant filter, batched ablation = one at a time, greedy loop, method, report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.methods.car.core import GreedyRun, greedy, zero_channels
from netslim.methods.car.engine import AblationEngine
from netslim.zoo import build


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and biases (a fresh model's BN is the identity)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _self_labelled(model: nn.Module, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the model's own predictions as labels, with every fourth label wrong (accuracy 75%)."""
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model.eval()(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    return x, y


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small CNN trained briefly on the embedded digits, and 96 of its training images (normalised)."""
    from netslim.data import batches, calibration_subset, load_dataset
    from netslim.train import Schedule, finetune

    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    model = build("small_cnn", num_classes=10, in_channels=train.images.shape[1])
    finetune(model, train, Schedule(epochs=3, lr=0.05, batch_size=128), "cpu")
    x, y = next(iter(batches(calibration_subset(train, 96, seed=0), 96)))
    return model.eval(), x, y


@pytest.fixture
def small(trained: tuple) -> nn.Module:
    return copy.deepcopy(trained[0])


def test_duplicate_filter_with_merged_weights_has_car_zero(small: nn.Module, trained: tuple) -> None:
    # filter 5 of features.4 becomes an exact copy of filter 2 (conv and BN), and its weights in the next
    # layer are merged into filter 2's: the network no longer needs filter 5 at all
    conv, bn, nxt = small.features[4], small.features[5], small.features[8]
    with torch.no_grad():
        conv.weight[5] = conv.weight[2]
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            t[5] = t[2]
        nxt.weight[:, 2] += nxt.weight[:, 5]
        nxt.weight[:, 5] = 0
    x, y = trained[1], trained[2]
    engine = AblationEngine(small, [("features.4",)], x, y, 10, batch_size=64, masks_per_pass=8)
    base = engine.correct(engine.full_mask())
    ablated = engine.ablate(engine.full_mask(), list(range(engine.width)))
    car = (base - ablated) / engine.n
    assert car[5] == 0
    assert car.abs().max() > 0  # other filters matter: the zero is not vacuous
    counts, loss = engine.evaluate(torch.stack([engine.full_mask(), _without(engine.full_mask(), 5)]))
    assert torch.equal(counts[0], counts[1]) and loss[0] == pytest.approx(float(loss[1]), rel=1e-6)
    run = greedy(engine, 0, 1)
    assert run.first_car[5] == 0 and run.car[0] <= 0


def _without(mask: torch.Tensor, c: int) -> torch.Tensor:
    out = mask.clone()
    out[c] = 0
    return out


def test_batched_ablation_equals_one_at_a_time(small: nn.Module, trained: tuple) -> None:
    x, y = trained[1][:50], trained[2][:50]
    groups = [("features.4",)]
    batched = AblationEngine(small, groups, x, y, 10, batch_size=96, masks_per_pass=16)
    single = AblationEngine(small, groups, x, y, 10, batch_size=96, masks_per_pass=1)
    naive = AblationEngine(small, groups, x, y, 10, batch_size=50, masks_per_pass=1, fast=False)
    assert batched.path.startswith("cached") and naive.path.startswith("full network")
    g = torch.Generator().manual_seed(3)
    masks = (torch.rand(24, batched.width, generator=g) > 0.3).float()
    want = batched.correct(masks, per_class=True)
    one_by_one = torch.stack([single.correct(m, per_class=True)[0] for m in masks])
    assert torch.equal(want, one_by_one)
    assert torch.equal(want, naive.correct(masks, per_class=True))
    assert torch.equal(want.sum(1), batched.correct(masks))
    assert batched.stats.evaluations == 48 and batched.stats.images == 48 * 50


def test_bf16_engine_counts_stay_close_to_fp32(small: nn.Module, trained: tuple) -> None:
    """precision=bf16 trades exactness for speed on CPUs with bf16 units: the counts may move by an image
    or two on borderline predictions, not more, and the mask is still honoured."""
    x, y = trained[1], trained[2]
    fp32 = AblationEngine(small, [("features.4",)], x, y, 10, batch_size=96, masks_per_pass=8)
    bf16 = AblationEngine(small, [("features.4",)], x, y, 10, batch_size=96, masks_per_pass=8, precision="bf16")
    g = torch.Generator().manual_seed(5)
    masks = torch.cat([fp32.full_mask()[None], torch.zeros(1, fp32.width),
                       (torch.rand(14, fp32.width, generator=g) > 0.5).float()])
    want, got = fp32.correct(masks), bf16.correct(masks)
    assert (want - got).abs().max() <= 3
    assert got[1] < got[0] - 20  # every filter ablated: the network is lost in bf16 too
    with pytest.raises(NetslimError, match="precision must be fp32 or bf16"):
        AblationEngine(small, [("features.4",)], x, y, 10, precision="fp16")


def test_coupled_group_and_skip_connection_match_hooks() -> None:
    torch.manual_seed(0)
    model = build("resnet20").eval()
    _randomise_bn(model)
    x, y = _self_labelled(model, 12, (3, 16, 16))
    # layer2.0.conv1: the tail needs the block input too (downsample shortcut); stage 2's coupled group
    for groups in ([("layer2.0.conv1",)],
                   [("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2", "layer2.2.conv2")]):
        fast = AblationEngine(model, groups, x, y, 10, batch_size=48, masks_per_pass=4)
        naive = AblationEngine(model, groups, x, y, 10, batch_size=48, masks_per_pass=4, fast=False)
        assert fast.path.startswith("cached")
        masks = (torch.rand(6, fast.width, generator=torch.Generator().manual_seed(4)) > 0.5).float()
        rows = masks.repeat_interleave(12, 0)
        with torch.inference_mode():
            a = fast._tail(slice(0, 12), masks, rows)
            b = naive._hooked(naive._inputs(slice(0, 12)), 6, rows)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_zeroing_after_batchnorm_equals_mask_and_bias_does_not_leak(small: nn.Module, trained: tuple) -> None:
    x, y = trained[1][:40], trained[2][:40]
    engine = AblationEngine(small, [("features.0",)], x, y, 10, batch_size=64)
    mask = engine.full_mask()
    mask[[1, 7]] = 0
    baked = copy.deepcopy(small)
    zero_channels(baked, ("features.0",), [1, 7], torch.zeros(1, 1, 16, 16))
    with torch.no_grad():
        hits = (baked(x).argmax(1) == y).sum()
    assert float(engine.correct(mask)[0]) == float(hits)
    # zeroing only the conv weights leaves BN's shift: not the same network
    leaky = copy.deepcopy(small)
    with torch.no_grad():
        leaky.features[0].weight[[1, 7]] = 0
        out_leaky, out_baked = leaky(x), baked(x)
    assert not torch.allclose(out_leaky, out_baked)


def test_greedy_exact_and_reranked(small: nn.Module, trained: tuple) -> None:
    x, y = trained[1][:64], trained[2][:64]
    fast = AblationEngine(small, [("features.4",)], x, y, 10, batch_size=64, masks_per_pass=8)
    naive = AblationEngine(small, [("features.4",)], x, y, 10, batch_size=64, masks_per_pass=1, fast=False)
    exact = greedy(fast, 0, 6, per_step=1)
    ref = greedy(naive, 0, 6, per_step=1)
    assert exact.removed == ref.removed and exact.accuracy == ref.accuracy
    assert len(exact.removed) == 6 and len(set(exact.removed)) == 6 and len(exact.kept) == 26
    # the first removal is the smallest CAR of the unpruned layer
    assert exact.car[0] == min(exact.first_car)
    assert fast.stats.evaluations == 1 + sum(32 - k for k in range(6))
    coarse = greedy(AblationEngine(small, [("features.4",)], x, y, 10, batch_size=64), 0, 6, per_step=3,
                    adaptive=False)
    assert len(coarse.removed) == 6 and coarse.mode == "re-ranked every 3 removals" and coarse.rankings == 2
    assert sorted(coarse.first_car[f] for f in coarse.removed[:3]) == sorted(coarse.first_car)[:3]
    # accuracy after each removal is the real accuracy of that mask
    mask = fast.full_mask()
    for f, acc in zip(coarse.removed, coarse.accuracy, strict=True):
        mask[f] = 0
        assert float(fast.correct(mask)[0]) / fast.n == pytest.approx(acc)
    with pytest.raises(NetslimError):
        greedy(fast, 0, 2, per_step=0)


def test_accuracy_floor_stops_early(small: nn.Module, trained: tuple) -> None:
    x, y = trained[1][:64], trained[2][:64]
    engine = AblationEngine(small, [("features.0",)], x, y, 10, batch_size=64)
    run = greedy(engine, 0, 15, per_step=1, max_drop=0.0)
    assert all(a >= run.base_accuracy for a in run.accuracy)
    assert len(run.removed) < 15 or run.stopped == "target width reached"


def _context(model: nn.Module, options: dict) -> tuple:
    from netslim.data import load_dataset
    from netslim.workflows.stages import analyse

    return analyse(copy.deepcopy(model), "small_cnn", load_dataset("digits", "train"), "car", None, options, "cpu")


def test_method_plan_report_and_classwise(tmp_path, trained: tuple) -> None:
    result, _, _ = _context(trained[0], {"layers": "features.0,features.4", "eval_size": 200, "per_step": 4,
                             "keep_fraction": 0.5, "classwise": True})
    plan = result.plan
    assert len(plan.keep["features.0"]) == 8 and len(plan.keep["features.4"]) == 16
    assert "features.8" not in plan.keep and plan.meta["per_step"] == 4 and plan.meta["eval_images"] == 200
    runs: list[GreedyRun] = result.evidence["car_runs"]
    assert [r.root for r in runs] == ["features.0", "features.4"]
    assert len(runs[0].classwise) == 16 and len(runs[0].classwise[0]) == 10
    report = result.report[0]
    assert "re-ranked every 4 removals" in report and "evals/s" in report and "Class-wise CAR" in report
    for name, writer in result.artifacts.items():
        writer(tmp_path / name)
        assert (tmp_path / name).stat().st_size > 0
    assert {"car_curve.png", "car_classwise.png", "car.json"} <= {p.name for p in tmp_path.iterdir()}


def test_method_errors(trained: tuple) -> None:
    with pytest.raises(NetslimError, match="option layers"):
        _context(trained[0], {"layers": "features.99", "eval_size": 50})
    with pytest.raises(NetslimError, match="option layers"):
        _context(trained[0], {"layers": "classifier", "eval_size": 50})
    with pytest.raises(NetslimError, match="per_step"):
        _context(trained[0], {"layers": "features.0", "eval_size": 50, "per_step": 0})


def test_global_target_bisects_one_fraction(trained: tuple) -> None:
    from netslim.cost.size import plan_size
    from netslim.cost.targets import parse_target
    from netslim.data import load_dataset
    from netslim.workflows.stages import analyse

    train = load_dataset("digits", "train")
    result, ctx, _ = analyse(copy.deepcopy(trained[0]), "small_cnn", train, "car", parse_target("params=0.8"),
                             {"layers": "features.4,features.8", "eval_size": 64, "per_step": 8}, "cpu")
    plan = result.plan
    base = plan_size(ctx.base_plan("car"), ctx.template())["params"]
    assert plan_size(plan, ctx.template())["params"] <= 0.8 * base
    assert set(plan.keep) == {"features.4", "features.8"} and plan.meta["target"] == "params=0.8"
    ratios = [len(plan.keep["features.4"]) / 32, len(plan.keep["features.8"]) / 64]
    assert abs(ratios[0] - ratios[1]) < 0.05  # one kept fraction shared by the chosen layers


def test_adaptive_blocks_stop_at_interacting_removals(small: nn.Module, trained: tuple) -> None:
    x, y = trained[1][:64], trained[2][:64]
    engine = AblationEngine(small, [("features.0",)], x, y, 10, batch_size=64)
    run = greedy(engine, 0, 12, per_step=4, adaptive=True)
    assert len(run.removed) == 12 and run.adaptive and "adaptive" in run.mode
    # every removal inside a block cost at most what its CAR predicted when it was ranked
    accs = [run.base_accuracy, *run.accuracy]
    n = engine.n
    fixed = greedy(AblationEngine(small, [("features.0",)], x, y, 10, batch_size=64), 0, 12, per_step=4,
                   adaptive=False)
    assert run.rankings >= fixed.rankings == 3
    # (one image of slack: the block's masks run in other batch shapes than the ranking's)
    assert all(round((accs[j] - accs[j + 1]) * n) <= round(run.car[j] * n) + 1 for j in range(12))
