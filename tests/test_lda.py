"""Deep LDA pruning: Fisher ranking on synthetic features, the backward trace against hand computations,
downstream channel removal, keep composition, and the whole loop on the digits data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netslim.cost.targets import Target
from netslim.data import batches, load_dataset
from netslim.errors import NetslimError
from netslim.methods.lda.core import (
    ClassMoments,
    choose_mprime,
    fisher_scores,
    mprime_curve,
    predecision_moments,
    ranking,
)
from netslim.methods.lda.step import compose, threshold_keep
from netslim.methods.lda.trace import trace
from netslim.plan import Plan
from netslim.probe import LayerStats
from netslim.surgery.apply import apply_plan

INFORMATIVE = [2, 7, 13]


def synthetic(n_per_class: int = 200, classes: int = 3, width: int = 20, seed: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-decision features where only INFORMATIVE carry the label; the others are class-blind noise of
    very different scales, plus one constant neuron (5) and one exact copy of an informative one (19 = 7)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    scale = torch.logspace(-1, 1, width)
    x = torch.randn(len(y), width, generator=g) * scale
    for j, shift in zip(INFORMATIVE, (2.0, 1.5, 3.0), strict=True):
        x[:, j] = torch.randn(len(y), generator=g) + shift * y.float()
    x[:, 5] = 4.0
    x[:, 19] = x[:, 7]
    return x, y


def moments_of(x: torch.Tensor, y: torch.Tensor, classes: int = 3, full: bool = False) -> ClassMoments:
    m = ClassMoments.zeros(classes, x.shape[1], full)
    for s in range(0, len(y), 64):  # streamed in batches
        m.add(x[s:s + 64], y[s:s + 64])
    return m


@pytest.mark.parametrize("mode", ["diag", "eig"])
def test_informative_neurons_rank_first(mode: str) -> None:
    x, y = synthetic()
    scores = fisher_scores(moments_of(x, y, full=mode == "eig"), mode)
    assert set(ranking(scores)[:3].tolist()) == set(INFORMATIVE)
    assert scores[5] == 0 and scores[19] == 0  # constant and duplicate neurons are dropped
    others = [j for j in range(20) if j not in INFORMATIVE]
    assert float(scores[INFORMATIVE].min()) > 10 * float(scores[others].max())


def test_diag_score_is_between_over_within_variance() -> None:
    x, y = synthetic()
    scores = fisher_scores(moments_of(x, y), "diag")
    mu = x.double().mean(0)
    between = sum((y == k).sum() * (x[y == k].double().mean(0) - mu) ** 2 for k in range(3))
    within = sum(((x[y == k].double() - x[y == k].double().mean(0)) ** 2).sum(0) for k in range(3))
    for j in INFORMATIVE + [0, 11]:
        assert float(scores[j]) == pytest.approx(float(between[j] / within[j]), rel=1e-9)


def test_eig_equals_diag_when_scatters_are_diagonal() -> None:
    # two classes whose means differ along neuron 0 only, diagonal within-class covariance (1, 2, 3, 4)
    n, mu1, cov = 50.0, torch.tensor([2.0, 0, 0, 0], dtype=torch.float64), torch.diag(torch.arange(1.0, 5.0)).double()
    m = ClassMoments.zeros(2, 4, full=True)
    m.count[:] = n
    m.sum[1] = n * mu1
    m.outer[0] = n * cov
    m.outer[1] = n * (cov + torch.outer(mu1, mu1))
    m.sq[:] = torch.diagonal(m.outer, dim1=1, dim2=2)
    diag, eig = fisher_scores(m, "diag"), fisher_scores(m, "eig")
    assert float(diag[0]) == pytest.approx(1.0)  # between: 2n·(2/2)² = within: 2n·1
    torch.testing.assert_close(eig, diag, rtol=1e-5, atol=1e-9)


def test_layer_stats_and_model_stream_agree() -> None:
    x, y = synthetic()
    st = LayerStats.zeros(20, 3)
    xd = x.double()
    st.count += len(y)
    st.sum += xd.sum(0)
    st.outer += xd.T @ xd
    for k in range(3):
        xk = xd[y == k]
        st.class_count[k] += len(xk)
        st.class_sum[k] += xk.sum(0)
        st.class_outer[k] += xk.T @ xk
    net = nn.Sequential(nn.Identity(), nn.Linear(20, 3))  # classifier input = the features themselves
    streamed = predecision_moments(net, [(x[s:s + 50], y[s:s + 50]) for s in range(0, 600, 50)], "1", 3)
    torch.testing.assert_close(fisher_scores(st), fisher_scores(streamed))


def test_mprime_is_the_informative_count() -> None:
    x, y = synthetic()
    m = moments_of(x, y)
    order = ranking(fisher_scores(m))
    head = nn.Linear(20, 3)
    with torch.no_grad():  # a classifier reading only the informative neurons (x_j ≈ shift·y)
        head.weight.zero_()
        head.weight[:, INFORMATIVE] = torch.arange(3.0)[:, None] * torch.tensor([2.0, 1.5, 3.0])
        head.bias.copy_(-0.5 * torch.arange(3.0) ** 2 * (4 + 2.25 + 9))
    curve = mprime_curve(order, x, y, head.weight, head.bias, m.mean)
    full = float((head(x).argmax(1) == y).double().mean())
    assert float(curve[-1]) == pytest.approx(full)
    assert full > 0.9 and float(curve[0]) < full
    assert choose_mprime(curve, 0.0, int((fisher_scores(m) > 0).sum())) <= 3


# ---------------------------------------------------------------- backward trace
class HandNet(nn.Module):
    """1x1 conv (w=2, b=0.5) -> ReLU -> 2x2 max-pool -> Linear(1, 2) -> ReLU -> classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(1, 2)
        self.relu2 = nn.ReLU()
        self.classifier = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv.weight.fill_(2.0)
            self.conv.bias.fill_(0.5)
            self.fc1.weight.copy_(torch.tensor([[1.0], [-1.0]]))
            self.fc1.bias.copy_(torch.tensor([0.0, 10.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu1(self.conv(x))).flatten(1)
        return self.classifier(self.relu2(self.fc1(x)))


def test_trace_matches_numbers_worked_out_by_hand() -> None:
    # conv: [[2.5, 6.5], [-3.5, 1.5]] -> ReLU -> max-pool picks 6.5 at (0, 1) -> fc1: [6.5, -6.5 + 10 = 3.5]
    x = torch.tensor([[[[1.0, 3.0], [-2.0, 0.5]]]])
    net = HandNet().eval()
    both = trace(net, [x], torch.tensor([1.0, 1.0]), "classifier")
    assert both["fc1"].tolist() == pytest.approx([6.5, 3.5])  # seed = the responses themselves
    assert both["conv"].tolist() == pytest.approx([3.0])  # Wᵀ: 6.5 - 3.5, unpooled to (0, 1)
    second = trace(net, [x], torch.tensor([0.0, 1.0]), "classifier")
    assert second["fc1"].tolist() == pytest.approx([0.0, 3.5])
    assert second["conv"].tolist() == pytest.approx([0.0])  # Wᵀ gives -3.5: the ReLU rule clamps it to 0


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16, 5)
        self.relu3 = nn.ReLU()
        self.classifier = nn.Linear(5, 3)
        for bn in (self.bn1, self.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x)))).flatten(1)
        return self.classifier(self.relu3(self.fc1(x)))


