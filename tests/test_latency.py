"""Latency: table keys and disk cache, units found by tracing, interleaved comparison, the latency-target search."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from netslim.cost import targets, timing
from netslim.cost.latency_table import TABLE_VERSION, LatencyTable, round_to_default
from netslim.cost.targets import Target, bisect, latency_bisect, parse_target
from netslim.cost.timing import Conditions, compare_speed, cpu_threads, interleaved_times, latency_rows
from netslim.cost.units import network_units
from netslim.errors import NetslimError
from netslim.methods import Context
from netslim.methods.common.ranking import plan_from_widths, uniform_widths
from netslim.zoo import build

torch.set_num_threads(1)


def test_conditions_key_names_device_torch_threads_batch() -> None:
    key = Conditions.make("cpu", batch=64, threads=2).key()
    assert key.startswith("cpu-") and "-t2-" in key and "-b64-" in key and "float32" in key
    assert torch.__version__.split("+")[0] in key
    assert Conditions.make("cpu", 1, 1).key() != Conditions.make("cpu", 64, 1).key()
    with pytest.raises(NetslimError):
        Conditions.make("cpu", batch=0)


def test_cpu_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with cpu_threads(3) as n:
        assert n == torch.get_num_threads() == 3
        with cpu_threads(None) as inner:
            assert inner == 3
    assert torch.get_num_threads() == before


def test_interleaved_times_per_model_inputs_calls_and_budget() -> None:
    models = [nn.Linear(4, 4), nn.Linear(8, 2)]
    xs = [torch.randn(2, 4), torch.randn(2, 8)]
    times = interleaved_times(models, xs, min_rounds=3, max_rounds=3, calls=[5, 1])
    assert [len(t) for t in times] == [3, 3] and all(s > 0 for t in times for s in t)
    (one,) = interleaved_times(models[:1], xs[0], min_rounds=1, max_rounds=1000, max_seconds=0.0,
                               warmup_in_budget=True)
    assert len(one) == 1  # the budget (warm-up included) is spent after the first timing


def test_round_to_default_per_device() -> None:
    assert round_to_default("cuda") == 8
    assert round_to_default("cuda:1") == 8
    assert round_to_default("cpu") == 1


def test_units_of_a_resnet_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = build("resnet20", 10)
    units = network_units(model, (3, 32, 32))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(units) == len(convs) + 1  # every conv plus the classifier
    stem, fc = units[0], units[-1]
    assert (stem.cin, stem.cout, stem.spatial, stem.bn, stem.act) == (3, 16, (32, 32), True, "ReLU")
    assert (fc.kind, fc.cin, fc.cout, fc.bn) == ("linear", 64, 10, False)
    second_convs = [u for u in units[1:-1] if u.kernel == (3, 3) and u.bn and u.act is None]
    assert second_convs  # conv2 of a block: BN, then the residual add (no activation of its own)
    assert any(u.spatial == (8, 8) and u.cout == 64 for u in units)


def test_table_is_cached_on_disk_and_reused(tmp_path: Path) -> None:
    cond = Conditions.make("cpu", batch=2, threads=1)
    with torch.device("meta"):
        units = network_units(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                            nn.Conv2d(8, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)), (3, 8, 8))
    table = LatencyTable(cond, tmp_path, budget_s=0.05)
    assert table.path.name == f"{cond.key()}-v{TABLE_VERSION}.json"  # the name tables were cached under
    first = table.predict(units)
    assert first > 0 and table.measured == 3
    table.save()
    doc = json.loads(table.path.read_text())
    assert doc["conditions"]["batch"] == 2 and len(doc["entries"]) == 3 + 1  # and the reference unit's timing
    again = LatencyTable(cond, tmp_path)
    assert again.predict(units) == pytest.approx(first) and again.measured == 0
    (tmp_path / table.path.name).write_text("{broken")
    assert LatencyTable(cond, tmp_path).entries == {}  # a broken cache is rebuilt, not fatal


def wide_net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)).eval()


def test_compare_speed_sees_a_much_narrower_network_faster() -> None:
    rows = compare_speed(wide_net(96), wide_net(8), (3, 32, 32), "cpu", batches=(4,), threads=1, max_seconds=1.0)
    (row,) = rows
    assert row["threads"] == 1 and row["dtype"] == "float32" and row["batch"] == 4
    assert row["speedup"] > 2  # ~140x fewer FLOPs in the big conv; even a busy machine shows that
    base, small = latency_rows(rows, "base")[0], latency_rows(rows, "small")[0]
    assert base["median_ms"] == row["base_ms"] and small["median_ms"] == row["ms"]


def test_latency_target_keeps_its_string_and_conditions() -> None:
    t = parse_target("latency=0.5")
    assert (t.kind, t.fraction, t.batch) == ("latency", 0.5, 1)
    t64 = replace(t, batch=64, threads=1)
    assert str(t64) == "latency=0.5" and t64.batch == 64


@pytest.fixture(scope="module")
def ctx() -> Context:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()
    return Context(model=model, arch="custom", num_classes=10, input_size=(3, 24, 24))


def test_latency_search_times_its_result(ctx: Context, tmp_path: Path) -> None:
    groups = ctx.groups()
    scores = {g.root: torch.arange(g.width, dtype=torch.float32) for g in groups}

    def make(r: float):
        return plan_from_widths(ctx, "uniform", scores, uniform_widths(groups, r), {"ratio": round(r, 6)})

    target = Target("latency", 0.5, batch=8, threads=1)
    plan = latency_bisect(make, target, ctx.template(), 0.0, 1.0, timings=3, cache_dir=tmp_path,
                          seconds_per_timing=1.0)
    lat = plan.meta["latency"]
    assert lat["batch"] == 8 and lat["threads"] == 1 and lat["target"] == 0.5
    assert 1 <= len(lat["attempts"]) <= 3
    best = min(lat["attempts"], key=lambda a: abs(a["measured_ratio"] - 0.5))
    assert lat["measured_ratio"] == best["measured_ratio"]
    assert lat["measured_ratio"] > 0  # its value is a timing: checked in benchmarks/, not in a test
    assert 0 < len(plan.keep) and all(len(k) < 64 for k in plan.keep.values())
    assert Path(lat["table"]).is_file()


def test_budget_bisect_dispatches_latency_and_rejects_the_unreachable(ctx: Context, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import netslim.cost.latency_table as lt

    monkeypatch.setattr(lt, "default_table_dir", lambda: tmp_path)
    groups = ctx.groups()
    scores = {g.root: torch.arange(g.width, dtype=torch.float32) for g in groups}

    def make(r: float):
        return plan_from_widths(ctx, "uniform", scores, uniform_widths(groups, 0.9 + 0.1 * r))

    with pytest.raises(NetslimError, match="unreachable"):
        bisect(make, Target("latency", 0.05, batch=4, threads=1), ctx.template(), 0.0, 1.0)


def test_cli_sets_round_to_per_device_and_the_latency_batch() -> None:
    from netslim.cli.commands import _for_device

    tgt, opts = _for_device(parse_target("latency=0.5"), {}, "cpu", 64)
    assert (tgt.batch, tgt.device, opts["round_to"]) == (64, "cpu", 1)
    _, opts = _for_device(None, {}, "cuda", 1)
    assert opts["round_to"] == 8
    _, opts = _for_device(None, {"round_to": 4}, "cuda", 1)
    assert opts["round_to"] == 4  # an explicit --round-to wins
    tgt, _ = _for_device(parse_target("flops=0.5"), {}, "cpu", 64)
    assert tgt.batch == 1  # --batch only concerns latency targets
    with pytest.raises(NetslimError):
        _for_device(None, {"round_to": 0}, "cpu", 1)


def test_pipeline_reports_speed_of_base_and_result_timed_together(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from netslim.data import load_dataset
    from netslim.workflows.compress import compress

    timed = timing.interleaved_times
    monkeypatch.setattr(timing, "interleaved_times", lambda *a, **k: timed(*a, **(k | {"max_seconds": 0.3})))

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    res = compress(build("small_cnn", 10, 1), "small_cnn", train, test, method="l1", target=Target("params", 0.3),
                   calib_size=200, out=tmp_path / "run")
    speed = res.metrics["speed"]
    assert [r["batch"] for r in speed] == [1, 64]
    for r in speed:
        assert r["device"] == "cpu" and r["threads"] >= 1 and r["dtype"] == "float32"
        assert r["base_ms"] > 0 and r["ms"] > 0 and r["speedup"] > 0 and r["rounds"] >= 5
    after = res.metrics["after"]["latency"]
    assert [r["median_ms"] for r in after] == [r["ms"] for r in speed]
    assert "## Speed" in (tmp_path / "run" / "report.md").read_text()


class FakeLatency:
    """A network whose latency ratio is knob**4 while the table predicts knob: a badly aimed first guess."""

    def __init__(self, *args, **kwargs) -> None:
        self.base_ms, self.timed = 100.0, []
        self.table = type("T", (), {"save": lambda self: None, "path": "fake", "measured": 0})()

    @staticmethod
    def knob(plan) -> float:
        return plan.meta["knob"]

    def predicted_ratio(self, plan) -> float:
        return self.knob(plan)

    def measured_ratio(self, plan, max_seconds: float = 10.0) -> tuple[float, float, float]:
        self.timed.append(self.knob(plan))
        return self.knob(plan) ** 4, 100.0 * self.knob(plan) ** 4, 100.0


@pytest.mark.parametrize("fraction", [0.5, 0.2, 0.9])
def test_latency_search_corrects_a_wrong_prediction_with_few_timings(fraction: float,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from netslim.plan import Plan

    fake = FakeLatency()
    monkeypatch.setattr(targets, "LatencyModel", lambda *a, **k: fake)

    def make(k: float) -> Plan:
        return Plan("x", 10, keep={"layer": list(range(max(1, round(k * 10000))))}, meta={"knob": k})

    plan = latency_bisect(make, Target("latency", fraction), object(), 0.0, 1.0)
    assert abs(plan.meta["latency"]["measured_ratio"] - fraction) <= targets.TOLERANCE * fraction
    assert len(fake.timed) <= 8
