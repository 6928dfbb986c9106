"""int8 export: onnxruntime's static quantization of a trained, compressed network agrees with fp32 on real test
images, is measured against the base, refuses a calibration set that cannot calibrate, and keeps in fp32 the
layers a sensitivity pass finds bad; onnxruntime sessions timed next to PyTorch do not spin."""

from __future__ import annotations

import copy
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from typer.testing import CliRunner

from netslim.cli.commands import app
from netslim.data import batches, load_dataset
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.runtime.ort import NO_SPINNING, OnnxRunner, export_onnx
from netslim.runtime.quantize import calibration_arrays
from netslim.surgery.apply import apply_plan
from netslim.surgery.checkpoint import save_model
from netslim.train import Schedule, fit
from netslim.workflows.export_int8 import export_int8_run
from netslim.zoo import build

torch.set_num_threads(1)
SIZE = (1, 16, 16)


def _run(root: Path, name: str, model: torch.nn.Module, plan: Plan, base: Path | None) -> Path:
    run = root / name
    run.mkdir()
    save_model(run / "model.safetensors", model, plan)
    weights = f" --weights {base}" if base is not None else ""
    (run / "metrics.json").write_text(json.dumps({"data": "digits", "command": f"netslim compress{weights}"}))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small CNN trained on digits (the base), cut and fine-tuned (the run), and the same run with one
    BatchNorm channel made an activation outlier the classifier ignores (its input quantizes badly)."""
    root = tmp_path_factory.mktemp("int8")
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    base = build("small_cnn", 10, 1)
    fit(base, batches(train, 64, shuffle=True), Schedule(epochs=4, lr=0.05), progress=False)
    save_model(root / "base.safetensors", base.eval(), Plan("small_cnn", 10, SIZE))
    plan = Plan("small_cnn", 10, SIZE, keep={"features.4": list(range(0, 32, 2))}, method="test")
    small = apply_plan(copy.deepcopy(base), plan)
    fit(small, batches(train, 64, shuffle=True), Schedule(epochs=2, lr=0.02), progress=False)
    small.eval()
    outlier = copy.deepcopy(small)
    with torch.no_grad():
        outlier.features[9].bias[0] = 1e4  # a constant 1e4 in the classifier's input...
        outlier.classifier.weight[:, 0] = 0.0  # ...that fp32 ignores, but that sets its int8 range
    return {"run": _run(root, "run", small, plan, root / "base.safetensors"),
            "no_base": _run(root, "no_base", small, plan, None),
            "outlier": _run(root, "outlier", outlier, plan, None), "base": root / "base.safetensors"}


def test_int8_predicts_like_fp32_on_real_test_images(runs: dict[str, Path]) -> None:
    import onnx

    rep = export_int8_run(runs["run"], images=360, batches=(1, 8), max_seconds=0.2)
    ours, base = rep["networks"]["compressed"], rep["networks"]["base"]
    assert rep["test"]["images"] == 360 and rep["quantization"]["calibration"]["images"] == 100
    assert ours["accuracy"]["pytorch fp32"] > 0.9  # a trained network: agreement below means something
    assert ours["top1_agreement_int8_vs_fp32"] >= 0.99
    assert abs(ours["accuracy"]["onnxruntime int8"] - ours["accuracy"]["onnxruntime fp32"]) <= 0.01
    assert ours["accuracy"]["onnxruntime fp32"] == pytest.approx(ours["accuracy"]["pytorch fp32"])
    assert ours["bytes"]["onnxruntime int8"] < 0.6 * ours["bytes"]["onnxruntime fp32"]
    assert rep["base"]["available"] and base["accuracy"]["pytorch fp32"] >= ours["accuracy"]["pytorch fp32"] - 0.05
    assert rep["check"]["ok"] and rep["sensitivity"] is None
    assert {(r["network"], r["runtime"], r["batch"]) for r in rep["latency"]} == {
        (n, rt, b) for n in ("base", "compressed") for rt in ours["accuracy"] for b in (1, 8)}
    assert all(r["threads"] == 1 and r["median_ms"] > 0 for r in rep["latency"])
    assert set(rep["factors"]["8"]) == {"pruning", "pruning_eager", "quantization", "runtime", "combined"}
    graph = onnx.load(rep["file"]).graph
    assert Path(rep["file"]).name == "model-int8.onnx"
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer)
    assert json.loads((runs["run"] / "export_onnx-int8.json").read_text())["networks"] == json.loads(json.dumps(
        rep["networks"]))


def test_sensitivity_keeps_the_bad_layer_in_fp32_and_lists_it(runs: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    all_int8 = export_int8_run(runs["outlier"], out=tmp_path / "all.onnx", images=200, batches=(1,), max_seconds=0.1)
    acc = all_int8["networks"]["compressed"]["accuracy"]
    assert acc["onnxruntime int8"] < acc["onnxruntime fp32"] - 0.2  # the outlier ruins the classifier's input
    rep = export_int8_run(runs["outlier"], out=tmp_path / "kept.onnx", images=200, batches=(1,), max_seconds=0.1,
                          max_drop=1.0, sensitivity_images=300)
    sens = rep["sensitivity"]
    assert "classifier" in sens["kept_fp32"] and "features.0" not in sens["kept_fp32"]
    assert {r["layer"] for r in sens["layers"]} == {"features.0", "features.4", "features.8", "classifier"}
    assert all(r["drop"] > 1.0 for r in sens["layers"] if r["layer"] in sens["kept_fp32"])
    assert sens["images"] == 300 and "training" in sens["from"] and not rep["base"]["available"]
    acc = rep["networks"]["compressed"]["accuracy"]
    assert acc["onnxruntime int8"] >= acc["onnxruntime fp32"] - 0.02
    graph = onnx.load(rep["file"]).graph
    made = {o: n.op_type for n in graph.node for o in n.output}
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert made.get(gemm.input[0]) != "DequantizeLinear"  # the classifier runs in fp32


def test_a_bad_calibration_set_is_one_error(runs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(NetslimError, match="calibration set is empty"):
        calibration_arrays([], SIZE)
    with pytest.raises(NetslimError, match="calibration set is empty"):
        calibration_arrays([np.zeros((0, *SIZE), np.float32)], SIZE)
    with pytest.raises(NetslimError, match=r"shape 3×32×32, but the model takes 1×16×16"):
        calibration_arrays([torch.zeros(4, 3, 32, 32)], SIZE)
    with pytest.raises(NetslimError, match="not finite"):
        calibration_arrays([np.full((2, *SIZE), np.nan, np.float32)], SIZE)
    run = Path(shutil.copytree(runs["no_base"], tmp_path / "run"))
    before = sorted(p.name for p in run.iterdir())
    out = tmp_path / "out"
    out.mkdir()
    for kwargs, message in [({"calib_images": 0}, "calibration set is empty"),
                            ({"calib_method": "kl"}, "unknown calibration method"),
                            ({"max_drop": -1.0}, "max-int8-drop"),
                            ({"calib_images": 1000, "max_drop": 1.0, "sensitivity_images": 1000}, "need 2000")]:
        with pytest.raises(NetslimError, match=message):
            export_int8_run(run, out=out / "m.onnx", images=50, batches=(1,), **kwargs)
    assert not list(out.iterdir()) and sorted(p.name for p in run.iterdir()) == before


def test_an_existing_file_is_refused_then_replaced_whole(runs: dict[str, Path], tmp_path: Path) -> None:
    target = tmp_path / "m.onnx"
    target.write_text("precious")
    with pytest.raises(NetslimError, match="already exists"):
        export_int8_run(runs["no_base"], out=target, images=50, batches=(1,))
    assert target.read_text() == "precious"
    rep = export_int8_run(runs["no_base"], out=target, images=50, batches=(1,), max_seconds=0.1, overwrite=True)
    assert rep["bytes"] == target.stat().st_size and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert rep["quantization"]["activations"] in ("uint8", "int8") and rep["quantization"]["format"] == "QDQ"


def test_cli_int8_export(runs: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", str(runs["no_base"]), "--format", "onnx-int8", "--out",
                                   str(tmp_path / "q.onnx"), "--images", "100", "--threads", "1",
                                   "--seconds", "0.1", "--calib-method", "entropy", "--calib-images", "50", "--json"])
    assert res.exit_code == 0, res.stderr
    rep = json.loads(res.stdout)  # the histogram calibrators' progress did not reach stdout
    assert rep["quantization"]["calibration"] == {"method": "entropy", "images": 50,
                                                  "from": "training images of digits"}
    assert not rep["base"]["available"] and "--base" in rep["base"]["reason"]
    assert "pruning" not in rep["factors"]["1"] and "no base network" in res.stderr
    res = CliRunner().invoke(app, ["export", str(runs["no_base"]), "--format", "onnx-int8", "--out",
                                   str(tmp_path / "b.onnx"), "--images", "50", "--threads", "1", "--seconds", "0.1",
                                   "--base", str(runs["base"]), "--json"])
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["base"] == {"available": True, "weights": str(runs["base"]), "from": "--base"}
    res = CliRunner().invoke(app, ["export", str(runs["no_base"]), "--format", "onnx-int8", "--out",
                                   str(tmp_path / "e.onnx"), "--calib-images", "0"])
    assert res.exit_code == 2 and res.stderr.count("error:") == 1 and "calibration set is empty" in res.stderr
    res = CliRunner().invoke(app, ["export", str(runs["no_base"]), "--format", "onnx", "--max-int8-drop", "1"])
    assert res.exit_code == 2 and "onnx-int8" in res.stderr
    assert not (tmp_path / "e.onnx").exists()


def _idle_cpu_ms(session: object, x: np.ndarray, name: str) -> float:
    """CPU time this process burns in the 50 ms after a run while doing nothing: spinning threads."""
    spent = []
    for _ in range(7):
        session.run(None, {name: x})  # type: ignore[attr-defined]
        c = time.process_time()
        time.sleep(0.05)
        spent.append(time.process_time() - c)
    return statistics.median(spent) * 1e3


def test_onnx_sessions_sleep_when_idle(tmp_path: Path) -> None:
    """The export's sessions leave the cores to what is timed next (an idle session burns no CPU), where
    onnxruntime's default would keep its threads spinning: the artifact that tripled PyTorch's time."""
    import onnxruntime as ort

    path = tmp_path / "r20.onnx"
    export_onnx(build("resnet20", 10).eval(), torch.randn(2, 3, 32, 32), path)
    ours = OnnxRunner(path, threads=2)
    opts = ours.session.get_session_options()
    assert all(opts.get_session_config_entry(k) == v for k, v in NO_SPINNING.items())
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    spinning = ort.SessionOptions()
    spinning.intra_op_num_threads = 2
    default = ort.InferenceSession(str(path), spinning, providers=["CPUExecutionProvider"])
    control = _idle_cpu_ms(default, x, ours.name)
    idle = _idle_cpu_ms(ours.session, x, ours.name)
    assert idle < 2.0, f"an idle export session burns {idle:.1f} ms of CPU per 50 ms"
    if control < 5 * max(idle, 0.5):
        pytest.skip(f"this onnxruntime does not spin when idle ({control:.1f} ms per 50 ms): nothing to catch")


def test_pruned_resnet56_int8_agrees_on_cifar(tmp_path: Path) -> None:
    from netslim.workflows.api import load_trained

    model, _, _ = load_trained(shared_path("models/resnet56_cifar10.safetensors"), "resnet56", 10, 3)
    data = shared_path("data/cifar10-jpeg.tar.gz")
    plan = Plan("resnet56", 10, (3, 32, 32), keep={"layer3.0.conv1": list(range(0, 64, 2))}, method="test")
    apply_plan(model, plan)
    save_model(tmp_path / "model.safetensors", model, plan)
    rep = export_int8_run(tmp_path, data=str(data), images=300, batches=(1,), max_seconds=0.2)
    ours = rep["networks"]["compressed"]
    assert ours["accuracy"]["pytorch fp32"] > 0.7 and ours["top1_agreement_int8_vs_fp32"] >= 0.99
    assert ours["int8_bytes_over_fp32"] < 0.30
    parts = ours["parts"]
    for form, bytes_ in ours["bytes"].items():  # the parts add up to each file as stored
        assert form not in parts or sum(parts[form].values()) == bytes_
    assert ours["int8_weight_bytes_over_fp32"] == 0.25  # int8 weights: a byte for each float32's four
    int8 = parts["onnxruntime int8"]
    assert int8["biases"] == parts["onnxruntime fp32"]["biases"]  # int32 in QDQ: as many bytes as float32
    assert int8["graph"] < 0.1 * ours["bytes"]["onnxruntime int8"]  # short names: not the exporter's paths