def hand_trace(net: TinyConvNet, x: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The deconvnet rule written out with explicit ops: Wᵀ, clamp, unpool at argmax, conv_transpose, BN scale."""
    with torch.no_grad():
        a1 = net.relu1(net.bn1(net.conv1(x)))
        p1, i1 = F.max_pool2d(a1, 2, return_indices=True)
        a2 = net.relu2(net.bn2(net.conv2(p1)))
        p2, i2 = F.max_pool2d(a2, 2, return_indices=True)
        z = net.relu3(net.fc1(p2.flatten(1)))
        s = z * mask  # signal at the fc1 response
        util = {"fc1": s.clamp_min(0)}
        s = s.clamp_min(0) @ net.fc1.weight  # ReLU rule, then Wᵀ
        s = F.max_unpool2d(s.view_as(p2), i2, 2, output_size=a2.shape[2:])  # signal at the conv2 response
        util["conv2"] = s.clamp_min(0).amax((2, 3))
        bn = net.bn2
        s = s.clamp_min(0) * (bn.weight / (bn.running_var + bn.eps).sqrt()).view(1, -1, 1, 1)
        s = F.conv_transpose2d(s, net.conv2.weight, padding=1)  # same weights, no bias
        s = F.max_unpool2d(s, i1, 2, output_size=a1.shape[2:])  # signal at the conv1 response
        util["conv1"] = s.clamp_min(0).amax((2, 3))
    return {k: v.double().mean(0) for k, v in util.items()}


def test_trace_matches_hand_computed_trace_on_a_tiny_conv_net() -> None:
    net = TinyConvNet().eval()
    x = torch.randn(12, 2, 8, 8)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    want = hand_trace(net, x, mask)
    got = trace(net, [x[:5], x[5:]], mask, "classifier")  # two batches: averaged over all 12 images
    assert set(got) == {"conv1", "conv2", "fc1"}
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)
    assert float(got["fc1"][1]) == 0.0 and float(got["fc1"][4]) == 0.0  # unselected neurons carry no utility
    assert float(got["conv1"].min()) > 0.0
    before = copy.deepcopy(net.state_dict())
    for k, v in net.state_dict().items():  # the model itself is untouched (the trace works on a copy)
        torch.testing.assert_close(v, before[k])


def test_threshold_is_eta_times_std_of_nonzero_utilities() -> None:
    u = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0, 0.0])
    std = float(torch.tensor([1.0, 2.0, 3.0, 10.0]).std())
    assert threshold_keep(u, 0.1, 1) == [1, 2, 3, 4]  # zero utilities go
    assert threshold_keep(u, 1.5 / std + 1e-9, 1) == [2, 3, 4]
    assert threshold_keep(u, 100.0, 2) == [3, 4]  # nothing passes: the min_keep best stay
    assert threshold_keep(u, 0.0, 1) == list(range(6))


def test_threshold_from_the_smallest_utility_cuts_a_group_that_sits_far_above_zero() -> None:
    """GELU-like utilities, all 10 std above zero: measured from zero, η = 1 keeps them all; measured from the
    smallest, the same η keeps those more than one std above it."""
    u = torch.tensor([10.0, 10.5, 11.0, 11.5, 12.0])
    std = float(u.std())
    assert threshold_keep(u, 1.0, 1) == list(range(5))
    assert threshold_keep(u, 1.0, 1, "min") == [i for i in range(5) if float(u[i]) >= 10.0 + std]
    assert threshold_keep(u, 0.5 / std, 1, "min") == [1, 2, 3, 4]


# ---------------------------------------------------------------- surgery and keep composition
class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


def test_removing_a_filter_removes_the_matching_input_channel_downstream() -> None:
    base = Chain().eval()
    keep0, keep3 = [0, 2, 3, 6, 7], [1, 2, 4, 5]
    plan = Plan(arch="chain", num_classes=4, input_size=(3, 8, 8), keep={"features.0": keep0, "features.3": keep3})
    small = apply_plan(copy.deepcopy(base), plan)
    conv0, bn, conv3, head = small.features[0], small.features[1], small.features[3], small.classifier
    assert conv0.out_channels == 5 and bn.num_features == 5 and conv3.in_channels == 5 and head.in_features == 4
    torch.testing.assert_close(conv0.weight, base.features[0].weight[keep0])
    torch.testing.assert_close(bn.running_var, base.features[1].running_var[keep0])
    torch.testing.assert_close(conv3.weight, base.features[3].weight[keep3][:, keep0])
    torch.testing.assert_close(head.weight, base.classifier.weight[:, keep3])
    # the pruned net computes what the base computes with the removed filters' outputs zeroed
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        mask = torch.zeros(8)
        mask[keep0] = 1
        h = base.features[:3](x) * mask.view(1, -1, 1, 1)
        ref = head(base.avgpool(base.features[3:](h)).flatten(1)[:, keep3])
        torch.testing.assert_close(small(x), ref, rtol=1e-4, atol=1e-5)


def test_bias_correction_keeps_mean_logits_and_replaces_dropped_neurons_by_their_mean() -> None:
    from netslim.data import ImageSet
    from netslim.methods.lda.core import predecision_features
    from netslim.methods.lda.step import match_mean_logits, mean_logits

    base = Chain().eval()
    g = torch.Generator().manual_seed(0)
    data = ImageSet(torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g), torch.zeros(40).long(),
                    ["a"], (0.5,) * 3, (0.25,) * 3)
    feats, _ = predecision_features(base, batches(data, 16), "classifier")
    mean = feats.double().mean(0)
    target = mean_logits(base, "classifier", mean)
    keep = [1, 2, 4]  # a cut of the pre-decision layer alone: the kept neurons do not change
    top = apply_plan(copy.deepcopy(base), Plan(arch="chain", num_classes=4, input_size=(3, 8, 8),
                                               keep={"features.3": keep}))
    assert match_mean_logits(top, "classifier", target, data, "cpu", 16)
    dropped = [0, 3, 5]
    want = base.classifier.bias.double() + base.classifier.weight.double()[:, dropped] @ mean[dropped]
    torch.testing.assert_close(top.classifier.bias.double(), want.detach(), rtol=1e-5, atol=1e-5)
    deep = apply_plan(copy.deepcopy(base), Plan(arch="chain", num_classes=4, input_size=(3, 8, 8),
                                                keep={"features.0": [0, 1, 5], "features.3": keep}))
    assert match_mean_logits(deep, "classifier", target, data, "cpu", 16)
    new_feats, _ = predecision_features(deep, batches(data, 16), "classifier")
    with torch.no_grad():
        torch.testing.assert_close(deep.classifier(new_feats).double().mean(0), target, rtol=1e-5, atol=1e-5)


def test_composed_keeps_reproduce_two_successive_cuts() -> None:
    base = Chain().eval()
    widths = {"features.0": 8, "features.3": 6}
    step1 = {"features.0": [0, 1, 3, 5, 6, 7], "features.3": [0, 2, 3, 5]}
    step2 = {"features.0": [1, 2, 5], "features.3": [0, 3]}
    p = Plan(arch="chain", num_classes=4, input_size=(3, 8, 8))
    twice = apply_plan(apply_plan(copy.deepcopy(base), Plan(**{**p.__dict__, "keep": step1})),
                       Plan(**{**p.__dict__, "keep": step2}))
    composed = compose(compose({}, step1, widths), step2, widths)
    assert composed == {"features.0": [1, 3, 7], "features.3": [0, 5]}
    once = apply_plan(copy.deepcopy(base), Plan(**{**p.__dict__, "keep": composed}))
    for (k, a), (_, b) in zip(twice.state_dict().items(), once.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=k)


# ---------------------------------------------------------------- the whole loop
FAST = {"ft_epochs": 0, "trace_images": 4, "verbose": False}


@pytest.fixture(scope="module")
def digits_net() -> tuple[nn.Module, object, object]:
    from netslim.train import Schedule, finetune
    from netslim.zoo import build

    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    net = build("small_cnn", num_classes=10, in_channels=1)
    finetune(net, train, Schedule(epochs=2, lr=0.1, batch_size=64), "cpu")
    return net.eval(), train, test


def test_loop_prunes_fine_tunes_and_hands_over_its_network(digits_net: tuple, tmp_path: Path) -> None:
    from netslim.surgery.checkpoint import load_model
    from netslim.workflows.compress import compress

    net, train, test = digits_net
    opts = {"max_iters": 2, "eta_start": 0.4, "eta_step": 0.4, "ft_epochs": 1, "ft_lr": 0.02, "ft_batch": 64,
            "ft_images": 400, "trace_images": 4, "max_drop": 0.3, "verbose": False}
    res = compress(copy.deepcopy(net), "small_cnn", train, test, method="lda", options=opts, calib_size=400,
                   out=tmp_path / "run", measure_latency=False)
    meta = res.plan.meta
    iters = meta["iterations"]
    assert iters[0]["index"] == 0 and len(iters) >= 2
    pruned = [r for r in iters[1:] if r["removed"] > 0]
    assert pruned and all(r["val"] is not None and r["val_cut"] is not None for r in pruned)
    params = [r["params"] for r in iters]
    assert params == sorted(params, reverse=True) and params[-1] < params[0]
    assert res.plan.keep and res.metrics["after"]["params"] < res.metrics["before"]["params"]
    chosen = next(r for r in iters if r["index"] == meta["selected_iteration"])
    assert chosen["params"] == res.metrics["after"]["params"] and chosen["val"] >= meta["floor"]
    assert meta["finetune_rounds"] == len([r for r in pruned if r["index"] <= chosen["index"]])
    # the saved run reloads: the handed-over network has exactly the Plan's shape (keeps composed)
    loaded, _ = load_model(tmp_path / "run")
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), res.model.cpu().eval()(x), rtol=1e-4, atol=1e-4)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Deep LDA iterations" in report and (tmp_path / "run" / "lda_iterations.png").is_file()


def test_loop_meets_a_parameter_target(digits_net: tuple) -> None:
    from netslim.workflows.analyse import analyse_to_dir

    net, train, _ = digits_net
    m = analyse_to_dir(copy.deepcopy(net), "small_cnn", train, method="lda", target=Target("params", 0.3),
                       options={**FAST, "max_iters": 2, "eta_start": 0.2}, device="cpu", calib_size=400,
                       classes=None, out=None)
    kept = m["planned"]["params"] / m["base"]["params"]
    assert 0.2 < kept <= 0.3  # η bisected on the step that crosses the target, not overshot


def test_a_two_class_task_keeps_fewer_neurons_and_parameters(digits_net: tuple) -> None:
    from netslim.workflows.analyse import analyse_to_dir

    net, train, _ = digits_net
    opts = {**FAST, "max_iters": 1, "max_drop": 1.0}
    ten = analyse_to_dir(copy.deepcopy(net), "small_cnn", train, method="lda", target=None, options=opts, device="cpu",
                         calib_size=400, classes=None, out=None)
    two_train = load_dataset("digits", "train", classes=["0", "1"])
    two = analyse_to_dir(copy.deepcopy(net), "small_cnn", two_train, method="lda", target=None, options=opts,
                         device="cpu", calib_size=400, classes=[0, 1], out=None)
    assert two["planned"]["params"] < ten["planned"]["params"]


def test_cli_min_accuracy_reaches_the_method(digits_net: tuple, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from netslim.cli.commands import app
    from netslim.surgery.checkpoint import save_model

    net, _, _ = digits_net
    weights = tmp_path / "base.safetensors"
    save_model(weights, net, Plan(arch="small_cnn", num_classes=10, input_size=(1, 16, 16)))
    res = CliRunner().invoke(app, ["compress", "--weights", str(weights), "--data", "digits", "--method", "lda",
                                   "--opt", "min_accuracy=0.5", "--opt", "max_iters=1", "--opt", "ft_epochs=0",
                                   "--opt", "verbose=false", "--calib-size", "300", "--no-latency",
                                   "--out", str(tmp_path / "run"), "--json"])
    assert res.exit_code == 0, res.stderr
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["method"] == "lda" and plan["meta"]["floor"] == 0.5 and plan["keep"]


def test_bad_inputs_are_clear_errors(digits_net: tuple) -> None:
    from netslim.workflows.stages import analyse

    net, train, _ = digits_net
    for opts, message in (({"min_accuracy": 1.5}, "min_accuracy"), ({"fisher": "full"}, "fisher"),
                          ({"min_accuracy": 1.0}, "already below"), ({"select": "any"}, "select"),
                          ({"patience": -1}, "patience")):
        with pytest.raises(NetslimError, match=message):
            analyse(copy.deepcopy(net), "small_cnn", train, "lda", None, {**FAST, **opts}, "cpu", 200)


def test_residual_groups_combine_member_utilities_by_max() -> None:
    from netslim.data import ImageSet
    from netslim.methods.base import Context
    from netslim.methods.lda.loop import LoopOptions, validation_pass
    from netslim.methods.lda.step import analyse_model, plan_at
    from netslim.zoo import build

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=g)
    data = ImageSet(images, torch.arange(3).repeat(20), ["a", "b", "c"], (0.5,) * 3, (0.25,) * 3)
    net = build("resnet20", num_classes=3).eval()
    ctx = Context(model=net, arch="resnet20", num_classes=3, input_size=(3, 16, 16), calib=data, train=data,
                  val=data, options={})
    o = LoopOptions(trace_images=5, verbose=False)
    a = analyse_model(ctx, o, validation_pass(net, data, ctx.classifier, "cpu", 64)[1])
    stream = next(grp for grp in ctx.groups() if "layer3.0.conv2" in grp.layers)  # stage 3: adds tie 10 layers
    assert len(stream.layers) > 2 and stream.root in a.utility
    assert a.smooth == set()  # every unit behind a ReLU: auto measures η·std from zero, as the paper does
    from netslim.methods.lda.core import ranking
    from netslim.methods.lda.trace import trace

    mask = torch.zeros(64)
    mask[ranking(a.scores)[:a.mprime]] = 1.0
    images = [x for x, _ in batches(data.subset(list(range(15))), 64)]  # = trace_set(data, 5)
    per_layer = trace(net, images, mask, ctx.classifier)
    want = torch.stack([per_layer[n] for n in stream.layers]).amax(0)
    torch.testing.assert_close(a.utility[stream.root], want)
    small = apply_plan(copy.deepcopy(net), plan_at(ctx, a, 0.5, o))
    assert small(torch.randn(2, 3, 16, 16)).shape == (2, 3)


def test_a_fine_tuning_round_that_hurts_is_undone(digits_net: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    import netslim.methods.lda.loop as loop
    from netslim.workflows.stages import analyse

    def ruin(model: nn.Module, *_args, **_kw) -> list[dict]:
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()  # a round that destroys the network: validation falls to chance
        return []

    monkeypatch.setattr(loop, "finetune_round", ruin)
    net, train, _ = digits_net
    opts = {**FAST, "max_iters": 1, "eta_start": 0.2, "max_drop": 0.5}
    result, _, _ = analyse(copy.deepcopy(net), "small_cnn", train, "lda", None, opts, "cpu", 400)
    it = result.plan.meta["iterations"][1]
    assert it["val"] == it["val_cut"] > 0.5  # the repaired cut was kept, not the ruined network
    assert any(float(p.detach().abs().sum()) > 0 for p in result.model.parameters())
    undone = analyse(copy.deepcopy(net), "small_cnn", train, "lda", None, {**opts, "keep_unless_better": False},
                     "cpu", 400)[0].plan.meta["iterations"]
    assert len(undone) == 2 and undone[1]["val"] < 0.2


def test_given_validation_images_decide_and_the_training_split_stays_whole(digits_net: tuple) -> None:
    """--val-from test: a model trained on its whole training split is judged on images it has not seen,
    and nothing is held out of the training images (fine-tuning and calibration see all of them)."""
    from netslim.data import split_holdout
    from netslim.workflows.stages import accuracy, analyse

    net, train, test = digits_net
    val, _ = split_holdout(test, 0.5, seed=0)
    opts = {"max_iters": 1, "eta_start": 0.4, "ft_epochs": 0, "trace_images": 4, "max_drop": 0.3, "verbose": False}
    result, ctx, _ = analyse(copy.deepcopy(net), "small_cnn", train, "lda", None, opts, "cpu", 200, val=val)
    plan = result.plan
    assert ctx.val is val and len(ctx.train) == len(train)
    assert plan.meta["iterations"][0]["val"] == pytest.approx(accuracy(net, val, "cpu"))
    held, _ = split_holdout(train, 0.1, seed=0)
    _, ctx_default, _ = analyse(copy.deepcopy(net), "small_cnn", train, "lda", None, opts, "cpu", 200)
    assert len(ctx_default.train) == len(held) < len(train)


def test_rounds_distil_from_the_unpruned_network(digits_net: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """ft_distill > 0: every round gets the unpruned network as its teacher, with the loop's weight."""
    import netslim.methods.lda.loop as loop
    from netslim.workflows.stages import analyse

    seen: list[tuple] = []
    real = loop.finetune_round

    def spy(model: nn.Module, train, o, r, device, teacher=None) -> list[dict]:
        seen.append((teacher, o.ft_distill, o.ft_temperature))
        return real(model, train, o, r, device, teacher=teacher)

    monkeypatch.setattr(loop, "finetune_round", spy)
    net, train, _ = digits_net
    opts = {**FAST, "max_iters": 1, "eta_start": 0.2, "max_drop": 0.5, "ft_epochs": 1, "ft_distill": 0.6}
    plan = analyse(copy.deepcopy(net), "small_cnn", train, "lda", None, opts, "cpu", 400)[0].plan
    (teacher, weight, temperature), = seen
    assert weight == 0.6 and temperature == 4.0 and plan.meta["options"]["ft_distill"] == 0.6
    from netslim.data import batches

    x = next(iter(batches(train, 64)))[0]
    with torch.no_grad():  # the teacher is the unpruned network (same widths and outputs), not the cut one
        assert sum(p.numel() for p in teacher.parameters()) == sum(p.numel() for p in net.parameters())
        assert torch.allclose(teacher.eval()(x), net.eval()(x))
