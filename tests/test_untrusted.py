"""A weights file is data: an architecture it names as `module:function` is never imported or called.

Only the user's own --model (or `arch=` in Python) may name code. Each test plants a module that leaves a
mark on disk when imported, then hands netslim a file naming it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from netslim.cli import app
from netslim.errors import NetslimError
from netslim.plan import Plan
from netslim.surgery.checkpoint import load_model, save_model
from netslim.zoo import build

runner = CliRunner()


@pytest.fixture
def planted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    """A factory module `planted_factory:net` whose import writes `mark`."""
    mark = tmp_path / "imported"
    (tmp_path / "planted_factory.py").write_text(
        f"from pathlib import Path\nPath({str(mark)!r}).write_text('yes')\n"
        "from netslim.zoo import build\n"
        "def net(num_classes=10, in_channels=1):\n    return build('small_cnn', num_classes, in_channels)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "planted_factory", raising=False)
    return "planted_factory:net", mark


def test_plain_weights_naming_code_are_refused(planted: tuple[str, Path], tmp_path: Path) -> None:
    arch, mark = planted
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in build("small_cnn", 10, 1).state_dict().items()}, str(weights),
              metadata={"arch": arch})
    res = runner.invoke(app, ["evaluate", "--weights", str(weights), "--data", "digits"])
    assert res.exit_code == 2 and "never imports code" in res.stderr
    assert not mark.exists()


def test_a_plan_naming_code_loads_only_when_the_user_names_it(planted: tuple[str, Path], tmp_path: Path) -> None:
    arch, mark = planted
    model = build("small_cnn", 10, 1)
    path = tmp_path / "m.safetensors"
    save_model(path, model, Plan(arch=arch, num_classes=10, input_size=(1, 16, 16)))
    with pytest.raises(NetslimError, match="never imports code"):
        load_model(path)
    res = runner.invoke(app, ["evaluate", "--weights", str(path), "--data", "digits"])
    assert res.exit_code == 2 and not mark.exists()
    loaded, _ = load_model(path, arch=arch)  # the user's own word
    assert mark.exists()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
