"""Repair after a cut: least-squares refit of the consumers of cut layers, and bias compensation."""

from __future__ import annotations

import copy
import weakref
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from netslim.data import batches, load_dataset
from netslim.plan import Plan
from netslim.repair import accumulate, compensate_bias, find_jobs, lsq_refit, match_rows
from netslim.surgery.apply import apply_plan
from netslim.surgery.graph import channel_groups
from netslim.train import recalibrate_bn
from netslim.zoo import build

pytestmark = pytest.mark.usefixtures("one_thread")


def _images(n: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 1,
            batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return [(x[i:i + batch], torch.zeros(len(x[i:i + batch]), dtype=torch.long)) for i in range(0, n, batch)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _outputs(net: nn.Module, data: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net.eval()(x) for x, _ in data])


def _combined(kind: str, dtype: torch.dtype) -> tuple[nn.Module, tuple[int, ...]]:
    """Two linear layers (no activation); output channel 5 of the first = 0.7·channel 1 − 1.3·channel 3."""
    torch.manual_seed(3)
    if kind == "linear":
        net, shape = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 3)), (8,)
    else:
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten(), nn.Linear(4, 3))
        shape = (3, 8, 8)
    with torch.no_grad():
        first = net[0]
        first.weight[5] = 0.7 * first.weight[1] - 1.3 * first.weight[3]
        first.bias[5] = 0.7 * first.bias[1] - 1.3 * first.bias[3]
    return net.to(dtype), shape


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_removed_linear_combination_is_reproduced(kind: str, dtype: torch.dtype, tol: float) -> None:
    net, shape = _combined(kind, dtype)
    cut = apply_plan(copy.deepcopy(net), Plan("t", 3, shape, keep={"0": [0, 1, 2, 3, 4]}))
    data, held = _images(128, shape, dtype), _images(64, shape, dtype, seed=2)
    assert _rel(_outputs(cut, held), _outputs(net, held)) > 0.05  # the cut alone does change the outputs
    report = lsq_refit(net, cut, lambda: data, ridge=0.0, holdout=lambda: held)
    assert report.refitted == ["1"]
    assert _rel(_outputs(cut, held), _outputs(net, held)) < tol
    layer = report.layers[0]
    assert layer.error_before > 0.05 and layer.error_after < tol


def _grouped() -> tuple[nn.Module, nn.Module]:
    """conv(3→8) → ReLU → conv(8→6, 3×3, stride 2, padding 1, groups 2), and a cut of it made by hand:
    inputs 1 and 6 go (one per group, so each group keeps a different input selection), outputs 1 and 4 go."""
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, padding=1, groups=2))
    net = net.double().eval()
    keep_in, keep_out = [0, 2, 3, 4, 5, 7], [0, 2, 3, 5]
    cut = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1, groups=2))
    cut = cut.double().eval()
    with torch.no_grad():
        cut[0].weight.copy_(net[0].weight[keep_in])
        cut[0].bias.copy_(net[0].bias[keep_in])
        w = net[2].weight
        cut[2].weight.copy_(torch.cat([w[[0, 2]][:, [0, 2, 3]], w[[3, 5]][:, [0, 1, 3]]]))
        cut[2].bias.copy_(net[2].bias[keep_out])
    return net, cut


