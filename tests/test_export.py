"""Export: ONNX and torch.export files that predict like PyTorch on real images, timed beside it; bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import shared_path
from typer.testing import CliRunner

from netslim.cli.commands import app
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.apply import apply_plan
from netslim.surgery.checkpoint import save_model
from netslim.workflows.export import RTOL, data_spec_of, export_run
from netslim.zoo import build

torch.set_num_threads(1)


def randomise_bn(model: torch.nn.Module) -> torch.nn.Module:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
    return model.eval()


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compressed small CNN run on the embedded digits data (random weights: predictions are still checked)."""
    run = tmp_path_factory.mktemp("export") / "run"
    run.mkdir()
    torch.manual_seed(0)
    model = randomise_bn(build("small_cnn", 10, 1))
    plan = Plan("small_cnn", 10, (1, 16, 16), keep={"features.4": list(range(0, 32, 2))}, method="test")
    apply_plan(model, plan)
    save_model(run / "model.safetensors", model, plan)
    (run / "metrics.json").write_text(json.dumps({"command": "netslim compress --data digits --method l1"}))
    return run


def test_onnx_export_matches_pytorch_on_real_images(digits_run: Path) -> None:
    rep = export_run(digits_run, "onnx", images=300, batches=(1, 8), max_seconds=0.3)
    assert Path(rep["file"]).is_file() and rep["file"].endswith("model.onnx")
    assert rep["batchnorms"] == 3 and rep["batchnorms_folded"] == 3
    check = rep["check"]
    assert check["ok"] and check["images"] == 300 and "digits" in check["inputs"]
    assert check["max_rel_logit_diff"] <= RTOL and check["top1_agreement"] == 1.0
    runtimes = {r["runtime"].split()[0] for r in rep["latency"]}
    assert runtimes == {"pytorch", "onnxruntime"}
    assert {r["batch"] for r in rep["latency"]} == {1, 8} and all(r["median_ms"] > 0 for r in rep["latency"])
    assert json.loads((digits_run / "export_onnx.json").read_text())["check"]["ok"]


def test_onnx_file_has_a_dynamic_batch_and_no_batchnorm(digits_run: Path, tmp_path: Path) -> None:
    import onnx

    rep = export_run(digits_run, "onnx", out=tmp_path / "m.onnx", images=50, batches=(3,), max_seconds=0.2)
    graph = onnx.load(rep["file"]).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value


def test_torch_export_format(digits_run: Path, tmp_path: Path) -> None:
    rep = export_run(digits_run, "torch-export", out=tmp_path / "m.pt2", images=100, batches=(2,), max_seconds=0.2)
    assert rep["check"]["ok"] and Path(rep["file"]).suffix == ".pt2"
    program = torch.export.load(rep["file"])
    assert program.module()(torch.randn(5, 1, 16, 16)).shape == (5, 10)


def test_a_wrong_export_is_refused_and_not_left_behind(digits_run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import netslim.workflows.export as ex

    real = ex.OnnxRunner

    class Off:
        def __init__(self, *a, **k) -> None:
            self.inner = real(*a, **k)

        def __call__(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * 1.01

    monkeypatch.setattr(ex, "OnnxRunner", Off)
    out = tmp_path / "bad.onnx"
    with pytest.raises(NetslimError, match="does not predict like PyTorch"):
        export_run(digits_run, "onnx", out=out, images=50, batches=(1,))
    assert not list(tmp_path.iterdir())


def test_bad_inputs(digits_run: Path, tmp_path: Path) -> None:
    with pytest.raises(NetslimError, match="unknown export format"):
        export_run(digits_run, "tflite")
    with pytest.raises(NetslimError, match="does not exist"):
        export_run(tmp_path / "nope", "onnx")
    assert data_spec_of(digits_run) == "digits"
    assert data_spec_of(tmp_path) is None


def test_cli_export(digits_run: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", str(digits_run), "--format", "onnx", "--out", str(tmp_path / "c.onnx"),
                                   "--images", "40", "--threads", "1", "--seconds", "0.2", "--json"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["check"]["ok"] and rep["latency"][0]["threads"] == 1
    res = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--format", "onnx"])
    assert res.exit_code == 2 and "error:" in res.stderr


def test_pruned_resnet56_onnx_matches_on_cifar(tmp_path: Path) -> None:
    from netslim.workflows.api import load_trained

    model, _, _ = load_trained(shared_path("models/resnet56_cifar10.safetensors"), "resnet56", 10, 3)
    data = shared_path("data/cifar10-jpeg.tar.gz")
    plan = Plan("resnet56", 10, (3, 32, 32), keep={"layer3.0.conv1": list(range(0, 64, 2))}, method="test")
    apply_plan(model, plan)
    save_model(tmp_path / "model.safetensors", model, plan)
    rep = export_run(tmp_path, "onnx", data=str(data), images=300, batches=(1,), max_seconds=0.5)
    check = rep["check"]
    assert check["ok"] and check["images"] == 300 and check["top1_agreement"] == 1.0
    assert rep["batchnorms_folded"] == rep["batchnorms"] == 57
