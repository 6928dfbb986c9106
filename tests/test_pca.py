"""PCA design: width = significant dimensions, depth = where they stop growing, designed nets build and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from netslim.data import ImageSet
from netslim.errors import NetslimError
from netslim.methods import Context, get_method
from netslim.methods.pca.depth import DropUnit, decide
from netslim.surgery.apply import apply_plan
from netslim.surgery.checkpoint import load_model, save_model
from netslim.workflows.stages import resolve_init
from netslim.zoo import build

torch.set_num_threads(1)


def images(n: int = 24, size: int = 8, channels: int = 3, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(x, torch.arange(n) % 2, ["a", "b"], (0.5,) * channels, (0.25,) * channels)


def orthonormal(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g))[0]


class Stack(nn.Module):
    """conv_a: 1x1, rank-`rank` mixing of the 3 inputs; conv_b: 3x3 (spatial mixing adds dimensions);
    conv_c: 1x1 identity (adds none); pool; conv_d: first of the next stage. No BN/ReLU: responses are linear."""

    def __init__(self, rank: int = 2, width: int = 32) -> None:
        super().__init__()
        a = nn.Conv2d(3, width, 1, bias=False)
        b = nn.Conv2d(width, width, 3, padding=1, bias=False)
        c = nn.Conv2d(width, width, 1, bias=False)
        d = nn.Conv2d(width, width, 3, padding=1, bias=False)
        with torch.no_grad():
            a.weight.copy_((orthonormal(width, rank) @ orthonormal(3, rank, seed=1).T).view(width, 3, 1, 1))
            c.weight.copy_(torch.eye(width).view(width, width, 1, 1))
        self.features = nn.Sequential(a, b, c, nn.MaxPool2d(2), d)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def context(model: nn.Module, arch: str = "custom", n: int = 24, size: int = 8, **options) -> Context:
    num = model.get_submodule("classifier" if arch == "custom" else "fc" if "resnet" in arch else
                              "classifier.1" if arch == "mobilenetv2" else "classifier").out_features
    return Context(model=model.eval(), arch=arch, num_classes=num, input_size=(3, size, size),
                   calib=images(n, size), options=options, batch_size=16)


def test_layer_with_known_rank_gets_that_width() -> None:
    for rank in (1, 2, 3):
        ctx = context(Stack(rank), depth_rule="none")
        plan = get_method("pca").fn(ctx).plan
        assert len(plan.keep["features.0"]) == rank
        assert plan.drop == []


def test_later_layers_that_add_no_dimensions_are_dropped() -> None:
    model = Stack(rank=2)
    ctx = context(model)
    result = get_method("pca").fn(ctx)
    plan = result.plan
    # conv_b's 3x3 window spreads the rank-2 input over 2 x 9 = 18 of its 32 dimensions: kept; conv_c copies them
    # (18 <= 18): dropped;
    # conv_d is the first conv at the pooled resolution: kept whatever its dimensions.
    assert plan.drop == ["features.2"]
    assert plan.meta["structure"] == "sequential" and plan.meta["depth_rule"] == "grow"
    assert "features.2" not in plan.keep
    small = apply_plan(model, plan)
    assert isinstance(small.features[2], nn.Identity)
    assert small(torch.randn(2, 3, 8, 8)).shape == (2, 2)
    section = result.report[0]
    assert "Dropped: features.2" in section and "pca_dims.png" in result.artifacts


def test_depth_rule_on_dimension_sequences() -> None:
    def units(dims: list[int], stages: list[int], channels: int = 16) -> list[DropUnit]:
        return [DropUnit(f"u{i}", "conv", channels, (1,), s, True, dims=d) for i, (d, s) in
                enumerate(zip(dims, stages, strict=True))]

    # grows, stalls, falls; then a new stage whose first unit is always kept
    assert decide(units([4, 8, 8, 6, 3, 2], [0, 0, 0, 0, 1, 1])) == ["u2", "u3", "u5"]
    # a unit above the stage's kept maximum is kept even after a stall
    assert decide(units([4, 6, 5, 9], [0, 0, 0, 0])) == ["u2"]
    # threshold: growth must exceed 25%
    assert decide(units([8, 9, 11], [0, 0, 0]), threshold=0.25) == ["u1"]
    # network scope: the later stage is compared with the earlier maximum (its first unit still kept)
    assert decide(units([8, 4, 6], [0, 1, 1]), scope="network") == ["u2"]
    assert decide(units([8, 4, 6], [0, 1, 1])) == []
    # saturated units (dims == width) show no growth: kept unless asked
    assert decide(units([16, 16, 16], [0, 0, 0])) == []
    assert decide(units([16, 16, 16], [0, 0, 0]), saturated="drop") == ["u1", "u2"]
    assert decide(units([4, 2], [0, 0]), rule="none") == []
    fixed = units([4, 2], [0, 0])
    fixed[1].droppable, fixed[1].why_not = False, "changes the resolution"
    assert decide(fixed) == [] and "cannot be removed" in fixed[1].reason


def test_round_to_and_bad_options() -> None:
    plan = get_method("pca").fn(context(Stack(rank=3), depth_rule="none", round_to=8)).plan
    assert all(len(k) % 8 == 0 for k in plan.keep.values())
    for bad in ({"variance": 1.5}, {"depth_rule": "shrink"}, {"depth_scope": "block"}, {"depth_threshold": -1}):
        with pytest.raises(NetslimError):
            get_method("pca").fn(context(Stack(), **bad))


@pytest.mark.parametrize("arch,opts,kind", [
    ("vgg11_bn", {"variance": 0.9}, "sequential"),
    ("resnet56", {"saturated": "drop"}, "residual"),
    ("mobilenetv2", {}, "width-only"),
])
def test_designed_network_builds_and_runs(arch: str, opts: dict, kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build(arch)
    ctx = context(model, arch, n=12, size=32, **opts)
    result = get_method("pca").fn(ctx)
    plan = result.plan
    assert plan.meta["structure"] == kind
    assert plan.keep  # some width was cut
    if kind == "width-only":
        assert plan.drop == [] and "width only" in result.report[0]
    if kind == "residual":  # blocks with identity shortcuts only; every stage keeps its first block
        assert plan.drop and all(b.split(".")[1] != "0" for b in plan.drop)
    small = apply_plan(build(arch), plan)
    out = small.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    save_model(tmp_path / "m.safetensors", small, plan)  # the designed net reloads from its files alone
    again, _ = load_model(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(again(x), small(x), atol=1e-5)


def test_init_defaults_to_the_methods_retrain() -> None:
    assert get_method("pca").retrain == "scratch"
    assert resolve_init(None, "pca") == "scratch"
    assert resolve_init(None, "pfa-kl") == "fine"
    assert resolve_init("inherit", "pca") == "fine"
    with pytest.raises(NetslimError):
        resolve_init("warm", "pca")


def test_cli_analyze_and_compress(tmp_path: Path) -> None:
    from netslim.cli.commands import app

    runner = CliRunner()
    res = runner.invoke(app, ["analyze", "--model", "small_cnn", "--data", "digits", "--method", "pca",
                              "--opt", "variance=0.99", "--round-to", "4", "--calib-size", "64",
                              "--out", str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.stderr
    metrics = json.loads(res.stdout)
    assert metrics["options"] == {"variance": 0.99, "round_to": 4}
    assert all(w["after"] % 4 == 0 or w["after"] == w["before"] for w in metrics["widths"])
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## PCA design (variance 0.99" in report and (tmp_path / "a" / "pca_dims.png").stat().st_size > 0
    res = runner.invoke(app, ["compress", "--model", "small_cnn", "--data", "digits", "--method", "pca",
                              "--epochs", "1", "--calib-size", "64", "--out", str(tmp_path / "c"), "--no-latency",
                              "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["init"] == "scratch"


def test_target_bisects_the_variance() -> None:
    from netslim.cost.size import plan_size
    from netslim.cost.targets import Target

    ctx = context(Stack())
    ctx.target = Target("params", 0.2)
    plan = get_method("pca").fn(ctx).plan
    base = plan_size(ctx.base_plan("pca"), ctx.template())
    assert plan_size(plan, ctx.template())["params"] <= 0.2 * base["params"]
    assert 0 < plan.meta["variance"] < 1 and plan.meta["target"] == "params=0.2"
