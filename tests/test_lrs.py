"""GreBdec low-rank + sparse decomposition: solver, factorized layers, checkpoints and the method."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from netslim.cost.size import plan_size, stored_params
from netslim.cost.targets import Target
from netslim.errors import NetslimError
from netslim.methods.lrs.moments import original_moments, patches
from netslim.methods.lrs.solver import allocate, decompose, lowrank_curve, weighted_error
from netslim.plan import Plan
from netslim.surgery.checkpoint import load_model, save_model
from netslim.surgery.factorized import (
    LowRankSparseConv2d,
    LowRankSparseLinear,
    factorize_layers,
    factorized_layers,
    use_sparse_kernel,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _low_rank_plus_sparse(m: int = 40, d: int = 60, r: int = 4, c: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(m, r, generator=gen) @ torch.randn(r, d, generator=gen)
    s = torch.zeros(m * d)
    s[torch.randperm(m * d, generator=gen)[:c]] = 3 * torch.randn(c, generator=gen)
    return (low + s.reshape(m, d)).double(), s.reshape(m, d) != 0


@pytest.mark.parametrize("objective", ["weights", "features"])
def test_exact_low_rank_plus_sparse_is_recovered(objective: str) -> None:
    w, support = _low_rank_plus_sparse()
    gram = None
    if objective == "features":
        x = torch.randn(60, 400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        x = x * torch.linspace(0.3, 2.0, 60, dtype=torch.float64)[:, None]  # inputs of unequal scale
        gram = x @ x.T
    dec = decompose(w, 4, 100, gram, stages=2, sweeps=2, final_sweeps=60)
    assert dec.rank == 4 and dec.nnz == 100
    assert torch.equal(dec.mask, support)
    assert float((dec.weight() - w).norm() / w.norm()) < 1e-5
    assert dec.relative_error < 1e-5


def test_rank_zero_is_magnitude_pruning() -> None:
    w = torch.randn(30, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    dec = decompose(w, 0, 300)
    keep = w.abs() >= w.abs().flatten().topk(300).values[-1]
    assert dec.rank == 0 and torch.equal(dec.mask, keep)
    assert torch.allclose(dec.s, w * keep)


def test_rank_zero_with_features_refits_the_kept_weights() -> None:
    """Data-aware pruning: the support's values solve the least squares, beating plain magnitude pruning."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(20, 40, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 300, generator=gen, dtype=torch.float64)
    x[1::2] += x[::2]  # correlated inputs: refitting matters
    gram = x @ x.T
    dec = decompose(w, 0, 200, gram, final_sweeps=3, cg_iters=100)
    keep = w.abs() >= w.abs().flatten().topk(200).values[-1]
    mag = weighted_error(w * keep, w, _moments(gram, w))
    assert dec.rank == 0 and dec.nnz == 200
    assert dec.relative_error < 0.9 * mag
    # optimality on the support: the gradient (W − S) G vanishes there
    grad = (w - dec.s) @ gram
    assert float(grad[dec.mask].abs().max()) < 1e-6 * float(grad.abs().max() + 1)


def _moments(gram: torch.Tensor, w: torch.Tensor):
    from netslim.methods.lrs.solver import Moments

    return Moments(gram, None, float(((w @ gram) * w).sum()), 0)


def test_feature_objective_reaches_the_weighted_optimum_and_beats_svd() -> None:
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 72, generator=gen, dtype=torch.float64)
    x = torch.randn(72, 8, generator=gen, dtype=torch.float64) @ torch.randn(8, 500, generator=gen,
                                                                               dtype=torch.float64)
    x += 0.05 * torch.randn(72, 500, generator=gen, dtype=torch.float64)  # inputs near an 8-dim subspace
    gram = x @ x.T
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    svd = (u[:, :4] * s[:4]) @ vh[:4]
    dec = decompose(w, 4, 0, gram, final_sweeps=20)
    ref = float(((w @ gram) * w).sum())
    err_svd = (float((((w - svd) @ gram) * (w - svd)).sum()) / ref) ** 0.5
    best = float(lowrank_curve(w, gram)[4]) ** 0.5  # the optimum, from an eigendecomposition
    assert dec.relative_error == pytest.approx(best, rel=1e-3)
    assert dec.relative_error < 0.7 * err_svd


