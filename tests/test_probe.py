"""Probe statistics against numpy on explicitly captured activations, and response-point discovery."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from netslim.errors import NetslimError
from netslim.probe import (
    LayerStats,
    all_reduce_stats,
    collect,
    response_modules,
    stats_from_tensors,
    stats_to_tensors,
)

NUM_CLASSES = 4


class SmallNet(nn.Module):
    """conv-BN-ReLU, depthwise conv-BN-ReLU6, conv-BN (no act), hidden Linear-ReLU, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu1 = nn.ReLU(inplace=True)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.relu2 = nn.ReLU6(inplace=True)
        self.conv3 = nn.Conv2d(6, 5, 1)
        self.bn3 = nn.BatchNorm2d(5)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(5, 7)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(7, NUM_CLASSES)
        for bn in (self.bn1, self.bn2, self.bn3):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.dw(x)))
        x = self.bn3(self.conv3(x))
        x = self.pool(x).flatten(1)
        return self.fc2(self.relu3(self.fc1(x)))


# layer -> module whose output is the response, written out by hand as the reference
SMALL_POINTS = {"conv1": "relu1", "dw": "relu2", "conv3": "bn3", "fc1": "relu3"}


def make_batches(sizes: tuple[int, ...] = (16, 16, 7), hw: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 3, hw, hw, generator=gen), torch.randint(0, NUM_CLASSES, (n,), generator=gen)) for n in sizes
    ]


def captured(model: nn.Module, batches: list) -> dict[str, np.ndarray]:
    """Full responses of every layer over all batches, captured with plain hooks (the reference)."""
    store: dict[str, list[np.ndarray]] = {k: [] for k in SMALL_POINTS}
    modules = dict(model.named_modules())
    handles = [
        modules[m].register_forward_hook(lambda _m, _i, out, k=k: store[k].append(out.detach().clone().numpy()))
        for k, m in SMALL_POINTS.items()
    ]
    model.eval()
    with torch.no_grad():
        for x, _ in batches:
            model(x)
    for h in handles:
        h.remove()
    return {k: np.concatenate(v).astype(np.float64) for k, v in store.items()}


def reduce_np(a: np.ndarray, mode: str) -> np.ndarray:
    if a.ndim == 2:
        return a
    if mode == "max":
        return a.max(axis=(2, 3))
    if mode == "mean":
        return a.mean(axis=(2, 3))
    return a.transpose(0, 2, 3, 1).reshape(-1, a.shape[1])


def corr_np(z: np.ndarray) -> np.ndarray:
    """np.corrcoef with the probe's convention for dead channels: 0 off the diagonal, 1 on it."""
    with np.errstate(invalid="ignore", divide="ignore"):
        c = np.corrcoef(z, rowvar=False)
    c = np.nan_to_num(c, nan=0.0)
    np.fill_diagonal(c, 1.0)
    return c


def close(actual: torch.Tensor, expected: np.ndarray, rtol: float = 1e-6) -> None:
    expected = np.asarray(expected, dtype=np.float64)
    atol = 1e-9 * max(float(np.abs(expected).max()), 1e-12)
    np.testing.assert_allclose(actual.numpy(), expected, rtol=rtol, atol=atol)


@pytest.fixture
def model() -> SmallNet:
    return SmallNet()


