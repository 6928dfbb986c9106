"""The Plan: the one JSON document that methods hand to surgery.

It names the base architecture and, per layer, the output channels to keep, the layers or blocks to
drop, the layers to factorize and, per multi-head attention, the heads to keep. It holds no weights, so
it can be read, diffed, edited by hand and replayed on a freshly built base model (that is how
checkpoints reload).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from netslim.errors import NetslimError
from netslim.io import atomic_write_text

VERSION = 1


@dataclass
class Plan:
    arch: str
    num_classes: int
    input_size: tuple[int, int, int] = (3, 32, 32)
    keep: dict[str, list[int]] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    factorize: dict[str, dict[str, Any]] = field(default_factory=dict)
    heads: dict[str, list[int]] = field(default_factory=dict)  # attention module -> kept head indices
    classes: list[int] | None = None
    method: str = "identity"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def out_classes(self) -> int:
        return len(self.classes) if self.classes is not None else self.num_classes

    def widths(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.keep.items()}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        if not self.heads:  # written only when used, so a Plan without head cuts stays readable by older netslim
            del d["heads"]
        return {"version": VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: Any) -> Plan:
        """A Plan from parsed JSON, every field's type checked: a file is data, and a malformed one gets one
        clear error here instead of a traceback wherever the bad field is first used."""
        if not isinstance(d, dict):
            raise NetslimError(f"plan is malformed: expected a JSON object, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("version", VERSION)
        if not _is_int(version):
            raise NetslimError(f"plan is malformed: 'version' must be an integer, got {version!r}")
        if version > VERSION:
            raise NetslimError("plan was written by a newer netslim; upgrade to read it")
        _check_fields(d)
        try:
            plan = cls(**d)
        except TypeError as e:
            raise NetslimError(f"plan is malformed: {e}") from None
        plan.input_size = tuple(plan.input_size)  # type: ignore[assignment]
        plan.keep = {k: sorted(int(i) for i in v) for k, v in plan.keep.items()}
        plan.heads = {k: sorted(int(i) for i in v) for k, v in plan.heads.items()}
        return plan

    @classmethod
    def from_json(cls, text: str, source: str = "plan") -> Plan:
        """from_dict of JSON text; invalid JSON or a malformed Plan is one NetslimError naming `source`."""
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise NetslimError(f"{source}: the plan is not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except NetslimError as e:
            raise NetslimError(f"{source}: {e}") from None

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise NetslimError(f"plan file {path} does not exist")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise NetslimError(f"plan file {path} cannot be read: {e}") from None
        return cls.from_json(text, f"plan file {path}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(i) and i >= 0 for i in v)


_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "arch": (lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string"),
    "num_classes": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
    "input_size": (lambda v: isinstance(v, list | tuple) and len(v) == 3 and all(_is_int(i) and i >= 1 for i in v),
                   "three positive integers [C, H, W]"),
    "keep": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _int_list(i) for k, i in v.items()),
             "an object mapping layer names to lists of channel indices"),
    "drop": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of layer names"),
    "factorize": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(i, dict)
                                                        for k, i in v.items()),
                  "an object mapping layer names to objects"),
    "heads": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and _int_list(i) for k, i in v.items()),
              "an object mapping attention module names to lists of head indices"),
    "classes": (lambda v: v is None or _int_list(v), "null or a list of class indices"),
    "method": (lambda v: isinstance(v, str), "a string"),
    "meta": (lambda v: isinstance(v, dict), "an object"),
}


def _check_fields(d: dict[str, Any]) -> None:
    for name, (ok, what) in _FIELD_CHECKS.items():
        if name in d and not ok(d[name]):
            raise NetslimError(f"plan is malformed: {name!r} must be {what}, got {json.dumps(d[name])[:60]}")