@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_grouped_strided_conv_matches_the_unfolded_problem(ridge: float) -> None:
    net, cut = _grouped()
    data = _images(48, (3, 9, 9), torch.float64)
    x = torch.cat([b for b, _ in data])
    with torch.no_grad():
        xs = F.unfold(cut[1](cut[0](x)), 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 6 * 9)
        ys = net(x)[:, [0, 2, 3, 5]].permute(0, 2, 3, 1).reshape(-1, 4)
    report = lsq_refit(net, cut, lambda: data, positions=None, ridge=ridge)
    assert report.refitted == ["2"] and report.layers[0].rows == xs.shape[0]
    for g in range(2):
        xg = torch.cat([xs[:, 27 * g:27 * (g + 1)], torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
        yg = ys[:, 2 * g:2 * (g + 1)]
        if ridge == 0:
            sol = torch.linalg.lstsq(xg, yg).solution
        else:
            gram = xg.T @ xg
            sol = torch.linalg.solve(gram + ridge * gram.trace() / 28 * torch.eye(28, dtype=xs.dtype), xg.T @ yg)
        got = cut[2].weight.detach()[2 * g:2 * (g + 1)].reshape(2, 27)
        assert torch.allclose(got, sol[:27].T, atol=1e-5 * float(sol.abs().max()), rtol=0)
        assert torch.allclose(cut[2].bias.detach()[2 * g:2 * (g + 1)], sol[27], atol=1e-5 * float(sol.abs().max()))


def _digits_cut() -> tuple[nn.Module, nn.Module, Plan, list, list]:
    ds = load_dataset("digits", "train")
    calib = list(batches(ds, 64))[:4]  # 256 images
    held = list(batches(ds, 64))[10:14]  # 256 other images
    model = build("small_cnn", num_classes=10, in_channels=1).eval()
    recalibrate_bn(model, calib)  # realistic BN statistics (the net is untrained)
    gen = torch.Generator().manual_seed(5)
    keep = {n: sorted(torch.randperm(m.out_channels, generator=gen)[: m.out_channels // 2].tolist())
            for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = Plan("small_cnn", 10, tuple(ds.images.shape[1:]), keep=keep)
    return model, apply_plan(copy.deepcopy(model), plan), plan, calib, held


def test_refit_lowers_every_layers_held_out_error_on_a_small_cnn() -> None:
    model, cut, plan, calib, held = _digits_cut()
    matched = copy.deepcopy(cut)
    logits_before = _rel(_outputs(cut, held), _outputs(model, held))
    report = lsq_refit(model, cut, lambda: calib, holdout=lambda: held, plan=plan)
    assert report.refitted == ["features.4", "features.8", "classifier"]
    assert report.holdout_images == 256 and report.images == 256
    for r in report.layers:
        assert r.error_after <= r.error_before, r
        assert r.error_after < 0.8 * r.error_before, r
    assert _rel(_outputs(cut, held), _outputs(model, held)) < 0.5 * logits_before
    # without the plan, the kept channels are matched in the weights: the same refit
    lsq_refit(model, matched, lambda: calib, holdout=lambda: held)
    for (n, a), b in zip(cut.state_dict().items(), matched.state_dict().values(), strict=True):
        assert torch.equal(a, b), n
    d = report.to_dict()
    assert d["totals"]["refitted"] == 3 and len(d["layers"]) == 3
    assert "features.8" in report.to_markdown()


class _AliveTensors(TorchDispatchMode):
    """Bytes of storage still referenced among the tensors any torch op made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def alive_bytes(self) -> int:
        alive = [t for t in (r() for r in self.refs) if t is not None]
        self.refs = [weakref.ref(t) for t in alive]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())


def test_memory_does_not_grow_with_calibration_images() -> None:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    plan = Plan("t", 4, (3, 12, 12), keep={"0": list(range(0, 16, 2)), "3": list(range(8))})
    shapes, peaks = [], []
    for n in (64, 512):
        data = _images(n, (3, 12, 12))
        cut = apply_plan(copy.deepcopy(net), plan)
        job = find_jobs(net, cut, data[0][0][:2])[0]
        mom = accumulate(net, cut, job, data, positions=16, seed=0, device="cpu", bias=True)
        assert mom.images == n
        shapes.append({k: tuple(v.shape) for k, v in vars(mom).items() if isinstance(v, torch.Tensor)})
        tracker, seen = _AliveTensors(), []

        def watched(data: list = data, tracker: _AliveTensors = tracker, seen: list = seen):  # noqa: ANN202
            for item in data:
                seen.append(tracker.alive_bytes())  # what the refit still holds from the earlier batches
                yield item

        with tracker:
            lsq_refit(net, cut, lambda w=watched: w(), holdout=lambda w=watched: w(), walk=False)
        peaks.append(max(seen))
    assert shapes[0] == shapes[1]
    assert peaks[1] <= 1.1 * peaks[0], peaks  # 8× the images: a kept activation or patch would show here


@pytest.mark.parametrize("kind", ["linear bias", "conv into BN"])
def test_compensate_bias_restores_a_constant_channel(kind: str) -> None:
    torch.manual_seed(7)
    if kind == "linear bias":
        net, shape = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3)), (5,)
    else:  # no padding in the consumer: a constant input channel adds a constant to every output position
        net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, bias=False),
                            nn.BatchNorm2d(5), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
        shape = (3, 8, 8)
        net[3].running_mean.uniform_(-1, 1)
        net[3].running_var.uniform_(0.5, 2)
    net = net.double().eval()
    with torch.no_grad():
        net[0].weight[2] = 0
        net[0].bias[2] = 2.5
    cut = apply_plan(copy.deepcopy(net), Plan("t", 3, shape, keep={"0": [0, 1, 3]}))
    data = _images(64, shape, torch.float64)
    assert _rel(_outputs(cut, data), _outputs(net, data)) > 0.01
    report = compensate_bias(net, cut, lambda: data)
    assert report.refitted == ["2"] and report.layers[0].error_after < 1e-6
    assert _rel(_outputs(cut, data), _outputs(net, data)) < 1e-6


def test_depthwise_consumers_are_skipped_and_the_next_layer_refitted() -> None:
    torch.manual_seed(8)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    data = _images(64, (3, 8, 8))
    recalibrate_bn(net, data)
    cut = apply_plan(copy.deepcopy(net), Plan("t", 3, (3, 8, 8), keep={"0": [0, 2, 3, 5, 6, 7]}))
    mean_before = cut[7].running_mean.clone()
    report = lsq_refit(net, cut, lambda: data)
    assert report.skipped == {"3": "depthwise"} and report.refitted == ["6"]
    assert not torch.equal(cut[7].running_mean, mean_before)  # the fitted bias went into the BN
    assert report.layers[1].error_after < report.layers[1].error_before


@pytest.mark.parametrize("shape", [(12, 7, 3, 3), (12, 7)])
def test_kept_outputs_are_matched_in_the_weights(shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(9))
    rows, cols = [1, 4, 5, 9, 11], [0, 2, 3, 6]
    assert torch.equal(match_rows(w, w[rows][:, cols]), torch.tensor(rows))
    v = w[rows][:, cols].clone()
    v[2] += 1e-3  # a row that is no original row restricted to the kept inputs
    assert match_rows(w, v) is None


def test_walking_the_graphs_gives_the_same_refit_as_a_forward_per_layer() -> None:
    torch.manual_seed(10)
    net = build("resnet20", 10).eval()
    data = _images(48, (3, 16, 16))
    recalibrate_bn(net, data)
    plan = Plan("resnet20", 10, (3, 16, 16))
    groups = channel_groups(net, data[0][0][:2], "fc")
    for g in groups:
        keep = sorted(torch.randperm(g.width, generator=torch.Generator().manual_seed(len(g.layers)))[:g.width // 2])
        for name in g.layers:
            plan.keep[name] = [int(i) for i in keep]
    walked, forward, tight = (apply_plan(copy.deepcopy(net), plan) for _ in range(3))
    a = lsq_refit(net, walked, lambda: data, holdout=lambda: data[:1], plan=plan, block=False)
    b = lsq_refit(net, forward, lambda: data, holdout=lambda: data[:1], plan=plan, walk=False)
    c = lsq_refit(net, tight, lambda: data, plan=plan, walk_budget=1024)  # activations do not fit: fallback
    assert (a.walked, b.walked, c.walked) == (True, False, False)
    assert len(a.refitted) >= 15 and a.refitted == b.refitted
    for (name, pa), pb in zip(walked.state_dict().items(), forward.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def _sum_error(original: nn.Module, cut: nn.Module, data: list, where: str, kept: list[int]) -> float:
    """Relative error of the residual sum entering `where` (a block's last ReLU), cut against original."""
    seen: dict[str, torch.Tensor] = {}

    def grab(key: str) -> Any:
        return lambda module, args: seen.__setitem__(key, args[0].clone())

    total = ref = 0.0
    for net, key in ((original, "o"), (cut, "c")):
        net.get_submodule(where).register_forward_pre_hook(grab(key))
    with torch.no_grad():
        for x, _ in data:
            original(x), cut(x)
            total += float((seen["o"][:, kept] - seen["c"]).pow(2).sum())
            ref += float(seen["o"][:, kept].pow(2).sum())
    return (total / ref) ** 0.5


def test_block_target_fits_the_residual_sum_better_than_the_layer_target() -> None:
    """Per output channel the block target only adds a shift and a constant scale to the regression target,
    so its solution minimises the sum's error on the fitted rows: with every position used and a tiny ridge,
    the sum's error is lower than with the layer's own output as target (strictly: the skip path carries an
    unrepaired cut)."""
    torch.manual_seed(12)
    net = build("resnet20", 10).eval()
    data = _images(32, (3, 16, 16))
    recalibrate_bn(net, data)
    plan = Plan("resnet20", 10, (3, 16, 16))
    for g in channel_groups(net, data[0][0][:2], "fc"):
        keep = sorted(torch.randperm(g.width, generator=torch.Generator().manual_seed(len(g.layers)))[:g.width // 2])
        for name in g.layers:
            plan.keep[name] = [int(i) for i in keep]
    stream = plan.keep["layer1.1.conv2"]
    errors = {}
    for block in (False, True):
        cut = apply_plan(copy.deepcopy(net), plan)
        rep = lsq_refit(net, cut, lambda: data, plan=plan, positions=None, ridge=1e-9, block=block,
                        layers=["layer1.1.conv2"])  # layer1.0's cut stays unrepaired: the skip input differs
        assert [(r.name, r.target) for r in rep.layers] == [("layer1.1.conv2", "block" if block else "layer")]
        errors[block] = _sum_error(net, cut, data, "layer1.1.relu2", stream)
    assert errors[True] < 0.95 * errors[False]