@pytest.mark.parametrize("mode", ["max", "mean", "spatial"])
def test_moments_match_numpy(model: SmallNet, mode: str) -> None:
    batches = make_batches()
    ref = captured(model, batches)
    stats = collect(model, batches, reduce=mode, per_class=True, num_classes=NUM_CLASSES)
    assert list(stats) == list(SMALL_POINTS)
    labels = torch.cat([y for _, y in batches]).numpy()
    for name, acts in ref.items():
        z = reduce_np(acts, mode)
        s = stats[name]
        assert s.n == z.shape[0]
        close(s.mean, z.mean(axis=0))
        close(s.cov, np.cov(z, rowvar=False))
        close(s.variance, z.var(axis=0, ddof=1))
        close(s.corr, corr_np(z))
        rows = np.repeat(labels, z.shape[0] // len(labels))
        for k in range(NUM_CLASSES):
            zk = z[rows == k]
            assert float(s.class_count[k]) == len(zk)
            close(s.class_mean[k], zk.mean(axis=0))
            close(s.class_cov[k], np.cov(zk, rowvar=False))


def test_without_per_class_and_layer_subset(model: SmallNet) -> None:
    batches = make_batches()
    ref = captured(model, batches)
    stats = collect(model, batches, layers=["dw", "fc1"], reduce="mean")
    assert list(stats) == ["dw", "fc1"]
    assert stats["dw"].class_count is None
    close(stats["dw"].cov, np.cov(reduce_np(ref["dw"], "mean"), rowvar=False))
    with pytest.raises(NetslimError, match="per_class"):
        _ = stats["dw"].class_mean


@pytest.mark.parametrize("mode", ["max", "mean", "spatial"])
def test_channels_last_gives_same_statistics(model: SmallNet, mode: str) -> None:
    batches = make_batches((9, 5))
    plain = collect(model, batches, reduce=mode)
    model.to(memory_format=torch.channels_last)
    last = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    stats = collect(model, last, reduce=mode)
    for name, s in plain.items():
        torch.testing.assert_close(stats[name].outer, s.outer, rtol=1e-5, atol=1e-8)


def test_merge_of_halves_equals_whole(model: SmallNet) -> None:
    batches = make_batches((8, 8, 8, 5))
    whole = collect(model, batches, reduce="spatial", per_class=True, num_classes=NUM_CLASSES)
    first = collect(model, batches[:2], reduce="spatial", per_class=True, num_classes=NUM_CLASSES)
    second = collect(model, batches[2:], reduce="spatial", per_class=True, num_classes=NUM_CLASSES)
    for name, s in whole.items():
        merged = first[name].merge(second[name])
        for a, b in zip(merged.tensors(), s.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(merged.cov, s.cov, rtol=1e-10, atol=1e-12)
    with pytest.raises(NetslimError, match="merge"):
        whole["conv1"].merge(whole["conv3"])


def test_corr_with_dead_channel() -> None:
    z = torch.randn(50, 3, dtype=torch.float64)
    z[:, 1] = 2.0
    s = LayerStats.zeros(3)
    s.count += 50
    s.sum += z.sum(0)
    s.outer += z.T @ z
    corr = s.corr
    assert torch.isfinite(corr).all()
    assert corr[1, 0] == 0 and corr[0, 1] == 0 and corr[1, 2] == 0
    assert torch.all(torch.diagonal(corr) == 1)
    assert s.variance[1] == 0


def test_default_num_classes_and_state_restored(model: SmallNet) -> None:
    model.train()
    before = model.bn1.running_mean.clone()
    stats = collect(model, make_batches(), per_class=True)
    assert stats["conv1"].num_classes == NUM_CLASSES
    assert model.training
    assert torch.equal(model.bn1.running_mean, before)
    assert all(not m._forward_hooks for m in model.modules())


def test_nan_names_the_layer_and_removes_hooks(model: SmallNet) -> None:
    model.bn2.running_var[2] = -1.0  # sqrt of a negative variance: NaN from the depthwise layer on
    with pytest.raises(NetslimError, match="'dw'"):
        collect(model, make_batches())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_negative_infinity_is_caught() -> None:
    # one -Inf pixel: the per-channel max stays finite, so only the extra guard can see it
    model = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(18, 2))
    nn.init.constant_(model[0].weight, 1.0)
    x = torch.randn(4, 1, 3, 3)
    x[1, 0, 2, 2] = -float("inf")
    with pytest.raises(NetslimError, match="'0'"):
        collect(model, [(x, torch.zeros(4, dtype=torch.long))], reduce="max")


def test_bad_inputs(model: SmallNet) -> None:
    with pytest.raises(NetslimError, match="reduce"):
        collect(model, make_batches(), reduce="median")
    with pytest.raises(NetslimError, match="empty"):
        collect(model, [])
    with pytest.raises(NetslimError, match="label"):
        collect(model, make_batches(), per_class=True, num_classes=2)
    with pytest.raises(NetslimError, match="nope"):
        collect(model, make_batches(), layers=["nope"])


def test_tensor_round_trip(model: SmallNet, tmp_path) -> None:
    stats = collect(model, make_batches(), per_class=True, num_classes=NUM_CLASSES)
    path = tmp_path / "stats.safetensors"
    save_file(stats_to_tensors(stats), str(path))
    back = stats_from_tensors(load_file(str(path)))
    assert list(back) == list(stats) or set(back) == set(stats)
    for name, s in stats.items():
        for a, b in zip(s.tensors(), back[name].tensors(), strict=True):
            assert torch.equal(a, b)
    plain = collect(model, make_batches(), layers=["fc1"])
    assert LayerStats.from_tensors(plain["fc1"].to_tensors()).class_count is None


def test_all_reduce_without_process_group_is_noop(model: SmallNet) -> None:
    stats = collect(model, make_batches(), layers=["conv1"])
    before = stats["conv1"].outer.clone()
    assert all_reduce_stats(stats) is stats
    assert stats["conv1"].all_reduce() is stats["conv1"]
    assert torch.equal(stats["conv1"].outer, before)


# ---------------------------------------------------------------- response points


def test_points_small_net(model: SmallNet) -> None:
    points = response_modules(model, torch.randn(1, 3, 6, 6))
    assert {k: p.hook for k, p in points.items()} == SMALL_POINTS
    assert points["conv1"].bn == "bn1" and points["conv1"].act == "relu1"
    assert points["conv3"].bn == "bn3" and points["conv3"].act is None
    assert points["dw"].channels == 6 and points["fc1"].kind == "linear"
    assert "fc2" not in points
    only = response_modules(model, torch.randn(1, 3, 6, 6), layers=["fc2", "conv3"])
    assert list(only) == ["conv3", "fc2"]
    renamed = response_modules(model, torch.randn(1, 3, 6, 6), classifier="fc1")
    assert "fc1" not in renamed and "fc2" in renamed


class Block(nn.Module):
    """ResNet basic block as torchvision writes it: one ReLU reused, in-place residual add."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride > 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = Block(4, 4, 1)
        self.layer2 = Block(4, 8, 2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_points_resnet_block() -> None:
    model = TinyResNet()
    points = response_modules(model, torch.randn(1, 3, 8, 8))
    assert list(points) == [
        "stem.0",
        "layer1.conv1",
        "layer1.conv2",
        "layer2.conv1",
        "layer2.conv2",
        "layer2.downsample.0",
    ]
    assert points["stem.0"].hook == "stem.2"
    # the shared ReLU fires twice: hook the BN and replay the ReLU on a copy
    p = points["layer1.conv1"]
    assert (p.bn, p.act, p.hook) == ("layer1.bn1", "layer1.relu", "layer1.bn1")
    assert isinstance(p.post, nn.ReLU) and not p.post.inplace
    # residual add between BN and ReLU: the response stops at the BN
    assert (points["layer1.conv2"].hook, points["layer1.conv2"].act) == ("layer1.bn2", None)
    assert points["layer2.downsample.0"].bn == "layer2.downsample.1"

    # statistics at the replayed ReLU equal those of relu(bn1(conv1(x)))
    x = torch.randn(20, 3, 8, 8)
    stats = collect(model, [(x, torch.zeros(20, dtype=torch.long))], layers=["layer1.conv1"], reduce="mean")
    model.eval()
    with torch.no_grad():
        h = model.stem(x)
        ref = torch.relu(model.layer1.bn1(model.layer1.conv1(h))).mean(dim=(2, 3), dtype=torch.float64).numpy()
    close(stats["layer1.conv1"].cov, np.cov(ref, rowvar=False))


def test_points_mobilenet_v2() -> None:
    model = torchvision.models.mobilenet_v2(num_classes=10)
    points = response_modules(model, torch.randn(1, 3, 32, 32))
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert list(points) == convs  # every conv, depthwise included; the classifier Linear left out
    assert (points["features.0.0"].bn, points["features.0.0"].hook) == ("features.0.1", "features.0.2")
    dw = points["features.2.conv.1.0"]
    assert model.get_submodule(dw.layer).groups == dw.channels == 96
    assert dw.hook == "features.2.conv.1.2"
    project = points["features.2.conv.2"]
    assert (project.bn, project.act, project.hook) == ("features.2.conv.3", None, "features.2.conv.3")
    assert points["features.18.0"].hook == "features.18.2"
    assert "classifier.1" not in points


def test_called_twice_layer_rejected_when_named() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(self.conv(x)).mean(dim=(2, 3)))

    model = Twice()
    assert response_modules(model, torch.randn(1, 3, 4, 4)) == {}
    with pytest.raises(NetslimError, match="more than once"):
        response_modules(model, torch.randn(1, 3, 4, 4), layers=["conv"])
