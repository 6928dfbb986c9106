"""Counts checked against published numbers and hand arithmetic; latency sanity on CPU."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from netslim.cost.measure import count_flops, count_params, latency, storage_bytes, summary
from netslim.errors import NetslimError


def tiny_vgg() -> nn.Module:
    """3x16x16 -> conv8 -> pool -> conv16 -> pool -> conv16 (grouped) -> linear 10."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


def test_resnet18_params_match_torchvision() -> None:
    model = torchvision.models.resnet18()
    assert count_params(model) == 11_689_512
    assert count_params(model, nonzero=True) == 11_689_512 - 9600 + 4800  # BN biases start at 0; weights 1
    assert storage_bytes(model, buffers=False) == 11_689_512 * 4


def test_vgg_like_macs_by_hand() -> None:
    hand = (
        8 * 16 * 16 * 3 * 3 * 3  # conv1 at 16x16
        + 16 * 8 * 8 * 8 * 3 * 3  # conv2 at 8x8
        + 16 * 4 * 4 * (16 // 4) * 3 * 3  # grouped conv3 at 4x4
        + 256 * 10  # linear
    )
    model = tiny_vgg()
    model.train()
    count = count_flops(model, (3, 16, 16))
    assert count["macs"] == count.macs == hand
    flops, macs = count
    assert flops == 2 * macs
    assert model.training  # counted on a copy, the caller's mode is untouched


def test_flops_on_meta_device_and_factorized_layers() -> None:
    with torch.device("meta"):
        meta = tiny_vgg()
    assert count_flops(meta, (3, 16, 16)) == count_flops(tiny_vgg(), (3, 16, 16))
    # a rank-2 factorization of a 16->32 1x1 conv is two ordinary convs: 16*2 + 2*32 MACs per pixel
    factorized = nn.Sequential(nn.Conv2d(16, 2, 1, bias=False), nn.Conv2d(2, 32, 1))
    assert count_flops(factorized, (16, 5, 5)).macs == 25 * (16 * 2 + 2 * 32)


def test_bad_input_shape_is_a_netslim_error() -> None:
    with pytest.raises(NetslimError, match="input of shape"):
        count_flops(tiny_vgg(), (1, 16, 16))
    with pytest.raises(NetslimError, match="input shape"):
        count_flops(tiny_vgg(), (3, 0, 16))


def test_storage_bytes_dense_and_sparse() -> None:
    layer = nn.Linear(100, 10, bias=False)
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, :10] = 1.0
    assert storage_bytes(layer) == 4000
    assert storage_bytes(layer, bits=8) == 1000
    assert storage_bytes(layer, sparse=True) == (10 * 32 + 1000) // 8
    bn = nn.BatchNorm1d(4)
    assert storage_bytes(bn) == 4 * 4 * 4  # weight, bias, running mean and var; not the int counter
    assert count_params(layer, nonzero=True) == 10


def test_latency_is_positive_and_respects_budget() -> None:
    rows = latency(tiny_vgg(), (3, 16, 16), batch_sizes=(1, 4), threads=1, warmup=1, repeats=3)
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert row["device"] == "cpu" and row["threads"] == 1 and row["dtype"] == "float32"
        assert 0 < row["p10"] <= row["median_ms"] <= row["p90"]
        assert row["throughput"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3)
        assert row["repeats"] == 3
    cut = latency(tiny_vgg(), (3, 16, 16), batch_sizes=(2,), warmup=0, repeats=1000, max_seconds=0.0)
    assert cut[0]["repeats"] == 1


def test_summary_combines_everything() -> None:
    out = summary(tiny_vgg(), (3, 16, 16), latency=True, batch_sizes=(1,), repeats=2, warmup=1, threads=1)
    assert out["params"] == count_params(tiny_vgg())
    assert out["flops"] == 2 * out["macs"] > 0
    assert out["storage_bytes"] > 4 * out["params"] - 1
    assert len(out["latency"]) == 1 and out["latency"][0]["median_ms"] > 0
    assert summary(tiny_vgg(), (3, 16, 16), latency=False)["latency"] == []


def test_a_gpu_device_without_a_gpu_is_a_clear_error() -> None:
    from netslim.cost.measure import measure_latency
    from netslim.workflows.api import resolve_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert resolve_device("auto") == "cpu"
    with pytest.raises(NetslimError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(NetslimError, match="no CUDA GPU"):
        measure_latency(nn.Linear(2, 2), (2,), device="cuda")