def test_allocation_prefers_the_layer_whose_error_falls_fastest() -> None:
    flat = torch.linspace(1.0, 0.0, 11)  # error falls slowly
    steep = torch.cat([torch.tensor([1.0, 0.1]), torch.full((9,), 0.05)])
    ranks = allocate([flat, steep], [1.0, 1.0], [10, 10], budget=6)
    assert sum(ranks) == 6 and ranks[1] == 1 and ranks[0] == 5
    curve = lowrank_curve(torch.eye(4, dtype=torch.float64) * torch.tensor([4.0, 3, 2, 1]), None)
    assert torch.allclose(curve, torch.tensor([30.0, 14, 5, 1, 0], dtype=torch.float64) / 30)


# ---------------------------------------------------------------- layers


def _fill_random(layer, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    m, d, r = layer.out_dim, layer.in_dim, layer.rank
    s = torch.randn(m, d, generator=gen)
    mask = torch.zeros(m * d, dtype=torch.bool)
    mask[torch.randperm(m * d, generator=gen)[:layer.nnz]] = True
    mask = mask.reshape(m, d)
    bias = torch.randn(m, generator=gen) if layer.bias is not None else None
    layer.set_factors(torch.randn(m, r, generator=gen), torch.randn(r, d, generator=gen),
                      s * mask if layer.nnz else None, mask if layer.nnz else None, bias)


@pytest.mark.parametrize("rank,nnz", [(3, 40), (0, 50), (5, 0)])
def test_factorized_conv_equals_dense_weight(rank: int, nnz: int) -> None:
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=True)
    layer = LowRankSparseConv2d(6, 8, 3, stride=2, padding=1, bias=True, rank=rank, nnz=nnz)
    _fill_random(layer)
    with torch.no_grad():
        conv.weight.copy_(layer.dense_weight().reshape(conv.weight.shape))
        conv.bias.copy_(layer.bias)
    x = torch.randn(2, 6, 9, 9)
    assert torch.allclose(layer(x), conv(x), atol=1e-4)
    assert layer.stored_params() == rank * (8 + 54) + nnz + 8
    layer.eval()
    assert use_sparse_kernel(layer) == (1 if nnz else 0)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-4)


def test_factorized_linear_equals_dense_weight_and_mask_stays_fixed() -> None:
    layer = LowRankSparseLinear(12, 7, bias=True, rank=2, nnz=20)
    _fill_random(layer, 1)
    lin = nn.Linear(12, 7)
    with torch.no_grad():
        lin.weight.copy_(layer.dense_weight())
        lin.bias.copy_(layer.bias)
    x = torch.randn(5, 12)
    assert torch.allclose(layer(x), lin(x), atol=1e-5)
    # training moves only the kept entries of S: the masked-out ones get no gradient
    layer(x).pow(2).sum().backward()
    assert float(layer.sparse.weight.grad[~layer.mask].abs().max()) == 0.0
    assert float(layer.sparse.weight.grad[layer.mask].abs().max()) > 0.0


def test_factorize_layers_on_meta_and_weight_only_fill() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    spec = {"0": {"rank": 2, "nnz": 30, "kind": "conv"}, "3": {"rank": 3, "sparsity": 0.9, "kind": "linear"}}
    meta = copy.deepcopy(net).to("meta")
    factorize_layers(meta, spec)
    assert stored_params(meta) == 2 * (8 + 27) + 30 + 8 + 3 * (5 + 128) + round(0.1 * 5 * 128) + 5
    full_rank = factorize_layers(copy.deepcopy(net), {"0": {"rank": 8, "nnz": 0, "kind": "conv"}})
    x = torch.randn(2, 3, 4, 4)
    assert torch.allclose(full_rank(x), net(x), atol=1e-4)  # a full-rank fill reproduces the layer
    with pytest.raises(NetslimError, match="linear layer"):
        factorize_layers(copy.deepcopy(net), {"3": {"rank": 1, "kind": "conv"}})
    with pytest.raises(NetslimError, match="rank 0 or|rank > 0"):
        factorize_layers(copy.deepcopy(net), {"0": {"rank": 0, "nnz": 0}})


