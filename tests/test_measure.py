"""Counts checked against published numbers and hand arithmetic; storage of factorized layers; latency sanity on CPU."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torchvision
from torch import nn

from netslim.cost import size
from netslim.cost.size import count_flops, count_params, model_size, plan_size, storage_bytes, stored_params
from netslim.cost.timing import measure_latency
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.factorized import factorize_layers


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
    rows = measure_latency(tiny_vgg(), (3, 16, 16), batch_sizes=(1, 4), threads=1, warmup=1, repeats=3)
    assert [r["batch"] for r in rows] == [1, 4]
    for row in rows:
        assert row["device"] == "cpu" and row["threads"] == 1 and row["dtype"] == "float32"
        assert 0 < row["p10"] <= row["median_ms"] <= row["p90"]
        assert row["throughput"] == pytest.approx(row["batch"] / row["median_ms"] * 1e3)
        assert row["repeats"] == 3
    cut = measure_latency(tiny_vgg(), (3, 16, 16), batch_sizes=(2,), warmup=0, repeats=1000, max_seconds=0.0)
    assert cut[0]["repeats"] == 1


def test_model_size_reports_what_is_stored() -> None:
    model = tiny_vgg()
    got = model_size(model, (3, 16, 16))
    assert got["params"] == count_params(model) == stored_params(model)
    assert (got["flops"], got["macs"]) == tuple(count_flops(model, (3, 16, 16)))
    assert got["bytes"] == storage_bytes(model) == 4 * got["params"] + 4 * 2 * (8 + 16)  # and BN statistics
    (row,) = measure_latency(model, (3, 16, 16), batch_sizes=(1,), repeats=2, warmup=1, threads=1)
    assert row["median_ms"] > 0 and row["repeats"] == 2


def lrs_net() -> tuple[nn.Module, nn.Module]:
    """A small network and a copy with both layers factorized (low rank + sparse)."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    spec = {"0": {"rank": 2, "nnz": 30, "kind": "conv"}, "3": {"rank": 3, "sparsity": 0.9, "kind": "linear"}}
    return net, factorize_layers(copy.deepcopy(net), spec)


def test_storage_of_factorized_layers_agrees_with_their_stored_values() -> None:
    net, small = lrs_net()
    layers = [small[0], small[3]]
    assert stored_params(small) == sum(lay.stored_params() for lay in layers)  # not their dense masked weight
    assert storage_bytes(small) == sum(lay.storage_bytes()["total"] for lay in layers)  # values + CSR indices
    assert storage_bytes(small, bits=8) == sum(lay.storage_bytes(1)["total"] for lay in layers)
    assert storage_bytes(small) < storage_bytes(net) == 4 * stored_params(net)
    assert stored_params(layers[0]) == layers[0].stored_params()  # a layer alone counts itself too
    assert model_size(small, (3, 4, 4))["bytes"] == storage_bytes(small)
    with torch.device("meta"):
        meta = copy.deepcopy(small)
    assert (stored_params(meta), storage_bytes(meta)) == (stored_params(small), storage_bytes(small))


def test_plan_sizes_are_cached_per_template_and_forgotten_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = Plan("custom", 10, input_size=(3, 16, 16))
    alive = len(size._SIZES)  # templates of other tests
    for width in (8, 12, 16):  # templates come and go: a reused id must not return another one's size
        with torch.device("meta"):
            template = nn.Sequential(nn.Conv2d(3, width, 3), nn.ReLU(), nn.Flatten(), nn.Linear(width * 14 * 14, 10))
        assert plan_size(plan, template) == model_size(template, (3, 16, 16))
        assert template in size._SIZES
        del template
        gc.collect()
        assert len(size._SIZES) == alive
    monkeypatch.setattr(size, "PLAN_SIZES_KEPT", 2)
    with torch.device("meta"):
        template = tiny_vgg()
    for n in (4, 5, 6):
        plan_size(Plan("custom", 10, input_size=(3, 16, 16), keep={"0": list(range(n))}), template)
    assert len(size._SIZES[template]) == 2
    assert plan_size(Plan("custom", 10, input_size=(3, 16, 16), keep={"0": list(range(4))}), template)["params"] \
        < plan_size(plan, template)["params"]


def test_a_gpu_device_without_a_gpu_is_a_clear_error() -> None:
    from netslim.workflows.api import pick_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device("auto") == "cpu"
    with pytest.raises(NetslimError, match="no CUDA GPU"):
        pick_device("cuda")
    with pytest.raises(NetslimError, match="no CUDA GPU"):
        measure_latency(nn.Linear(2, 2), (2,), device="cuda")
