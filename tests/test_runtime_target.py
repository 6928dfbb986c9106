"""`--target latency=F --runtime onnx|onnx-int8`: the latency target timed on the runtime the user deploys on.

The ratios asserted are the search's own (one interleaved run of base and candidate on that runtime, recorded in
the Plan's meta); no absolute time is asserted anywhere. Bad runtime input is one error line before any data is
decoded (a dataset path that does not exist would otherwise be the error)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from netslim.cli.commands import app
from netslim.cost import latency_table, timing
from netslim.cost.targets import Target, latency_bisect
from netslim.cost.timing import Conditions
from netslim.errors import NetslimError
from netslim.methods import Context
from netslim.methods.common.ranking import plan_from_widths, uniform_widths
from netslim.runtime import forms

torch.set_num_threads(1)
runner = CliRunner()


def met(lat: dict, target: float) -> bool:
    """Within 10% of the target, or (a step in the runtime's kernels leaves no network near it) the closest
    network timed, with the miss recorded for the report."""
    if lat.get("missed"):
        return lat["measured_ratio"] in (lat["missed"]["below"], lat["missed"]["above"])
    return abs(lat["measured_ratio"] - target) <= 0.1 * target


def run(*args: str) -> tuple[int, str, str]:
    res = runner.invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every timing capped at 0.3 s, and the latency table kept in the test's own directory."""
    timed = timing.interleaved_times

    def fast(*a, **k):  # noqa: ANN002, ANN003, ANN202 (a pass-through)
        return timed(*a, **(k | {"max_seconds": min(0.3, k.get("max_seconds", 20.0))}))

    monkeypatch.setattr(timing, "interleaved_times", fast)
    monkeypatch.setattr(latency_table, "interleaved_times", fast)
    monkeypatch.setattr(latency_table, "default_table_dir", lambda: tmp_path / "tables")


def test_half_the_int8_latency_is_measured_on_onnxruntime_int8(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two 64-channel convolutions at 24 px: enough work that int8 onnxruntime's latency follows the widths."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    ctx = Context(model=model, arch="custom", num_classes=10, input_size=(3, 24, 24))
    groups = ctx.groups()
    scores = {g.root: torch.arange(g.width, dtype=torch.float32) for g in groups}
    quantized: list[set[str]] = []  # the operator types of every int8 graph timed
    real = forms.write_onnx

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202 (a pass-through)
        import onnx

        files = real(*a, **k)
        if files.int8 is not None:
            quantized.append({n.op_type for n in onnx.load(str(files.int8)).graph.node})
        return files

    monkeypatch.setattr(forms, "write_onnx", spy)

    def make(r: float):
        return plan_from_widths(ctx, "uniform", scores, uniform_widths(groups, r), {"ratio": round(r, 6)})

    target = Target("latency", 0.5, batch=1, threads=1, runtime="onnx-int8")
    try:
        plan = latency_bisect(make, target, ctx.template(), 0.0, 1.0, cache_dir=tmp_path, seconds_per_timing=1.0)
    except NetslimError as e:  # refused: one line saying so, on this runtime
        assert "unreachable" in str(e) and "onnxruntime int8" in str(e) and "\n" not in str(e)
        return
    lat = plan.meta["latency"]
    assert lat["runtime"] == "onnx-int8" and lat["target"] == 0.5 and lat["threads"] == 1
    assert met(lat, 0.5)
    assert len(quantized) == len(lat["attempts"]) + 1  # the base and every candidate, each quantized
    assert all("QuantizeLinear" in ops and "DequantizeLinear" in ops for ops in quantized)
    assert all(len(k) < 64 for k in plan.keep.values())


def test_compress_records_the_runtime_in_plan_metrics_speed_and_report(tmp_path: Path, quick: None) -> None:
    out = tmp_path / "run"
    code, stdout, err = run("compress", "--model", "small_cnn", "--data", "digits", "--method", "l1",
                            "--target", "latency=0.95", "--runtime", "onnx-int8", "--repair", "none",
                            "--calib-size", "200", "--out", str(out), "--json")
    if code != 0:  # a small network's int8 latency is mostly fixed costs: a refusal is allowed, in one line
        assert code == 2 and err.count("\n") == 1 and "unreachable" in err, err
        assert not out.exists()
        return
    metrics = json.loads(stdout)
    lat = metrics["latency_target"]
    assert lat["runtime"] == "onnx-int8" and met(lat, 0.95)
    assert json.loads((out / "plan.json").read_text())["meta"]["latency"]["runtime"] == "onnx-int8"
    int8 = [r for r in metrics["speed"] if r["runtime"] == "onnx-int8"]
    assert [r["batch"] for r in int8] == [1, 64] and all(r["base_ms"] > 0 and r["ms"] > 0 for r in int8)
    assert {r["runtime"] for r in metrics["after"]["latency"]} == {"torch", "onnx-int8"}
    report = (out / "report.md").read_text()
    assert "timed on onnxruntime int8" in report and "CPU onnx-int8 latency batch 1" in report


def test_an_unreachable_int8_target_is_refused_in_one_line(tmp_path: Path, quick: None) -> None:
    out = tmp_path / "run"
    code, _, err = run("compress", "--model", "small_cnn", "--data", "digits", "--method", "l1",
                       "--target", "latency=0.1", "--runtime", "onnx-int8", "--repair", "none",
                       "--calib-size", "200", "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: target latency=0.1 ")
    assert "unreachable" in err and "onnxruntime int8" in err
    assert not out.exists()


@pytest.mark.parametrize(("args", "says"), [
    (("--target", "latency=0.5", "--runtime", "tensorrt"), "unknown runtime 'tensorrt'; choose from torch, onnx"),
    (("--target", "latency=0.5", "--runtime", "onnx-int8", "--device", "cuda"), "timed on the CPU"),
    (("--target", "params=0.5", "--runtime", "onnx"), "give --target latency=F"),
    (("--runtime", "onnx"), "give --target latency=F"),
])
def test_bad_runtime_is_one_line_before_any_data(tmp_path: Path, args: tuple[str, ...], says: str) -> None:
    out = tmp_path / "run"
    code, _, err = run("compress", "--model", "small_cnn", "--data", str(tmp_path / "no-such-data"), *args,
                       "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert not out.exists()


def test_target_and_conditions_check_their_runtime() -> None:
    with pytest.raises(NetslimError, match="unknown runtime"):
        Target("latency", 0.5, runtime="tflite")
    with pytest.raises(NetslimError, match="only concerns a latency target"):
        Target("flops", 0.5, runtime="onnx")
    with pytest.raises(NetslimError, match="timed on the CPU"):
        Target("latency", 0.5, device="cuda", runtime="onnx-int8")
    with pytest.raises(NetslimError, match="float32 inputs"):
        Conditions.make("cpu", runtime="onnx", dtype="bfloat16")
    cond = Conditions.make("cpu", 4, 1, runtime="onnx-int8")
    assert cond.describe()["runtime"] == "onnx-int8" and cond.key().endswith("-onnx-int8")
    assert Conditions.make("cpu", 4, 1).key() + "-onnx-int8" == cond.key()  # torch tables keep their names


def test_onnx_runtime_times_both_networks_on_onnxruntime() -> None:
    from netslim.cost.timing import compare_speed

    wide = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 8 * 8, 10)).eval()
    narrow = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                           nn.Linear(8 * 8 * 8, 10)).eval()
    (row,) = compare_speed(wide, narrow, (3, 8, 8), "cpu", batches=(2,), threads=1, max_seconds=0.2, runtime="onnx")
    assert row["runtime"] == "onnx" and row["dtype"] == "float32" and row["base_ms"] > 0 and row["ms"] > 0
    runner = forms.as_runtime(wide, "onnx", (3, 8, 8), threads=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        assert torch.allclose(runner(x), wide(x), atol=1e-4)  # the BN-folded ONNX form computes the same


def test_the_report_says_where_a_latency_target_was_timed_and_when_it_was_missed() -> None:
    from netslim.report.rundir import _latency_target_line

    lat = {"runtime": "onnx-int8", "device_name": "x86_64", "threads": 2, "batch": 1, "target": 0.5,
           "measured_ratio": 0.613, "ms": 0.6, "base_ms": 0.98, "attempts": [{}, {}, {}]}
    line = _latency_target_line(lat)
    assert "timed on onnxruntime int8 (x86_64, 2 threads, batch 1)" in line and "0.613" in line
    assert "within 10%" not in line
    missed = _latency_target_line(lat | {"missed": {"below": 0.388, "above": 0.613}})
    assert "No network was timed within 10% of the target" in missed and "0.388 and 0.613" in missed
    assert _latency_target_line(None) == ""