# ---------------------------------------------------------------- method, checkpoint


def _small_setup():
    from netslim.data import load_dataset
    from netslim.zoo import build

    train = load_dataset("digits", "train")
    torch.manual_seed(0)
    model = build("small_cnn", num_classes=10, in_channels=train.images.shape[1]).eval()
    return model, train


def test_patches_match_unfold() -> None:
    conv = nn.Conv2d(4, 2, (3, 2), stride=2, padding=(1, 0), dilation=(1, 2))
    x = torch.randn(2, 4, 9, 8)
    cols = torch.nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                                      stride=conv.stride)
    assert torch.allclose(patches(conv, x, None), cols.transpose(1, 2).reshape(-1, cols.shape[1]))
    idx = torch.tensor([[0, 5, 7], [3, 3, 1]])
    picked = cols.gather(2, idx.unsqueeze(1).expand(-1, cols.shape[1], -1)).transpose(1, 2).reshape(-1, 24)
    assert torch.allclose(patches(conv, x, idx), picked)


def test_moments_are_those_of_the_patches() -> None:
    from netslim.data import batches

    model, train = _small_setup()
    data = train.subset(list(range(16)))
    mom = original_moments(model, ["features.4"], batches(data, 8), positions=1000, seed=0)["features.4"]
    conv = model.features[4]
    feats = []
    model.features[4].register_forward_pre_hook(lambda m, a: feats.append(a[0]))
    with torch.no_grad():
        for x, _ in batches(data, 8):
            model(x)
    xs = torch.cat([patches(conv, f, None) for f in feats]).double()
    assert mom.n == xs.shape[0]
    assert torch.allclose(mom.gram, xs.T @ xs, rtol=1e-4, atol=1e-3)
    w = conv.weight.detach().reshape(conv.out_channels, -1).double()
    assert mom.yy == pytest.approx(float(((xs @ w.T) ** 2).sum()), rel=1e-4)


def _compress(model, train, options, target=None):
    from netslim.workflows.stages import analyse

    return analyse(model, "small_cnn", train, "lrs", target, options, "cpu", calib_size=200)


def test_method_fills_the_model_and_checkpoint_reloads_it(tmp_path) -> None:
    model, train = _small_setup()
    result, ctx, _ = _compress(model, train, {"rank_ratio": 0.25, "sparsity": 0.8, "images": 64})
    plan, small = result.plan, result.model
    assert set(plan.factorize) == {"features.0", "features.4", "features.8"}
    for name, entry in plan.factorize.items():
        layer = small.get_submodule(name)
        assert (layer.rank, layer.nnz) == (entry["rank"], entry["nnz"])
        assert int(layer.mask.sum()) <= entry["nnz"]
    assert plan_size(plan, ctx.template())["params"] == stored_params(small) < stored_params(model)
    x = torch.randn(4, *ctx.input_size)
    save_model(tmp_path / "model.safetensors", small, plan)
    again, plan2 = load_model(tmp_path / "model.safetensors")
    assert plan2.factorize == plan.factorize
    with torch.no_grad():
        assert torch.equal(again(x), small.eval()(x))
    rows = plan.meta["layers"]
    assert all(r["feature_error"] < 1.0 and r["bytes"] < r["dense_bytes"] for r in rows)
    assert "GreBdec" in result.report[0]


def test_target_is_met_and_split_by_error() -> None:
    model, train = _small_setup()
    result, _, _ = _compress(model, train, {"images": 64}, Target("params", 0.4))
    plan = result.plan
    assert stored_params(result.model) <= 0.4 * stored_params(model)
    ranks = {n: e["rank"] for n, e in plan.factorize.items()}
    assert ranks and all(r >= 1 for r in ranks.values())


