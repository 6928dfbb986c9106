"""Declared method options: every method has them, every option read is one of them, and a typo or a bad
value is one `error:` line (exit 2) before any data is decoded."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import netslim.workflows.api as api
from netslim.cli.commands import app
from netslim.errors import NetslimError
from netslim.methods import Context, list_methods, validate_options
from netslim.methods.base import MethodOptions

torch.set_num_threads(1)
METHODS = Path(__file__).resolve().parents[1] / "netslim" / "methods"


def run(*args: str) -> tuple[int, str, str]:
    res = CliRunner().invoke(app, list(args))
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding any data fails the test: option errors must come first."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("data was loaded before the options were checked")

    monkeypatch.setattr(api, "load_data", refuse)


@pytest.mark.parametrize("command", ["compress", "analyze"])
def test_unknown_key_is_one_line_naming_the_valid_keys(command: str, no_data: None, tmp_path: Path) -> None:
    code, _, err = run(command, "--method", "pfa-en", "--opt", "enrgy=0.5", "--data", str(tmp_path / "nowhere"),
                       "--out", str(tmp_path / "run"))
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: unknown option 'enrgy' for pfa-en")
    assert "valid keys:" in err and "energy" in err and "min_fraction" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("opt", "words"), [("energy=abc", ["energy", "float"]), ("min_keep=2.5", ["min_keep", "int"]),
                                            ("energy=1.5", ["energy", "(0, 1]"]),
                                            ("round_to=0", ["round_to", "at least 1"])])
def test_bad_value_is_exit_2_naming_key_and_type(opt: str, words: list[str], no_data: None) -> None:
    code, _, err = run("compress", "--method", "pfa-en", "--opt", opt, "--data", "digits")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert all(w in err for w in words), err


def test_bench_checks_each_methods_share_before_data(no_data: None, tmp_path: Path) -> None:
    code, _, err = run("bench", "--methods", "pfa-kl,car", "--opt", "car.eval_sise=64", "--out", str(tmp_path))
    assert code == 2 and "unknown option 'eval_sise' for car" in err
    code, _, err = run("bench", "--methods", "pfa-kl,car", "--opt", "car.eval_size=lots", "--out", str(tmp_path))
    assert code == 2 and "eval_size" in err and "int" in err
    code, _, err = run("bench", "--methods", "pfa-kl,tp-l1", "--opt", "eval_size=64", "--out", str(tmp_path))
    assert code == 2 and "no benched method declares it" in err


def test_removed_method_flags_are_gone() -> None:
    for flag in ("--energy", "--variance", "--min-accuracy", "--layers", "--eval-size", "--per-step", "--rank",
                 "--rank-ratio", "--sparsity", "--classwise"):
        code, _, _ = run("analyze", "--method", "pfa-en", flag, "1")
        assert code != 0, flag


def test_methods_name_lists_its_options() -> None:
    code, _, err = run("methods", "pfa-en")
    assert code == 0 and "energy" in err and "min_fraction" in err and "0.125" in err
    code, out, _ = run("methods", "car", "--json")
    rows = {r["name"]: r for r in json.loads(out)["options"]}
    assert rows["eval_size"] == {"name": "eval_size", "type": "int", "default": 2000,
                                 "help": rows["eval_size"]["help"]} and rows["eval_size"]["help"]
    assert rows["layers"]["type"] == "list[str] | None" and "round_to" in rows
    code, _, err = run("methods", "magic")
    assert code == 2 and "unknown method" in err
    code, out, _ = run("methods", "--json")
    assert code == 0 and set(json.loads(out)) == {s.name for s in list_methods()}


def test_every_method_declares_options_with_defaults_and_help() -> None:
    for spec in list_methods():
        assert issubclass(spec.options, MethodOptions), spec.name
        declared = fields(spec.options)
        assert {"round_to", "init"} <= {f.name for f in declared}
        for f in declared:
            assert f.default is not MISSING or f.default_factory is not MISSING, (spec.name, f.name)
            assert f.metadata.get("help"), (spec.name, f.name)
        assert validate_options(spec.name, {}) == spec.options()  # the defaults pass their own checks


def test_strings_are_converted_to_the_declared_types() -> None:
    o = validate_options("car", {"eval_size": "64", "classwise": "true", "layers": "features.0, features.4",
                                 "max_drop": "null", "keep-fraction": "0.25"})
    assert (o.eval_size, o.classwise, o.layers, o.max_drop, o.keep_fraction) == (64, True, ["features.0",
                                                                                           "features.4"], None, 0.25)
    lrs = validate_options("lrs", {"skip": "a,b", "per_layer": '{"features.0": {"rank": 2}}', "rank": 4.0})
    assert lrs.skip == ("a", "b") and lrs.per_layer == {"features.0": {"rank": 2}} and lrs.rank == 4
    with pytest.raises(NetslimError, match="verbose for lda: expected bool"):
        validate_options("lda", {"verbose": "maybe"})
    with pytest.raises(NetslimError, match="per_layer for lrs: expected"):
        validate_options("lrs", {"per_layer": "rank=2"})


def _read_names(paths: list[Path]) -> set[str]:
    pattern = re.compile(r"\.option\(\s*\"(\w+)\"")
    return {m for p in paths for m in pattern.findall(p.read_text())}


def test_every_option_a_method_reads_is_declared() -> None:
    """Statically: each `ctx.option("name", ...)` in a method's package is declared by that package's methods;
    at run time an undeclared read raises (test below), so the method tests catch what a regex would miss."""
    by_package: dict[Path, set[str]] = {}
    for spec in list_methods():
        module = Path(METHODS.parent.parent, *spec.fn.__module__.split("."))
        where = module.parent if module.parent != METHODS else module.with_suffix(".py")
        by_package.setdefault(where, set()).update(f.name for f in fields(spec.options))
    for where, declared in by_package.items():
        files = sorted(where.glob("*.py")) if where.is_dir() else [where]
        assert _read_names(files) <= declared, where
    everyone = set.intersection(*(set(f.name for f in fields(s.options)) for s in list_methods()))
    assert _read_names(sorted((METHODS / "common").glob("*.py"))) - everyone <= {"ratio"}  # uniform_plan: peers
    for path in METHODS.rglob("*.py"):
        assert not re.search(r"ctx\.options(\.get\(|\[)", path.read_text()), f"{path} reads raw options"


def test_undeclared_read_raises_instead_of_defaulting() -> None:
    ctx = Context(model=torch.nn.Linear(2, 2), arch="x", num_classes=2, input_size=(1, 1, 2),
                  opts=validate_options("pfa-en", {"energy": 0.5}))
    assert ctx.option("energy", 0.95) == 0.5
    with pytest.raises(LookupError, match="enrgy"):
        ctx.option("enrgy", 0.95)
    with pytest.raises(NetslimError, match="unknown option 'energy' for this context"):
        Context(model=torch.nn.Linear(2, 2), arch="x", num_classes=2, input_size=(1, 1, 2),
                options={"energy": 0.5}).option("round_to", 1)


def test_python_api_validates_before_the_method_runs() -> None:
    from netslim.data import load_dataset
    from netslim.workflows.stages import analyse
    from netslim.zoo import build

    train = load_dataset("digits", "train")
    with pytest.raises(NetslimError, match="unknown option 'enrgy' for pfa-en"):
        analyse(build("small_cnn", num_classes=10), "small_cnn", train, "pfa-en", None, {"enrgy": 0.5}, "cpu")


FAST = {"car": {"eval_size": 32, "layers": "features.0", "masks_per_pass": 8},
        "lda": {"max_iters": 1, "ft_epochs": 0, "verbose": False, "trace_images": 2},
        "lrs": {"images": 16, "positions": 2, "stages": 1, "sweeps": 1, "final_sweeps": 1},
        "pca": {"images": 32}, "tp-taylor": {"taylor_images": 64}}


@pytest.mark.parametrize("method", sorted(s.name for s in list_methods()))
def test_every_method_runs_with_its_declared_options(method: str) -> None:
    """Each method on the tiny digits data: any option it reads without declaring it raises LookupError."""
    from netslim.data import load_dataset
    from netslim.workflows.stages import analyse
    from netslim.zoo import build

    train = load_dataset("digits", "train")
    model = build("small_cnn", num_classes=10)
    _, ctx, _ = analyse(copy.deepcopy(model), "small_cnn", train, method, None, FAST.get(method, {}), "cpu",
                        calib_size=200)
    assert type(ctx.opts) is next(s.options for s in list_methods() if s.name == method)
