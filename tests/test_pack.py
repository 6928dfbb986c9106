"""Storage compression: Huffman round trips, k-means sharing, pack -> unpack exact up to quantization."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from netslim.errors import NetslimError
from netslim.pack import (
    apply_masks,
    kmeans_1d,
    load_packed,
    magnitude_masks,
    mask_hook,
    pack_bytes,
    quantize_layer,
    quantize_model,
    unpack_bytes,
)
from netslim.pack.huffman import decode, encode
from netslim.plan import Plan
from netslim.zoo import build

LAYERS = ["features.0", "features.4", "features.8", "classifier"]


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (1023, 9), (1024, 9), (1025, 9), (5000, 257)])
def test_huffman_round_trip(n: int, k: int) -> None:
    rng = np.random.default_rng(n)
    x = np.minimum(rng.geometric(0.1, n) - 1, k - 1)
    enc = encode(x, k)
    assert np.array_equal(decode(enc), x)
    if n > 1000:  # a skewed source codes well below log2(k) bits
        assert enc.nbits / n < np.log2(k)


def test_huffman_length_limit_and_corruption() -> None:
    x = np.concatenate([np.zeros(1 << 18, np.int64)] + [np.full(2**i, i + 1) for i in range(18)])
    enc = encode(x)
    assert enc.lengths.max() <= 16 and np.array_equal(decode(enc), x)
    bad = copy.copy(enc)
    bad.offsets = enc.offsets[:-1]
    with pytest.raises(NetslimError):
        decode(bad)


def test_kmeans_sharing() -> None:
    v = torch.tensor([0.5, -0.25, 0.5, 1.0, -0.25])
    book, idx = kmeans_1d(v, 8)  # fewer distinct values than shared values: exact
    assert torch.equal(book.float()[idx], v)
    w = torch.randn(4000, generator=torch.Generator().manual_seed(0))
    book, idx = kmeans_1d(w, 16)
    assert book.numel() <= 16 and book.dtype == torch.float16 and torch.all(book[1:] > book[:-1])
    q = book.double()[idx]
    nearest = (w.double()[:, None] - book.double()[None]).abs().argmin(1)
    assert torch.equal(idx, nearest)  # every weight takes its nearest shared value
    grid = torch.linspace(float(w.min()), float(w.max()), 16, dtype=torch.float64)
    uniform = grid[(w.double()[:, None] - grid[None]).abs().argmin(1)]
    assert ((q - w.double()) ** 2).mean() < 0.5 * ((uniform - w.double()) ** 2).mean()  # k-means beats a grid


@pytest.fixture
def quantized() -> tuple[nn.Module, nn.Module, dict]:
    torch.manual_seed(0)
    model = build("small_cnn", num_classes=10, in_channels=1).eval()
    original = copy.deepcopy(model)
    masks = magnitude_masks(model, {"features.0": 0.0, "features.4": 0.5, "features.8": 0.95, "classifier": 0.5})
    apply_masks(model, masks)
    bits = {"features.0": 8, "features.4": 8, "features.8": 4, "classifier": 5}
    books = quantize_model(model, bits)
    return original, model, {n: (books[n][0], bits[n]) for n in LAYERS}


def test_pack_unpack_round_trip_exact_up_to_quantization(quantized, tmp_path) -> None:
    original, model, books = quantized
    plan = Plan(arch="small_cnn", num_classes=10, input_size=(1, 16, 16))
    blob, reports, raw = pack_bytes(model, plan, books)
    state, plan2 = unpack_bytes(blob)
    assert plan2 == plan
    ref = model.state_dict()
    assert set(state) == set(ref) and all(torch.equal(state[k], ref[k]) for k in ref)
    modes = {r.key: r.mode for r in reports}
    assert modes["features.8.weight"] == "sparse" and modes["features.0.weight"] == "dense"
    for name in LAYERS:
        w0, wq = original.get_submodule(name).weight.detach(), state[f"{name}.weight"]
        kept = wq != 0
        book = books[name][0].float()
        gap = (book[1:] - book[:-1]).max() if book.numel() > 1 else torch.tensor(0.0)
        assert ((wq - w0).abs()[kept] <= gap / 2 + 1e-3 * w0.abs().max()).all()  # up to the quantization
        assert torch.equal(wq[kept].unique().sort().values, book[torch.isin(book, wq[kept])])
    r8 = next(r for r in reports if r.key == "features.8.weight")
    assert r8.total < r8.dense_fp32 / 10 and r8.nonzero == round(0.05 * r8.weights)
    path = tmp_path / "m.packed.safetensors"
    path.write_bytes(blob)
    decoded, _ = load_packed(path)
    x = torch.randn(32, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(decoded(x), model(x))


def test_packing_refuses_unquantized_and_corrupt(quantized, tmp_path) -> None:
    original, model, books = quantized
    plan = Plan(arch="small_cnn", num_classes=10, input_size=(1, 16, 16))
    with pytest.raises(NetslimError, match="quantize"):
        pack_bytes(original, plan, books)
    blob, _, _ = pack_bytes(model, plan, books)
    with pytest.raises(NetslimError):
        unpack_bytes(blob[: len(blob) // 2])
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a file at all")
    with pytest.raises(NetslimError):
        load_packed(bad)
    with pytest.raises(NetslimError):
        load_packed(tmp_path / "missing.safetensors")


def test_quantize_layer_keeps_zeros() -> None:
    w = torch.randn(16, 8, 3, 3)
    w[w.abs() < 0.5] = 0
    book, idx, q = quantize_layer(w, 3)
    assert torch.equal(q == 0, w == 0) and book.numel() <= 8 and idx.numel() == int((w != 0).sum())
    with pytest.raises(NetslimError):
        quantize_layer(w, 0)


def test_mask_fixed_during_finetuning_and_pack_run_dir(tmp_path) -> None:
    from netslim.data import calibration_subset, load_dataset
    from netslim.surgery.checkpoint import save_model
    from netslim.train import Schedule, finetune
    from netslim.workflows.pack import PACKED_NAME, PackConfig, pack_run_dir

    torch.manual_seed(0)
    train = calibration_subset(load_dataset("digits", "train"), 400, seed=0)
    test = calibration_subset(load_dataset("digits", "test"), 120, seed=0)
    model = build("small_cnn", num_classes=10, in_channels=1)
    finetune(model, train, Schedule(epochs=2, lr=0.05, batch_size=64), "cpu")
    masks = magnitude_masks(model, {"features.4": 0.7})
    apply_masks(model, masks)
    finetune(model, train, Schedule(epochs=1, lr=0.05, batch_size=64), "cpu", mask_hook=mask_hook(masks))
    assert torch.equal(model.features[4].weight == 0, masks["features.4"] == 0)

    run = tmp_path / "run"
    plan = Plan(arch="small_cnn", num_classes=10, input_size=(1, 16, 16))
    save_model(run / "model.safetensors", model.eval(), plan)
    cfg = PackConfig(sparsity=0.6, fc_sparsity=0.5, layer_sparsity={"features.0": 0.2},
                     finetune=Schedule(epochs=1, lr=0.005, batch_size=64))
    metrics = pack_run_dir(run, train, test, cfg, tmp_path / "packed")
    out = tmp_path / "packed"
    assert {p.name for p in out.iterdir()} == {PACKED_NAME, "pack.json", "report.md", "bytes.png"}
    assert json.loads((out / "pack.json").read_text())["verify"]["identical_predictions"] == len(test)
    assert metrics["accuracy"]["unpacked"] == metrics["accuracy"]["quantized"]
    assert metrics["bytes"]["packed_layers"] < metrics["bytes"]["packed_layers_dense_fp32"] / 4
    assert metrics["sparsity"]["features.0"] == 0.2 and metrics["bits"]["classifier"] == 5
    report = (out / "report.md").read_text()
    assert "## Per layer" in report and f"identical predictions on {len(test)} of {len(test)}" in report
    decoded, _ = load_packed(out / PACKED_NAME)
    assert int((decoded.features[8].weight == 0).sum()) >= int(0.6 * decoded.features[8].weight.numel())
    with pytest.raises(NetslimError, match="exists"):
        pack_run_dir(run, train, test, cfg, out)