def test_flops_target_is_met_by_low_rank_alone_and_weighs_layers_by_their_positions() -> None:
    from netslim.cost.size import count_flops

    model, train = _small_setup()
    result, ctx, _ = _compress(model, train, {"images": 64}, Target("flops", 0.4))
    base, small = count_flops(model, ctx.input_size).macs, count_flops(result.model, ctx.input_size).macs
    assert 0.3 * base < small <= 0.4 * base  # met, without leaving most of the budget unspent
    assert plan_size(result.plan, ctx.template())["macs"] == small
    assert all(e["nnz"] == 0 and e["rank"] > 0 for e in result.plan.factorize.values())
    assert all(layer.sparse is None for layer in factorized_layers(result.model).values())
    # features.4 runs at 4x the positions of features.8: under flops its ranks cost 4x as much
    by_params = _compress(model, train, {"images": 64, "sparse_share": 0.0}, Target("params", 0.4))[0].plan.factorize
    by_flops = result.plan.factorize
    assert by_flops["features.4"]["rank"] / by_flops["features.8"]["rank"] < \
        by_params["features.4"]["rank"] / by_params["features.8"]["rank"]


def test_compressed_inputs_fit_each_layer_to_what_the_compressed_network_feeds_it() -> None:
    from netslim.data import batches

    model, train = _small_setup()
    opts = {"rank_ratio": 0.25, "sparsity": 0.9, "images": 48}
    orig = _compress(model, train, opts)[0]
    chained = _compress(model, train, opts | {"inputs": "compressed"})[0]
    plan = chained.plan
    rows = {r["layer"]: r for r in plan.meta["layers"]}
    assert "feature_error_chained" in rows["features.8"] and "feature_error_chained" not in rows["features.0"]
    # judged on what the compressed network really computes, the chained fit is closer to the original output
    data = train.subset(list(range(200)))

    def out_error(net: nn.Module) -> float:
        with torch.no_grad():
            return sum(float((net(x) - model(x)).pow(2).sum()) for x, _ in batches(data, 100))

    assert out_error(chained.model) < out_error(orig.model)


def test_bad_options_are_clear_errors() -> None:
    model, train = _small_setup()
    with pytest.raises(NetslimError, match="rank or rank_ratio"):
        _compress(model, train, {"rank": 2, "rank_ratio": 0.5})
    with pytest.raises(NetslimError, match="params or flops target"):
        _compress(model, train, {}, Target("latency", 0.5))
    with pytest.raises(NetslimError, match="without a sparse part"):
        _compress(model, train, {"sparse_share": 0.3}, Target("flops", 0.5))
    with pytest.raises(NetslimError, match="unreachable"):
        _compress(model, train, {"images": 16}, Target("params", 0.001))
    with pytest.raises(NetslimError, match="objective"):
        _compress(model, train, {"objective": "bogus"})


def test_plan_replayed_on_the_base_gives_a_working_weight_only_network() -> None:
    from netslim.surgery.apply import apply_plan

    model, _ = _small_setup()
    plan = Plan(arch="small_cnn", num_classes=10, input_size=(1, 16, 16),
                factorize={"features.8": {"rank": 64, "nnz": 0, "kind": "conv"}})
    out = apply_plan(copy.deepcopy(model), plan)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.allclose(out(x), model(x), atol=1e-4)


def test_cli_compress_with_rank_and_sparsity(tmp_path) -> None:
    import json

    from typer.testing import CliRunner

    from netslim.cli.commands import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["compress", "--model", "small_cnn", "--data", "digits", "--method", "lrs",
                                   "--opt", "rank_ratio=0.25", "--opt", "sparsity=0.9", "--epochs", "1", "--calib-size",
                                   "100", "--no-latency", "--out", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["after"]["params"] < 0.5 * metrics["before"]["params"]
    assert metrics["after"]["accuracy_before_finetune"] is not None
    model, plan = load_model(out)
    assert plan.method == "lrs" and set(plan.factorize) == {"features.0", "features.4", "features.8"}
    assert "GreBdec" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["compress", "--model", "small_cnn", "--data", "digits", "--method", "lrs",
                                   "--opt", "rank=2", "--target", "params=0.5", "--no-latency", "--out",
                                   str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "--target splits the budget" in bad.stderr
